// rims_fast::rim_steps_fwd: the stepped forward of one RIM layer (csrc/kernels/rim_step_fwd.cuh),
// four batched GEMMs (five for GRU) and four small kernels per step, the same inputs, outputs and
// saved activations as the persistent rims_fast::rim_seq_fwd (so either rim_seq_bwd or the stepped
// rim_steps_bwd can be its backward). The driver below is shared by the CPU implementation
// (rim_steps_fwd.cpp: the phases as host loops, for tests) and the CUDA one
// (rim_steps_fwd_cuda.cu: the phases as kernels); the GEMMs are
// ATen's (cuBLAS on a GPU). No host synchronisation, no allocation inside the time loop: a CUDA
// graph can capture a whole call.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/rim_step_fwd.cuh"
#include "kernels/rim_step_gates.cuh"
#include "kernels/rim_step_output.cuh"
#include "rim_seq_fwd.h"
#include "step_gemm.h"

namespace rims {

// RIMS_FAST_CUDA_FUSED=1: the stepped forward's products with their pointwise work in the
// epilogue, on tensor cores — the LSTM gate product with the cell (kernels/rim_step_gates.cuh;
// GRU layers keep the GEMMs and the cell kernel) and the output product with the residual
// (kernels/rim_step_output.cuh). Host runs follow it in any dtype, so that CI runs the fused
// kernels' code; the CUDA implementation only for float16/bfloat16 on sm_80+ (Dev::fusion).
struct StepFusion {
  bool cell = false;    // gates + LSTM cell
  bool output = false;  // output product + residual
};
inline StepFusion use_fused(const RimSeqDims& d) {
  const char* v = std::getenv("RIMS_FAST_CUDA_FUSED");
  const std::string s = v == nullptr ? "0" : v;
  TORCH_CHECK(s == "0" || s == "1", "RIMS_FAST_CUDA_FUSED must be 0 or 1, got '", s, "'");
  return s == "1" ? StepFusion{d.lstm, true} : StepFusion{};
}

// W_o (K, cv, H) as the fused output kernel's operand: (K, 32 ceil(H / 32), kd), row j = column
// j of W_o, zero-padded.
inline at::Tensor transposed_output_weight(const at::Tensor& wo, int64_t H, int64_t kd) {
  const int64_t cv = wo.size(1), Hp = mma_round_up(H, kMmaN);
  return at::constant_pad_nd(wo.transpose(1, 2), {0, kd - cv, 0, Hp - H}).contiguous();
}

// [W_hh ; F] (K, R, 4H), R = H + XW, as the fused gates kernel's operand: (K, 4 Hp, kd), row
// 4u + q = column q H + u (gate q of unit u), zero-padded to Hp = H rounded up to kGateUnits units
// and to kd columns.
inline at::Tensor interleaved_gate_weight(const at::Tensor& wg, int64_t H, int64_t kd) {
  const int64_t K = wg.size(0), R = wg.size(1), Hp = mma_round_up(H, kGateUnits);
  at::Tensor w = at::constant_pad_nd(wg.reshape({K, R, 4, H}), {0, Hp - H});  // [k, r, q, u]
  w = at::constant_pad_nd(w.permute({0, 3, 2, 1}), {0, kd - R});            // [k, u, q, r]
  return w.reshape({K, 4 * Hp, kd}).contiguous();
}

// The whole sequence for a prepared call (seq_fwd_prepare; c.res holds the outputs). T: the
// storage type as the phases see it; C: the compute type; Dev runs the phases for one step:
// select(p, t), cell(p, t), comm(p, t), residual(p, t), and the fused kernels gates_cell(p, t),
// output_residual(p, t) where fusion<T>(d) says so.
template <typename C, typename T, class Dev>
void rim_steps_run(SeqFwdCall& c, const Dev& dev) {
  const RimSeqDims& d = c.d;
  const int64_t B = d.B, K = d.K, H = d.H, GH = d.GH, XW = d.n_in * d.Dx;
  rim_steps_check_sizes(d, "rims_fast::rim_steps_fwd: ");
  const int64_t C3 = 2 * d.ck + d.cv;
  const auto so = c.h0.options();    // storage type
  const auto co = c.keys.options();  // compute type
  // The GEMMs' weights in the storage type (for half precision this rounds the fold F once per
  // call, where the persistent kernels keep it in float32).
  const at::Tensor wx = c.w_x.reshape({K, XW, GH}).to(c.h0.scalar_type());
  const at::Tensor wg = d.lstm ? at::cat({c.whh, wx}, 1) : at::Tensor();
  const StepFusion fz = dev.template fusion<T>(d);
  const at::Tensor wgi = fz.cell ? interleaved_gate_weight(wg, H, gate_kd(d)) : at::Tensor();
  const at::Tensor wot =
      fz.output ? transposed_output_weight(c.co, H, output_kd(d)) : at::Tensor();
  const at::Tensor wqkv = at::cat({c.cq, c.ck, c.cv}, -1);
  at::Tensor hx = at::empty({K, B, H + XW}, so), ht_op = at::empty({K, B, H}, so);
  at::Tensor o_op = at::empty({K, B, d.cv}, so);
  at::Tensor q = at::empty({K, B, d.nk}, co);
  at::Tensor g = fz.cell ? at::Tensor() : at::empty({K, B, GH}, co);
  at::Tensor gh = d.lstm ? at::Tensor() : at::empty({K, B, GH}, co);
  at::Tensor qkv = at::empty({K, B, C3}, co);
  at::Tensor y = fz.output ? at::Tensor() : at::empty({K, B, H}, co);
  at::Tensor h = at::empty({B, K, H}, co), cst = d.lstm ? at::empty({B, K, H}, co) : at::Tensor();
  h.copy_(c.h0);
  if (d.lstm) cst.copy_(c.c0);
  hx.narrow(2, 0, H).copy_(c.h0.transpose(0, 1));
  const bool save = c.res[4].numel() > 0;
  // One step's rows of what is otherwise saved (h~, a, b, o): read back within the step.
  std::vector<at::Tensor> scratch;
  if (!save)
    for (int64_t w : {H, d.n_in * d.M, d.n_c * K, d.cv}) scratch.push_back(at::empty({B, K, w}, co));

  RimStepParams<T> p{};
  p.s = seq_fwd_params<T>(c);
  auto mp = [](at::Tensor& t) { return reinterpret_cast<T*>(t.mutable_data_ptr()); };
  p.hx = mp(hx), p.ht_op = mp(ht_op), p.o_op = mp(o_op);
  p.wgi = fz.cell ? static_cast<const T*>(wgi.const_data_ptr()) : nullptr;
  p.wot = fz.output ? static_cast<const T*>(wot.const_data_ptr()) : nullptr;
  p.q = q.const_data_ptr(), p.g = fz.cell ? nullptr : g.const_data_ptr();
  p.gh = d.lstm ? nullptr : gh.const_data_ptr();
  p.qkv = qkv.const_data_ptr(), p.y = fz.output ? nullptr : y.const_data_ptr();
  p.h = h.mutable_data_ptr(), p.c = d.lstm ? cst.mutable_data_ptr() : nullptr;
  if (!save) {
    p.ht = scratch[0].mutable_data_ptr(), p.a = scratch[1].mutable_data_ptr();
    p.bp = scratch[2].mutable_data_ptr(), p.o = scratch[3].mutable_data_ptr();
  }
  const at::Tensor h_op = hx.narrow(2, 0, H), xa_op = hx.narrow(2, H, XW);
  for (int64_t t = 0; t < d.T_; ++t) {
    step_gemm(q, h_op, c.wq);
    dev.template select<C>(p, t);
    if (fz.cell) {
      dev.template gates_cell<C>(p, t);
    } else {
      if (d.lstm) {
        step_gemm(g, hx, wg);
      } else {
        step_gemm(g, xa_op, wx);
        step_gemm(gh, h_op, c.whh);
      }
      dev.template cell<C>(p, t);
    }
    step_gemm(qkv, ht_op, wqkv);
    dev.template comm<C>(p, t);
    if (fz.output) {
      dev.template output_residual<C>(p, t);
    } else {
      step_gemm(y, o_op, c.co);
      dev.template residual<C>(p, t);
    }
  }
  c.res[1].copy_(h);
  if (d.lstm) c.res[2].copy_(cst);
}

#ifdef RIMS_FAST_WITH_CUDA
SeqFwdResult rim_steps_fwd_cuda(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, bool save);
#endif

}  // namespace rims
