// The stepped LSTM forward's gate product and cell in one kernel (RIMS_FAST_CUDA_FUSED_CELL=1):
//
//   gates = [h_{t-1} | xa] [W_hh ; F]   then   biases, the masked LSTM update   (rim_step_fwd.cuh)
//
// on tensor cores, instead of a cuBLAS GEMM writing the (K, B, 4H) float32 gates and the cell
// kernel reading them back: one launch fewer per step, and at `large` 8 MB less written and read
// (benchmarks/README.md, "What would cut the stepped forward"). A block owns a tile of up to 64
// samples (gate_row_tiles x 8), one mechanism and up to kGateWarps x 8 hidden units; each warp
// computes an 8 x 32 MMA tile per 8 samples whose 32 columns are the four gates of 8 units (the
// weight's columns are interleaved once per call, column 4u + q = gate q of unit u), so the warp
// holds every gate its units need and runs their cells itself from its staging tile: no gate
// leaves the SM. A weight fragment serves all the block's samples (loaded from L2 for the first
// 8, from L1 for the rest), so each weight is read ceil(B / 64) times per step, not B / 8 times.
//
// Operands: the tile's rows of mechanism k's [h | xa] (the GEMM operand hx, (K, B, H + XW) in the
// storage type) staged in shared memory, zero-padded to kd = H + XW rounded up to 16 columns and
// past the batch; the interleaved weight (K, 4 Hp, kd), Hp = H rounded up to 8, zero-padded, read
// from global memory as the column-major B operand (mma_tile.cuh). float32 accumulation;
// the sums run in 16-wide k-steps in order, so results equal the GEMM path's to float32 rounding,
// not bit for bit (cuBLAS sums in its own order). On the device the product needs float16 or
// bfloat16 storage (WMMA); host runs take any type (the product written out), which is how CI
// checks the tiling, padding, interleaving and epilogue.
#pragma once

#include "mma_rows.cuh"  // kMmaBatch, mma_round_up, RIMS_UNROLL_ALL
#include "rim_step_fwd.cuh"

namespace rims {

constexpr int kGateUnits = kMmaN / 4;  // hidden units per warp tile (four gates each)
constexpr int kGateWarps = 8;          // warps per block (the stepped ops' 256-thread blocks)
constexpr int kGateRowTiles = 8;       // most 8-sample row tiles per block

// The product's reduction length: [h | xa] padded to whole k-steps.
RIMS_HD int64_t gate_kd(const RimSeqDims& d) { return mma_round_up(d.H + d.n_in * d.Dx, kMmaK); }
// 8-sample row tiles per block: the batch's, up to kGateRowTiles.
RIMS_HD int64_t gate_row_tiles(const RimSeqDims& d) {
  const int64_t n = (d.B + kMmaM - 1) / kMmaM;
  return n < kGateRowTiles ? n : kGateRowTiles;
}
// Warp tiles per mechanism (Hp / 8) and blocks per (sample tile, mechanism).
RIMS_HD int64_t gate_unit_tiles(const RimSeqDims& d) { return (d.H + kGateUnits - 1) / kGateUnits; }
RIMS_HD int64_t gate_blocks_per_mech(const RimSeqDims& d) {
  return (gate_unit_tiles(d) + kGateWarps - 1) / kGateWarps;
}
// The grid: sample tiles x mechanisms x unit blocks.
RIMS_HD int64_t rim_step_gates_blocks(const RimSeqDims& d) {
  const int64_t rows = kMmaM * gate_row_tiles(d);
  return (d.B + rows - 1) / rows * d.K * gate_blocks_per_mech(d);
}
// Shared memory in compute-type elements: the warps' 8 x 32 staging tiles (C), then the operand
// tile, gate_row_tiles x 8 rows of kd in the storage type (tb bytes each). The staging area's size
// keeps the operand tile 256-bit aligned when the base is.
RIMS_HD int64_t rim_step_gates_smem_elems(const RimSeqDims& d, int64_t cb, int64_t tb) {
  const int64_t rows = kMmaM * gate_row_tiles(d);
  return kGateWarps * kMmaM * kMmaN + (rows * gate_kd(d) * tb + cb - 1) / cb;
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// Block blk of step t (one block of kGateWarps warps; smem: rim_step_gates_smem_elems, 256-bit
// aligned).
template <typename C, typename T, class Exec>
RIMS_HD void rim_step_gates_cell(const Exec& ex, const RimStepParams<T>& p, int64_t t,
                                 int64_t blk, C* smem) {
  const RimSeqFwdParams<T>& d = p.s;
  const int64_t B = d.B, K = d.K, H = d.H, HX = H + d.n_in * d.Dx;
  const int kd = static_cast<int>(gate_kd(d)), sr = static_cast<int>(gate_row_tiles(d));
  const int64_t per_k = gate_blocks_per_mech(d), tiles = gate_unit_tiles(d);
  const int64_t b0 = blk / (K * per_k) * (kMmaM * sr), k = blk / per_k % K, ub = blk % per_k;
  // This block's row tiles (the last block's may be fewer).
  const int nr = static_cast<int>(B - b0 < kMmaM * sr ? (B - b0 + kMmaM - 1) / kMmaM : sr);
  const int64_t rows = 4 * tiles * kGateUnits;  // the interleaved weight's rows per mechanism
  C* stage = smem;
  T* A = reinterpret_cast<T*>(smem + kGateWarps * kMmaM * kMmaN);
  ex.parallel_for(kMmaM * nr * kd, [&](int e) {
    const int64_t b = b0 + e / kd, j = e % kd;
    from_c(b < B && j < HX ? to_c(p.hx[(k * B + b) * HX + j]) : C(0), A + e);
  });
  ex.warp_for(kGateWarps, [&](int w, int warp, int lane, int lanes) {
    const int64_t tile = ub * kGateWarps + w;
    if (tile >= tiles) return;  // warp-uniform: the last block's spare warps
    MmaTile8x32<T, C> acc[kGateRowTiles];
    RIMS_UNROLL_ALL
    for (int r = 0; r < kGateRowTiles; ++r) acc[r].zero();
    const T* wt = p.wgi + (k * rows + tile * kMmaN) * kd;
    // k-steps in batches of kMmaBatch, each batch's products for every row tile in turn: the
    // weight fragments come from L2 for the first row tile and from L1 for the others (a batch's
    // 8 warps x 4 steps x 1 KB fit), the same sums in the same order as one tile at a time.
    for (int j0 = 0; j0 < kd; j0 += kMmaK * kMmaBatch) {
      RIMS_UNROLL_ALL
      for (int r = 0; r < kGateRowTiles; ++r) {
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
    for (int r = 0; r < kGateRowTiles; ++r) {
      if (r >= nr) break;
      acc[r].store(st, kMmaN);
      ex.syncwarp();
      for (int e = lane; e < kMmaM * kGateUnits; e += lanes) {
        const int64_t s = e / kGateUnits, u = e % kGateUnits, b = b0 + r * kMmaM + s;
        const int64_t j = tile * kGateUnits + u;
        if (b >= B || j >= H) continue;
        const C* g = st + s * kMmaN + 4 * u;  // gate q of unit j at g[q]
        rim_step_cell_unit<C>(p, t, b * K + k, j, [&](int64_t col) { return g[col / H]; },
                              [&](int64_t) { return C(0); });
      }
      ex.syncwarp();  // the stage is rewritten for the next row tile
    }
  });
}

}  // namespace rims
