// rims_fast::rim_steps_bwd: the stepped backward of one RIM layer (csrc/kernels/rim_step_bwd.cuh),
// four batched GEMMs and four small kernels per step in reverse time, the same inputs and outputs
// as the persistent rims_fast::rim_seq_bwd (the per-step gradients the caller's weight-gradient
// GEMMs read). The driver is shared by the CPU implementation (rim_steps_bwd.cpp: host loops, for
// tests) and the CUDA one (rim_steps_bwd_cuda.cu); the GEMMs are ATen's (cuBLAS on a GPU).
#pragma once

#include <ATen/ATen.h>

#include "kernels/rim_step_bwd.cuh"
#include "rim_seq_fwd.h"
#include "step_gemm.h"

namespace rims {

// The whole reverse sweep for a prepared call (seq_bwd_prepare; c.res holds the outputs). w_x:
// the forward's input-term matrix F (K, n_in, Dx, G*H), compute type. T: the storage type as the
// phases see it; C: the compute type; Dev runs the phases: init(p), comm_bwd(p, t),
// cell_bwd(p, t), select_bwd(p, t), dh_final(p, t).
template <typename C, typename T, class Dev>
void rim_steps_bwd_run(SeqBwdCall& c, const at::Tensor& w_x, const Dev& dev) {
  const RimSeqDims& d = c.d;
  const int64_t B = d.B, K = d.K, H = d.H, GH = d.GH, GW = d.lstm ? GH : 2 * GH;
  rim_steps_check_sizes(d, "rims_fast::rim_steps_bwd: ");
  const int64_t XW = d.n_in * d.Dx, C3 = 2 * d.ck + d.cv, nk = d.nk;
  const auto so = c.wt[1].options();  // storage type
  const auto co = c.keys.options();   // compute type
  // The GEMMs' weights, transposed, in the storage type: comm_output^T (K, H, cv),
  // [c_q | c_k | c_v]^T (K, C3, H), F^T (K, GH, XW), [W_hh^T ; W_q^T] (K, GH + nk, H).
  const at::Tensor& w_out = c.wt[3];
  const at::Tensor& w_qkv = c.wt[2];
  const at::Tensor w_f = w_x.reshape({K, XW, GH}).transpose(1, 2).to(so.dtype()).contiguous();
  const at::Tensor w_h = at::cat({c.wt[1], c.wt[0]}, 1);
  at::Tensor dhp_op = at::empty({K, B, H}, so), dqkv_op = at::empty({K, B, C3}, so);
  at::Tensor dg_op = at::empty({K, B, GW + nk}, so);
  at::Tensor dout = at::empty({K, B, d.cv}, co), dht = at::empty({K, B, H}, co);
  at::Tensor dxa = at::empty({K, B, XW}, co), dhprev = at::empty({K, B, H}, co);
  at::Tensor dh = at::empty({B, K, H}, co), dc = d.lstm ? at::empty({B, K, H}, co) : at::Tensor();
  at::Tensor direct = at::empty({B, K, H}, co), dsc = at::empty({B, K, d.n_c * K}, co);
  at::Tensor dsi = at::empty({B, K, d.n_in * d.M}, co);
  at::Tensor dsi_part = at::empty({B, K, d.n_in * d.M * kDotChunks}, co);

  RimStepBwdParams<T> p{};
  p.s = seq_bwd_params<T>(c);
  auto mp = [](at::Tensor& t) { return reinterpret_cast<T*>(t.mutable_data_ptr()); };
  p.dhp_op = mp(dhp_op), p.dqkv_op = mp(dqkv_op), p.dg_op = mp(dg_op);
  p.dout = dout.const_data_ptr(), p.dht = dht.const_data_ptr();
  p.dxa = dxa.const_data_ptr(), p.dhprev = dhprev.const_data_ptr();
  p.dh = dh.mutable_data_ptr(), p.dc = d.lstm ? dc.mutable_data_ptr() : nullptr;
  p.direct = direct.mutable_data_ptr(), p.dsc = dsc.mutable_data_ptr();
  p.dsi = dsi.mutable_data_ptr();
  p.dsi_part = dsi_part.mutable_data_ptr();
  const at::Tensor dgi_op = dg_op.narrow(2, 0, GH), dgh_dq_op = dg_op.narrow(2, GW - GH, GH + nk);
  dev.template init<C>(p);
  for (int64_t t = d.T_ - 1; t >= 0; --t) {
    step_gemm(dout, dhp_op, w_out);
    dev.template comm_bwd<C>(p, t);
    step_gemm(dht, dqkv_op, w_qkv);
    dev.template cell_bwd<C>(p, t);
    step_gemm(dxa, dgi_op, w_f);
    dev.template select_bwd<C>(p, t);
    step_gemm(dhprev, dgh_dq_op, w_h);
    dev.template dh_final<C>(p, t);
  }
  c.res[2].copy_(dh);
  if (d.lstm) c.res[3].copy_(dc);
}

#ifdef RIMS_FAST_WITH_CUDA
SeqBwdResult rim_steps_bwd_cuda(
    const std::optional<at::Tensor>& g_out, const std::optional<at::Tensor>& g_hn,
    const std::optional<at::Tensor>& g_cn, const at::Tensor& keys, const at::Tensor& xsrc,
    const at::Tensor& w_x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& input_query, const at::Tensor& weight_hh, const at::Tensor& bias_ih,
    const at::Tensor& bias_hh, const at::Tensor& comm_query, const at::Tensor& comm_key,
    const at::Tensor& comm_value, const at::Tensor& comm_output, const at::Tensor& masks,
    at::TensorList saved, int64_t top_k, int64_t input_heads, int64_t comm_heads, bool per_head,
    double input_dropout, double comm_dropout, int64_t seed, bool block_inactive_grad);
#endif

}  // namespace rims
