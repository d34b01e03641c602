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
// Blocks a grid should have before its blocks take several row tiles: the kernels' registers
// allow one 256-thread block per SM, and a warp's row tiles run one after another, so a small
// grid is a latency chain (H100, 2026-11-27b: 8 row tiles in 12 blocks at `paper` took 56 us a
// step for the gates). 128 is about one wave on an H100 (132 SMs); where the batch gives more,
// row tiles go up to kStepMmaRowTiles, so each weight is read once per 64 samples (`large`).
constexpr int64_t kStepMmaTargetBlocks = 128;
// Operand elements each thread loads before it stores any while staging (loads in flight).
constexpr int kStepMmaStageLoads = 16;

// A fused kernel's grid, for a product of reduction length kd and `tiles` 32-column warp tiles
// per mechanism over a batch of B samples: sample blocks x K mechanisms x column blocks of
// kStepMmaWarps warp tiles. Block blk is (sample block blk / (K per_mech), mechanism
// blk / per_mech % K, column block blk % per_mech). Which rows a block takes does not change any
// sum (each is over kd in order), so the row tiles per block are free to choose.
struct StepMmaGrid {
  int64_t B, K, kd, tiles;
  int64_t target = kStepMmaTargetBlocks;  // (host tests lower it to reach more row tiles)
  RIMS_HD int64_t per_mech() const { return (tiles + kStepMmaWarps - 1) / kStepMmaWarps; }
  // 8-sample row tiles per block, for a storage type of tb bytes: as many as keep the grid at
  // `target` blocks or more, at most kStepMmaRowTiles, the batch's, and what the
  // staging budget holds of kd-element rows; at least one (wider still fails the launch, which
  // names the bytes).
  RIMS_HD int64_t row_tiles(int64_t tb) const {
    const int64_t all = (B + kMmaM - 1) / kMmaM;
    int64_t n = all * K * per_mech() / target;
    const int64_t fit = kStepMmaStageBytes / (kMmaM * kd * tb);
    if (n > kStepMmaRowTiles) n = kStepMmaRowTiles;
    if (n > all) n = all;
    if (n > fit) n = fit;
    return n > 1 ? n : 1;
  }
  // Blocks along the batch.
  RIMS_HD int64_t sample_blocks(int64_t tb) const {
    const int64_t rows = kMmaM * row_tiles(tb);
    return (B + rows - 1) / rows;
  }
  RIMS_HD int64_t blocks(int64_t tb) const { return sample_blocks(tb) * K * per_mech(); }
  // Where block blk works: its sample block, mechanism and first warp tile (step_mma_block's ct0).
  struct Block {
    int64_t sb, k, ct0;
  };
  RIMS_HD Block block(int64_t blk) const {
    const int64_t per = per_mech();
    return Block{blk / (K * per), blk / per % K, blk % per * kStepMmaWarps};
  }
  // Shared memory in compute-type elements (cb bytes each): the warps' 8 x 32 staging tiles,
  // then the operand tile in the storage type. The staging area's size keeps the operand tile
  // 256-bit aligned when the base is.
  RIMS_HD int64_t smem_elems(int64_t cb, int64_t tb) const {
    const int64_t rows = kMmaM * row_tiles(tb);
    return kStepMmaWarps * kMmaM * kMmaN + (rows * kd * tb + cb - 1) / cb;
  }
};

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// A[r, j] = a[(b0 + r) lda + j] for r < rows, j < kd; zero past the batch (b0 + r >= B) and past
// `width`. The staging is latency-bound (a block's rows are up to 96 KB read from L2 once), so
// loads go out together: contiguous full rows as one block copy (16-byte loads where aligned),
// otherwise kStepMmaStageLoads loads per thread, coalesced across the warp, before their stores.
template <typename T, typename C, class Exec>
RIMS_HD void step_mma_stage(const Exec& ex, T* A, const T* a, int64_t lda, int64_t width,
                            int64_t B, int64_t b0, int rows, int kd) {
  const int64_t full = B - b0 < rows ? B - b0 : rows;  // rows inside the batch
  if (width == kd && lda == kd) {
    const int zeros = (rows - static_cast<int>(full)) * kd;
    T* tail = A + full * kd;
    if (zeros > 0)
      ex.parallel_for(zeros, [&](int e) { from_c(C(0), tail + e); });
    ex.copy(A, a + b0 * lda, full * kd);
    return;
  }
  const int n = rows * kd, G = (n + kStepMmaStageLoads - 1) / kStepMmaStageLoads;
  const int gr = G / kd, gc = G % kd;  // G as rows and columns: the index steps without division
  ex.parallel_for(G, [&](int i) {
    C v[kStepMmaStageLoads];
    int r = i / kd, j = i % kd;
    RIMS_UNROLL_ALL
    for (int u = 0; u < kStepMmaStageLoads; ++u) {
      v[u] = r < full && j < width ? to_c(a[(b0 + r) * lda + j]) : C(0);
      r += gr;
      j += gc;
      if (j >= kd) j -= kd, ++r;
    }
    RIMS_UNROLL_ALL
    for (int u = 0; u < kStepMmaStageLoads; ++u)
      if (i + u * G < n) from_c(v[u], A + i + u * G);
  });
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// Sample block sb of grid g (header comment). smem: g.smem_elems, 256-bit aligned; the block has
// kStepMmaWarps warps.
template <typename T, typename C, class Exec, class Tile>
RIMS_HD void step_mma_block(const Exec& ex, C* smem, const StepMmaGrid& g, int64_t sb,
                            const T* a, int64_t lda, int64_t width, const T* W, int64_t ct0,
                            const Tile& tile) {
  const int64_t B = g.B, ntiles = g.tiles;
  const int kd = static_cast<int>(g.kd);
  const int sr = static_cast<int>(g.row_tiles(sizeof(T)));
  const int64_t b0 = sb * kMmaM * sr;
  // This block's row tiles (the last block's may be fewer).
  const int nr = static_cast<int>(B - b0 < kMmaM * sr ? (B - b0 + kMmaM - 1) / kMmaM : sr);
  C* stage = smem;
  T* A = reinterpret_cast<T*>(smem + kStepMmaWarps * kMmaM * kMmaN);
  step_mma_stage<T, C>(ex, A, a, lda, width, B, b0, kMmaM * nr, kd);
  ex.warp_for(kStepMmaWarps, [&](int w, int warp, int lane, int lanes) {
    const int64_t ct = ct0 + w;
    if (ct >= ntiles) return;  // warp-uniform: the last block's spare warps
    MmaTile8x32<T, C> acc[kStepMmaRowTiles];
    RIMS_UNROLL_ALL
    for (int r = 0; r < kStepMmaRowTiles; ++r) acc[r].zero();
    const T* wt = W + ct * kMmaN * kd;
    if (mma_tile_lane(lane)) {  // host lanes: lane 0 alone (mma_tile_lane)
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
    }
    C* st = stage + warp * kMmaM * kMmaN;
    RIMS_UNROLL_ALL
    for (int r = 0; r < kStepMmaRowTiles; ++r) {
      if (r >= nr) break;
      if (mma_tile_lane(lane)) acc[r].store(st, kMmaN);
      ex.syncwarp();
      tile(ct, b0 + r * kMmaM, static_cast<const C*>(st), lane, lanes);
      ex.syncwarp();  // the stage is rewritten for the next row tile
    }
  });
}

}  // namespace rims
