// The stepped LSTM forward's gate product and cell in one kernel (RIMS_FAST_CUDA_FUSED=1):
//
//   gates = [h_{t-1} | xa] [W_hh ; F]   then   biases, the masked LSTM update   (rim_step_fwd.cuh)
//
// on tensor cores, instead of a cuBLAS GEMM writing the (K, B, 4H) float32 gates and the cell
// kernel reading them back: one launch fewer per step, and at `large` 8 MB less written and read
// (benchmarks/README.md, "What would cut the stepped forward"). A block owns up to 64 samples,
// one mechanism and up to 8 x 8 hidden units (step_mma.cuh's block product); each warp computes an
// 8 x 32 MMA tile per 8 samples whose 32 columns are the four gates of 8 units (the weight's
// columns are interleaved once per call, column 4u + q = gate q of unit u), so the warp holds
// every gate its units need and runs their cells itself from its staging tile: no gate leaves the
// SM. Each weight is read ceil(B / 64) times per step, not B / 8 times.
//
// Operands: the samples' rows of mechanism k's [h | xa] (the GEMM operand hx, (K, B, H + XW) in
// the storage type), kd = H + XW rounded up to 16 columns; the interleaved weight (K, 4 Hp, kd),
// Hp = H rounded up to 8, zero-padded. float32 accumulation;
// the sums run in 16-wide k-steps in order, so results equal the GEMM path's to float32 rounding,
// not bit for bit (cuBLAS sums in its own order). On the device the product needs float16 or
// bfloat16 storage (WMMA); host runs take any type (the product written out), which is how CI
// checks the tiling, padding, interleaving and epilogue.
#pragma once

#include "rim_step_fwd.cuh"
#include "step_mma.cuh"

namespace rims {

constexpr int kGateUnits = kMmaN / 4;  // hidden units per warp tile (four gates each)

// The product's reduction length: [h | xa] padded to whole k-steps.
RIMS_HD int64_t gate_kd(const RimSeqDims& d) { return mma_round_up(d.H + d.n_in * d.Dx, kMmaK); }
// The grid: a warp tile per 8 units (Hp / 8 per mechanism).
RIMS_HD StepMmaGrid rim_step_gates_grid(const RimSeqDims& d) {
  return StepMmaGrid{d.B, d.K, gate_kd(d), (d.H + kGateUnits - 1) / kGateUnits};
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// Block blk of step t (kStepMmaWarps warps; smem: rim_step_gates_grid's, 256-bit aligned).
template <typename C, typename T, class Exec>
RIMS_HD void rim_step_gates_cell(const Exec& ex, const RimStepParams<T>& p, int64_t t,
                                 int64_t blk, C* smem) {
  const RimSeqFwdParams<T>& d = p.s;
  const int64_t B = d.B, H = d.H, HX = H + d.n_in * d.Dx;
  const StepMmaGrid g = rim_step_gates_grid(d);
  const int kd = static_cast<int>(g.kd);
  const StepMmaGrid::Block at = g.block(blk);
  const int64_t k = at.k;
  const int64_t rows = 4 * g.tiles * kGateUnits;  // the interleaved weight's rows per mechanism
  step_mma_block<T>(
      ex, smem, g, at.sb, p.hx + k * B * HX, HX, HX, p.wgi + k * rows * kd, at.ct0,
      [&](int64_t tile, int64_t bt, const C* st, int lane, int lanes) {
        for (int e = lane; e < kMmaM * kGateUnits; e += lanes) {
          const int64_t s = e / kGateUnits, u = e % kGateUnits, b = bt + s;
          const int64_t j = tile * kGateUnits + u;
          if (b >= B || j >= H) continue;
          const C* g = st + s * kMmaN + 4 * u;  // gate q of unit j at g[q]
          rim_step_cell_unit<C>(p, t, int(b), int(k), int(j), [&](int q) { return g[q]; },
                                [&](int) { return C(0); });
        }
      });
}

}  // namespace rims
