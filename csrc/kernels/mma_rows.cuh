// The persistent kernels' tensor-core products: for every mechanism k of a tile,
//   out(s, k, col, (A_k W_k)[s, col])   for the tile's samples s < S and columns col < n_valid,
// where A_k (the tile's rows of one activation or gradient, rounded to the storage type) is packed
// in shared memory and W_k (a weight, zero-padded and transposed once per call: (n, kd) per
// mechanism, the column-major operand of mma_tile.cuh) is read from global memory / L2.
//
// Layout of the operand tile A (storage type): mechanism k's rows start at row k * S_l (S_l: the
// call's tile size, >= this tile's S) with leading dimension kd; a WMMA A fragment reads 8 rows,
// so rows S..7 of mechanism k are the next mechanism's (or the 8 - S_l zeroed rows after the last
// one): they only feed output rows s >= S, which are discarded. So the tile costs (K S_l + 8 - S_l)
// rows, not K * 8.
// Products: one warp per (k, 32 columns) stores its 8 x 32 accumulator tile in its own staging
// area (kSeqWarps of them), then its lanes hand the valid elements to `out` (fused epilogues: bias,
// residual, masking, saving), so no K x 8 x n accumulator array exists.
#pragma once

#include <cstdint>

#include "mma_tile.cuh"
#include "storage_types.cuh"

#if defined(__CUDACC__)
#define RIMS_UNROLL_ALL _Pragma("unroll")
#else
#define RIMS_UNROLL_ALL
#endif

namespace rims {

// Warps per thread block of the persistent kernels (the launchers use 32 * kSeqWarps threads).
constexpr int kSeqWarps = 8;

// k-steps (of 16) whose operands a warp loads together before their products: the paper layer's
// widest product (the gates, 176 rows) takes 2 rounds of loads, the others 1.
constexpr int kMmaBatch = 4;

RIMS_HD int64_t mma_round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Compute-type elements of the tensor-core scratch: the warps' staging tiles, then the operand
// tile of (K S_l + 8 - S_l) rows of width ma in the storage type (op_bytes per element).
// Rows of the operand tile: K mechanisms of S_l rows, plus the 8 - S_l that the last
// mechanism's fragments read past its own.
RIMS_HD int64_t mma_operand_rows(int64_t K, int64_t S_l) { return K * S_l + kMmaM - S_l; }

RIMS_HD int64_t mma_smem_elems(int64_t K, int64_t S_l, int64_t ma, int64_t op_bytes,
                               int64_t c_bytes) {
  return kSeqWarps * kMmaM * kMmaN +
         (mma_operand_rows(K, S_l) * ma * op_bytes + c_bytes - 1) / c_bytes;
}

// The scratch carved from the start of a kernel's shared memory (256-bit aligned there; the
// staging area's size keeps the operand tile aligned too).
template <typename C, typename T>
struct MmaSmem {
  C* stage = nullptr;
  T* aop = nullptr;
  RIMS_HD explicit MmaSmem(C* base)
      : stage(base), aop(reinterpret_cast<T*>(base + kSeqWarps * kMmaM * kMmaN)) {}
};

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// Zeroes the operand tile once per kernel: rows no pack writes (past the last tile's S) feed only
// discarded outputs, but zeros keep every run's tile deterministic.
template <typename C, typename T, class Exec>
RIMS_HD void mma_clear(const Exec& ex, const MmaSmem<C, T>& sm, int K, int S_l, int ma) {
  ex.parallel_for(int(mma_operand_rows(K, S_l)) * ma, [&](int i) { from_c(C(0), sm.aop + i); });
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// A's rows (k, s) = value(s, k, j) for the tile's samples s < S, 0 <= j < kd (value returns 0 for
// padding columns).
template <typename C, typename T, class Exec, class F>
RIMS_HD void mma_pack(const Exec& ex, int K, int S, int S_l, int kd, T* A, const F& value) {
  ex.parallel_for(K * S * kd, [&](int i) {
    const int j = i % kd, s = (i / kd) % S, k = i / (kd * S);
    from_c(value(s, k, j), A + (k * S_l + s) * kd + j);
  });
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// The products (header comment). W: (K, n, kd), each mechanism's (kd, n) matrix zero-padded and
// transposed, kd a multiple of 16 and n of 32, so every fragment pointer is 256-bit aligned; A as
// packed by mma_pack with the same kd.
// The products as tiles: tile(k, n0, st, lane, lanes) gets each warp's 8 x 32 result tile (columns
// n0..n0+31 of mechanism k, row-major in the warp's staging area st) and runs with the warp's
// lanes (host: one lane, or 32 emulated ones), which must split the tile's work between them.
template <typename T, typename C, class Exec, class Tile>
RIMS_HD void mma_tiles(const Exec& ex, const MmaSmem<C, T>& sm, int K, int S_l, const T* W,
                       int kd, int n, const Tile& tile) {
  const int ntile = n / kMmaN;
  ex.warp_for(K * ntile, [&](int i, int warp, int lane, int lanes) {
    const int k = i / ntile, n0 = (i % ntile) * kMmaN;
    C* st = sm.stage + warp * kMmaM * kMmaN;
    if (mma_tile_lane(lane)) {
      MmaTile8x32<T, C> t;
      t.zero();
      const T* a = sm.aop + k * S_l * kd;
      const T* w = W + (int64_t(k) * n + n0) * kd;  // column n0 of mechanism k's (n, kd)
      // kMmaBatch steps' loads (the weights from L2) issue before their products; the same steps
      // in the same order as one at a time.
      for (int j0 = 0; j0 < kd; j0 += kMmaK * kMmaBatch) {
        MmaOperands<T, kMmaBatch> ops;
        RIMS_UNROLL_ALL
        for (int u = 0; u < kMmaBatch; ++u) {
          const int j = j0 + u * kMmaK;
          if (j < kd) ops.load(u, a + j, kd, w + j, kd);
        }
        RIMS_UNROLL_ALL
        for (int u = 0; u < kMmaBatch; ++u)
          if (j0 + u * kMmaK < kd) t.mma(ops, u);
      }
      t.store(st, kMmaN);
    }
    ex.syncwarp();
    tile(k, n0, static_cast<const C*>(st), lane, lanes);
    ex.syncwarp();  // the stage is rewritten by this warp's next item
  });
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// The products element by element: out(s, k, col, v) for the tile's samples s < S and columns
// col < n_valid.
template <typename T, typename C, class Exec, class Out>
RIMS_HD void mma_rows(const Exec& ex, const MmaSmem<C, T>& sm, int K, int S, int S_l,
                      const T* W, int kd, int n, int n_valid, const Out& out) {
  mma_tiles(ex, sm, K, S_l, W, kd, n, [&](int k, int n0, const C* st, int lane, int lanes) {
    for (int e = lane; e < kMmaM * kMmaN; e += lanes) {
      const int s = e / kMmaN, col = n0 + e % kMmaN;
      if (s < S && col < n_valid) out(s, k, col, st[e]);
    }
  });
}

}  // namespace rims
