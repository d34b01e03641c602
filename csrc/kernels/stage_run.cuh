// Staging a block's rows from global into shared memory in runs whose loads are all in flight
// before their stores (the persistent backward's per-step staging, rim_seq_bwd.cuh; the stepped
// ops' per-sample phases, rim_step_fwd.cuh). A loop of one element per item instead waits one L2
// round trip per element it takes in turn: its shared-memory store may alias the next global
// load (generic pointers), so the compiler keeps them in order.
#pragma once

#include "column_dot.cuh"   // RIMS_UNROLL
#include "masked_cell.cuh"  // RIMS_HD

namespace rims {

// Elements a staging item copies (stage_run): its loads all in flight before its stores, so that
// an item waits on one L2 round trip.
constexpr int kStageRun = 16;
// Items whose runs interleave (stage_run): a warp's.
constexpr int kStageLanes = 32;

RIMS_HD int stage_runs(int n) { return (n + kStageRun - 1) / kStageRun; }

// The copy a staging run writes to its second destination unchanged (stage_run's default).
struct StageSame {
  template <typename C>
  RIMS_HD C operator()(int, C v) const { return v; }
};

// dst[e] = src[e], and dst2[e] = f2(e, src[e]) unless dst2 is null, for item x's kStageRun
// elements of [0, n); dst may be null too (only dst2 written). f2 lets the second copy differ
// where it is saved, not staged (the stepped comm saves inactive mechanisms' queries as zeros).
// The stage_runs(n) items split [0, n) in groups of kStageLanes items (kStageLanes kStageRun
// elements; the last group as many items as its elements need): item l of a group of c items
// takes the group's elements l, l + c, l + 2c, ..., so that the items of a warp (consecutive x)
// load consecutive elements at each step, 128 bytes of float a load, and store them to
// consecutive shared-memory words. (Items of 16 contiguous elements made each load touch 16
// cache lines and each float store a 16-way bank conflict.) Each element is copied once, by one
// item, whatever the grouping: the results do not depend on it.
template <typename C, typename F2 = StageSame>
RIMS_HD void stage_run(C* dst, const C* src, int n, int x, C* dst2 = nullptr, F2 f2 = {}) {
  const int base = x / kStageLanes * (kStageLanes * kStageRun), l = x % kStageLanes;
  const int left = stage_runs(n - base);
  const int c = left < kStageLanes ? left : kStageLanes;  // the group's items
  // Zeros only where an element is out of range and never stored (GCC cannot see that).
  C v[kStageRun] = {};
  RIMS_UNROLL
  for (int u = 0; u < kStageRun; ++u) {
    const int e = base + u * c + l;
    if (e < n) v[u] = src[e];
  }
  RIMS_UNROLL
  for (int u = 0; u < kStageRun; ++u) {
    const int e = base + u * c + l;
    if (e >= n) break;
    if (dst != nullptr) dst[e] = v[u];
    if (dst2 != nullptr) dst2[e] = f2(e, v[u]);
  }
}

}  // namespace rims
