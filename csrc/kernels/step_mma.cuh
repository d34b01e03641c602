// The block product of the stepped forward's fused kernels (rim_step_gates.cuh: the gates and the
// LSTM cell; rim_step_output.cuh: the communication output and the residual): for one mechanism,
//
//   (A W)[b, n]   for the block's samples b0 <= b < b0 + 8 nr and its column tiles,
//
// A the samples' rows of a GEMM operand (storage type, row stride lda, `width` valid columns),
// staged in shared memory as an (8 nr) x kd tile zero-padded past the batch and past `width`; W the
// mechanism's weight, transposed and zero-padded once per call to (32 ntiles, kd), the column-major
// B operand of mma_tile.cuh, read from global memory. Warp w computes column tile ct0 + w (if it
// exists) for each 8-sample row tile, float32 accumulation over kd in 16-wide k-steps in order, and
// hands each 8 x 32 result to tile(ct, b, st, lane, lanes): rows b .. b + 7 (some may be >= B),
// columns 32 ct .. 32 ct + 31, row-major in the warp's staging area st. k-steps go in batches of
// kMmaBatch, each batch's products for every row tile in turn: a weight fragment comes from L2 for
// the first row tile and from L1 for the others (8 warps x 4 steps x 1 KB a batch), so a block
// reads each weight once for up to 64 samples.
#pragma once

#include <cstdint>

#include "mma_rows.cuh"  // kMmaBatch, mma_round_up, RIMS_UNROLL_ALL, MmaTile8x32

namespace rims {

constexpr int kStepMmaWarps = 8;     // warps per block (the stepped ops' 256-thread blocks)
constexpr int kStepMmaRowTiles = 8;  // most 8-sample row tiles per block
// Most bytes of staged operand rows per block: fits an A100's 163 KB of shared memory per block
// with the staging tiles, so very wide operands (kd over ~1000 in 16-bit types) take fewer row
// tiles instead of failing the launch. `large` (kd = 768, bf16: 96 KB for 8 tiles) is under it.
constexpr int64_t kStepMmaStageBytes = 128 * 1024;

// 8-sample row tiles per block: the batch's, up to kStepMmaRowTiles and the staging budget for
// operand rows of kd elements of tb bytes (at least one: wider still fails the launch, which
// names the bytes). Which rows a block takes does not change any sum (each is over kd in order).
RIMS_HD int64_t step_mma_row_tiles(int64_t B, int64_t kd, int64_t tb) {
  int64_t n = (B + kMmaM - 1) / kMmaM;
  const int64_t fit = kStepMmaStageBytes / (kMmaM * kd * tb);
  if (n > kStepMmaRowTiles) n = kStepMmaRowTiles;
  if (n > fit) n = fit;
  return n > 1 ? n : 1;
}
// Blocks along the batch.
RIMS_HD int64_t step_mma_sample_blocks(int64_t B, int64_t kd, int64_t tb) {
  const int64_t rows = kMmaM * step_mma_row_tiles(B, kd, tb);
  return (B + rows - 1) / rows;
}
// Shared memory in compute-type elements (cb bytes each): the warps' 8 x 32 staging tiles, then
// the operand tile in the storage type (tb bytes each). The staging area's size keeps the operand
// tile 256-bit aligned when the base is.
RIMS_HD int64_t step_mma_smem_elems(int64_t B, int64_t kd, int64_t cb, int64_t tb) {
  const int64_t rows = kMmaM * step_mma_row_tiles(B, kd, tb);
  return kStepMmaWarps * kMmaM * kMmaN + (rows * kd * tb + cb - 1) / cb;
}

// A fused kernel's grid: sample blocks x K mechanisms x column blocks of kStepMmaWarps warp
// tiles, for a product of reduction length kd and `tiles` 32-column warp tiles per mechanism.
// Block blk is (sample block blk / (K per_mech), mechanism blk / per_mech % K, column block
// blk % per_mech).
struct StepMmaGrid {
  int64_t B, K, kd, tiles;
  RIMS_HD int64_t per_mech() const { return (tiles + kStepMmaWarps - 1) / kStepMmaWarps; }
  // tb: bytes of the storage type; cb: of the compute type.
  RIMS_HD int64_t blocks(int64_t tb) const {
    return step_mma_sample_blocks(B, kd, tb) * K * per_mech();
  }
  RIMS_HD int64_t smem_elems(int64_t cb, int64_t tb) const {
    return step_mma_smem_elems(B, kd, cb, tb);
  }
};

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// Sample block sb of the batch (header comment). smem: step_mma_smem_elems, 256-bit aligned; the
// block has kStepMmaWarps warps.
template <typename T, typename C, class Exec, class Tile>
RIMS_HD void step_mma_block(const Exec& ex, C* smem, int64_t B, int64_t sb, const T* a,
                            int64_t lda, int64_t width, const T* W, int kd, int64_t ct0,
                            int64_t ntiles, const Tile& tile) {
  const int sr = static_cast<int>(step_mma_row_tiles(B, kd, sizeof(T)));
  const int64_t b0 = sb * kMmaM * sr;
  // This block's row tiles (the last block's may be fewer).
  const int nr = static_cast<int>(B - b0 < kMmaM * sr ? (B - b0 + kMmaM - 1) / kMmaM : sr);
  C* stage = smem;
  T* A = reinterpret_cast<T*>(smem + kStepMmaWarps * kMmaM * kMmaN);
  ex.parallel_for(kMmaM * nr * kd, [&](int e) {
    const int64_t b = b0 + e / kd, j = e % kd;
    from_c(b < B && j < width ? to_c(a[b * lda + j]) : C(0), A + e);
  });
  ex.warp_for(kStepMmaWarps, [&](int w, int warp, int lane, int lanes) {
    const int64_t ct = ct0 + w;
    if (ct >= ntiles) return;  // warp-uniform: the last block's spare warps
    MmaTile8x32<T, C> acc[kStepMmaRowTiles];
    RIMS_UNROLL_ALL
    for (int r = 0; r < kStepMmaRowTiles; ++r) acc[r].zero();
    const T* wt = W + ct * kMmaN * kd;
    for (int j0 = 0; j0 < kd; j0 += kMmaK * kMmaBatch) {
      RIMS_UNROLL_ALL
      for (int r = 0; r < kStepMmaRowTiles; ++r) {
        if (r >= nr) break;  // warp-uniform
        MmaOperands<T, kMmaBatch> ops;
        RIMS_UNROLL_ALL
        for (int u = 0; u < kMmaBatch; ++u) {
          const int j = j0 + u * kMmaK;
          if (j < kd) ops.load(u, A + r * kMmaM * kd + j, kd, wt + j, kd);
        }
        RIMS_UNROLL_ALL
        for (int u = 0; u < kMmaBatch; ++u)
          if (j0 + u * kMmaK < kd) acc[r].mma(ops, u);
      }
    }
    C* st = stage + warp * kMmaM * kMmaN;
    RIMS_UNROLL_ALL
    for (int r = 0; r < kStepMmaRowTiles; ++r) {
      if (r >= nr) break;
      acc[r].store(st, kMmaN);
      ex.syncwarp();
      tile(ct, b0 + r * kMmaM, static_cast<const C*>(st), lane, lanes);
      ex.syncwarp();  // the stage is rewritten for the next row tile
    }
  });
}

}  // namespace rims
