// The stepped forward's communication output product and the residual in one kernel
// (RIMS_FAST_CUDA_FUSED=1):
//
//   y = o W_o   then   h_t = h~ + y on active rows, h~ on inactive ones   (rim_step_fwd.cuh)
//
// on tensor cores (step_mma.cuh's block product: up to 64 samples, one mechanism, 8 tiles of 32
// hidden units per block), the residual, out[t] and the next step's operand row in the epilogue,
// instead of a cuBLAS GEMM writing the (K, B, H) float32 y and the residual kernel reading it back.
// Operands: the samples' rows of mechanism k's dropped read o (o_op, (K, B, cv) in the storage
// type; zero on inactive rows), kd = cv rounded up to 16; W_o transposed and zero-padded once per
// call to (K, 32 ceil(H / 32), kd). float32 accumulation in 16-wide k-steps in order: results
// equal the GEMM path's to float32 rounding. On the device float16/bfloat16 only (WMMA); host runs
// take any type.
#pragma once

#include "rim_step_fwd.cuh"
#include "step_mma.cuh"

namespace rims {

// The product's reduction length: cv padded to whole k-steps.
RIMS_HD int64_t output_kd(const RimSeqDims& d) { return mma_round_up(d.cv, kMmaK); }
// The grid: a warp tile per 32 hidden units.
RIMS_HD StepMmaGrid rim_step_output_grid(const RimSeqDims& d) {
  return StepMmaGrid{d.B, d.K, output_kd(d), (d.H + kMmaN - 1) / kMmaN};
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// Block blk of step t (kStepMmaWarps warps; smem: rim_step_output_grid's, 256-bit aligned).
template <typename C, typename T, class Exec>
RIMS_HD void rim_step_output_residual(const Exec& ex, const RimStepParams<T>& p, int64_t t,
                                      int64_t blk, C* smem) {
  const RimSeqFwdParams<T>& d = p.s;
  const int64_t B = d.B, H = d.H, cv = d.cv;
  const StepMmaGrid g = rim_step_output_grid(d);
  const int kd = static_cast<int>(g.kd);
  const StepMmaGrid::Block at = g.block(blk);
  const int64_t k = at.k;
  step_mma_block<T>(
      ex, smem, g, at.sb, p.o_op + k * B * cv, cv, cv, p.wot + k * g.tiles * kMmaN * kd, at.ct0,
      [&](int64_t ct, int64_t bt, const C* st, int lane, int lanes) {
        for (int e = lane; e < kMmaM * kMmaN; e += lanes) {
          const int64_t b = bt + e / kMmaN, j = ct * kMmaN + e % kMmaN;
          if (b >= B || j >= H) continue;
          rim_step_residual_unit<C>(p, t, int(b), int(k), int(j), [&] { return st[e]; });
        }
      });
}

}  // namespace rims
