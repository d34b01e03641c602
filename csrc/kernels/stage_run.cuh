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

RIMS_HD int stage_runs(int n) { return (n + kStageRun - 1) / kStageRun; }

// The copy a staging run writes to its second destination unchanged (stage_run's default).
struct StageSame {
  template <typename C>
  RIMS_HD C operator()(int, C v) const { return v; }
};

// dst[e] = src[e], and dst2[e] = f2(e, src[e]) unless dst2 is null, for e in item x's run
// [x kStageRun, x kStageRun + kStageRun) of [0, n); dst may be null too (only dst2 written).
// f2 lets the second copy differ where it is saved, not staged (the stepped comm saves inactive
// mechanisms' queries as zeros).
template <typename C, typename F2 = StageSame>
RIMS_HD void stage_run(C* dst, const C* src, int n, int x, C* dst2 = nullptr, F2 f2 = {}) {
  const int e0 = x * kStageRun;
  C v[kStageRun];
  RIMS_UNROLL
  for (int u = 0; u < kStageRun; ++u)
    if (e0 + u < n) v[u] = src[e0 + u];
  RIMS_UNROLL
  for (int u = 0; u < kStageRun; ++u) {
    if (e0 + u >= n) break;
    if (dst != nullptr) dst[e0 + u] = v[u];
    if (dst2 != nullptr) dst2[e0 + u] = f2(e0 + u, v[u]);
  }
}

}  // namespace rims
