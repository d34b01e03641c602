// The weight-stationary CUDA-core products of the persistent kernels (rim_seq_fwd.cuh,
// rim_seq_bwd.cuh): one item computes NC adjacent columns of a mechanism's weight product for all
// the tile's samples,
//   acc[c][s] += row(s, j) * W[j, col0 + c]   for j = 0 .. n-1 in ascending order,
// W row-major with row stride ld (W[j, col0 + c] at w[j * ld + c]).
//
// Why this shape: on an H100 these products were bound by the latency of their weight loads
// (benchmarks/README.md, "Measured on an H100": each thread waited on one L2 round trip per one
// or two weights, and one block of 8 warps per SM hid none of it). So a thread keeps
// kColumnBatch rows x NC columns of weights in flight before their FMAs, reads the NC columns of
// a row as one vector where alignment allows, and reuses each activation row(s, j) NC times.
// Each column's sum keeps the order of a plain loop over j (same FMAs, same result bits), so the
// grouping changes no result: host runs check that (tests/test_rim_seq.py).
#pragma once

#include <cstdint>
#include <cstring>

#include "masked_cell.cuh"  // RIMS_HD
#include "storage_types.cuh"

#if defined(__CUDACC__)
#define RIMS_UNROLL _Pragma("unroll")
#else
#define RIMS_UNROLL
#endif

namespace rims {

// Rows of weights loaded per batch, before their FMAs.
constexpr int kColumnBatch = 16;

// Rows per batch of whole vectors (columns_dot's main loop): twice as many for bfloat16/half
// weights at tile 1, whose batches are held packed (weight_of) and whose FMAs use each
// weight once: every weight phase of the 512-thread tile-1 kernels is a chain of one L2 round
// trip per batch (benchmarks/README.md), so this halves the chains (paper layer: 7 -> 4 batches
// of a 100-row product). ptxas sm_90a: 102 registers in the tile-1 forward, 128 in its backward,
// no spills; at tile 2 the converted weights are reused by both samples and 32 rows spilled
// ~840 bytes, so larger tiles keep 16.
template <typename W, int SMAX>
constexpr int kVectorBatch = sizeof(W) == 2 && SMAX == 1 ? 2 * kColumnBatch : kColumnBatch;

// Rows per batch of the guarded loop (the rows after the last whole batch, or every row of a
// partial or unaligned group), whose weights are converted to the compute type as loaded: half
// a batch for float/double weights at tile 1, where 16 rows of float values spilled ~170 bytes
// in the 512-thread backward (ptxas sm_90a); 16 otherwise.
template <typename W, int SMAX>
constexpr int kGuardedBatch = sizeof(W) > 2 && SMAX == 1 ? kColumnBatch / 2 : kColumnBatch;

// Adjacent columns per item: 4 in float32 compute (one 8-byte load of bfloat16/half weights, 16
// bytes of float), 2 in float64 (its accumulators take twice the registers).
template <typename C>
constexpr int kColumnsOf = sizeof(C) > 4 ? 2 : 4;

RIMS_HD int min_int(int a, int b) { return a < b ? a : b; }

// Groups of NC columns covering `width` columns (the last one may be partial).
RIMS_HD int column_groups(int width, int nc) { return (width + nc - 1) / nc; }

// Item i of a phase whose items are `groups` column groups (of NC) of a `width`-column product per
// mechanism (or per any outer index): that index, the group's first column and its width.
struct ColumnGroup {
  int outer, c0, nc;
};
template <int NC>
RIMS_HD ColumnGroup column_group(int i, int groups, int width) {
  const int c0 = (i % groups) * NC;
  return {i / groups, c0, min_int(NC, width - c0)};
}

template <typename W, int N>
struct alignas(sizeof(W) * N) WeightVec {
  W v[N];
};

// Whether every row's NC weights of a full group can be read as one aligned vector.
template <int NC, typename W>
RIMS_HD bool columns_vectorizable(const W* w, int64_t ld) {
  return NC > 1 && ld % NC == 0 && reinterpret_cast<uintptr_t>(w) % (sizeof(W) * NC) == 0;
}

// W[j, col0 + c], c < NC, as one aligned vector in the storage type.
template <int NC, typename W>
RIMS_HD WeightVec<W, NC> load_raw(const W* w) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const WeightVec<W, NC>*>(w);
#else
  WeightVec<W, NC> v;
  std::memcpy(v.v, w, sizeof(v.v));
  return v;
#endif
}

// out[c] = W[j, col0 + c], c < NC, as one aligned vector, converted to the compute type.
template <int NC, typename C, typename W>
RIMS_HD void load_vector(const W* w, C (&out)[NC]) {
  const WeightVec<W, NC> v = load_raw<NC>(w);
  RIMS_UNROLL
  for (int c = 0; c < NC; ++c) out[c] = to_c(v.v[c]);
}

// out[c] = W[j, col0 + c] for c < nc: one vector (vec), or one load per column where columns past
// nc (a partial group) repeat column 0 so that every load stays in bounds; their sums are never
// used.
template <int NC, typename C, typename W>
RIMS_HD void load_columns(const W* w, bool vec, int nc, C (&out)[NC]) {
  if (vec) {
    load_vector(w, out);
    return;
  }
  RIMS_UNROLL
  for (int c = 0; c < NC; ++c) out[c] = to_c(w[c < nc ? c : 0]);
}

// Weight c of a batch row, in the compute type: a row converted as loaded (C[NC]), or one kept
// in the storage type until its FMAs (WeightVec; a batch of bfloat16/half weights then holds
// half the registers of its float values: the 512-thread kernels sit at their 128-register limit).
template <typename C, int NC>
RIMS_HD C weight_of(const C (&w)[NC], int c) { return w[c]; }
template <typename C, typename W, int NC>
RIMS_HD C weight_of(const WeightVec<W, NC>& w, int c) { return to_c(w.v[c]); }

// acc[c][s] += row(s, j + u) * weight c of wb[u] for the batch's rows u < m (m == MB: a full
// batch, no guard left once inlined), sample by sample for s < S: a branch per sample, not SMAX
// predicated blocks (a tile of 1 sample would otherwise issue 8 samples' instructions).
template <int MB, int NC, int SMAX, typename C, typename Wrow, typename Row, typename Use>
RIMS_HD void columns_fma(C (&acc)[NC][SMAX], int S, int64_t j, const Wrow (&wb)[MB], int m,
                         const Row& row, const Use& use) {
  RIMS_UNROLL
  for (int s = 0; s < SMAX; ++s) {
    if (s >= S) break;
    RIMS_UNROLL
    for (int u = 0; u < MB; ++u) {
      if (u >= m || !use(s, j + u)) continue;
      const C x = row(s, j + u);
      RIMS_UNROLL
      for (int c = 0; c < NC; ++c) acc[c][s] += x * weight_of<C>(wb[u], c);
    }
  }
}

// The product (header comment) for columns col0 .. col0 + nc - 1 (nc <= NC; w points at
// W[0, col0]) and the samples s < S (S <= SMAX) where use(s, j) holds; acc is accumulated into,
// not cleared. Where the group reads as vectors, full batches run without guards and only
// vector loads (the next row's address one add away); the rest (the last rows, or every row of a
// partial or unaligned group) runs as guarded batches choosing the load kind per row. One
// guarded loop for everything issued ~4x the instructions per row at tile 1 (both loads' address
// arithmetic, predicates spilled to registers; sm_90a SASS); a separate copy per load kind
// doubled the build time. Indices into acc are compile-time (unrolled loops) so that it stays in
// registers.
template <int NC, int SMAX, typename C, typename W, typename Row, typename Use>
RIMS_HD void columns_dot(C (&acc)[NC][SMAX], int S, int64_t n, const W* w, int64_t ld, int nc,
                         const Row& row, const Use& use) {
  constexpr int MBV = kVectorBatch<W, SMAX>, MBT = kGuardedBatch<W, SMAX>;
  const bool vec = nc == NC && columns_vectorizable<NC>(w, ld);
  int64_t j = 0;
  if (vec) {
    for (; j + MBV <= n; j += MBV) {
      WeightVec<W, NC> wb[MBV];
      RIMS_UNROLL
      for (int u = 0; u < MBV; ++u, w += ld) wb[u] = load_raw<NC>(w);
      columns_fma(acc, S, j, wb, MBV, row, use);
    }
  }
  for (; j < n; j += MBT, w += MBT * ld) {
    const int m = n - j < MBT ? int(n - j) : MBT;
    C wb[MBT][NC] = {};
    RIMS_UNROLL
    for (int u = 0; u < MBT; ++u)
      if (u < m) load_columns(w + u * ld, vec, nc, wb[u]);
    columns_fma(acc, S, j, wb, m, row, use);
  }
}

// The hoisted input term of the gates (RimSeqDims::xw_hoisted): for the samples s < S where on(s),
//   acc[c][s] += sum_j a(s, j) * X[rowof(s, j), c]   for j = 0 .. nj-1 in ascending order,
// X row-major with row stride ld, x pointing at X[0, col0] of the tile's first sample (rowof
// counts rows from there). Rows differ per sample (each reads its own x_m F), so unlike
// columns_dot no weight row is shared across samples: one vector load per (sample, row), nj of
// them (n_in * M: 1 at the paper layer, against the n_in * Dx rows of F columns_dot reads).
template <int NC, int SMAX, typename C, typename On, typename Coef, typename RowOf>
RIMS_HD void hoisted_input_term(C (&acc)[NC][SMAX], int S, int nj, const C* x, int nc,
                                const On& on, const Coef& a, const RowOf& rowof, int64_t ld) {
  const bool vec = nc == NC && columns_vectorizable<NC>(x, ld);
  RIMS_UNROLL
  for (int s = 0; s < SMAX; ++s) {
    if (s >= S) break;
    if (!on(s)) continue;
    for (int j = 0; j < nj; ++j) {
      C w[NC];
      load_columns(x + rowof(s, j) * ld, vec, nc, w);
      const C coef = a(s, j);
      RIMS_UNROLL
      for (int c = 0; c < NC; ++c) acc[c][s] += coef * w[c];
    }
  }
}

// columns_dot's use() when every sample s < S takes part.
struct EveryRow {
  RIMS_HD bool operator()(int, int64_t) const { return true; }
};

// acc[c][s] = value for every column and sample (the accumulators' start).
template <int NC, int SMAX, typename C>
RIMS_HD void columns_fill(C (&acc)[NC][SMAX], C value) {
  RIMS_UNROLL
  for (int c = 0; c < NC; ++c) {
    RIMS_UNROLL
    for (int s = 0; s < SMAX; ++s) acc[c][s] = value;
  }
}

}  // namespace rims
