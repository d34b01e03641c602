// rims_fast::rim_seq_fwd / rim_seq_bwd: the persistent whole-sequence forward and backward
// (csrc/kernels/rim_seq_fwd.cuh, rim_seq_bwd.cuh).
// Schema, argument checks and the CPU implementation (the kernel's tile function run on the host,
// for tests) are in rim_seq_fwd.cpp; the CUDA launcher in rim_seq_fwd_cuda.cu.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "kernels/rim_seq_bwd.cuh"
#include "kernels/rim_seq_fwd.cuh"

namespace rims {

// The largest tile (samples per thread block) the kernel's accumulators hold.
constexpr int kSeqTileMax = 8;

// out, h_n, c_n, masks, then the 9 saved activations (empty unless save).
using SeqFwdResult = std::vector<at::Tensor>;
// d keys, d xsrc, d h0, d c0, then the histories dq, d gates, d Q|K|V, dh', xa.
using SeqBwdResult = std::vector<at::Tensor>;

// The saved activations' widths, in the order of RimSeqFwdParams::sv_*.
std::vector<int64_t> seq_saved_widths(const RimSeqDims& d);

// Checks every argument (shapes, dtypes, devices) and returns the sizes; S is the tile chosen
// (the `tile` argument, or kSeqTileMax capped by B when it is 0).
RimSeqDims seq_fwd_check(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, int64_t tile);

// Shared by the CPU and CUDA implementations: allocate outputs, fill the kernels' parameters.
SeqFwdResult seq_fwd_alloc(const RimSeqDims& d, const at::Tensor& h0, bool save);
template <typename T>
void seq_fwd_fill(RimSeqFwdParams<T>& p, const RimSeqDims& d, const at::Tensor& keys,
                  const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
                  const at::Tensor& c0, const at::Tensor& wq, const at::Tensor& whh,
                  const at::Tensor& bih, const at::Tensor& bhh, const at::Tensor& cq,
                  const at::Tensor& ck, const at::Tensor& cv, const at::Tensor& co,
                  SeqFwdResult& res) {
  static_cast<RimSeqDims&>(p) = d;
  auto cp = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.const_data_ptr()); };
  auto mp = [](at::Tensor& t) { return reinterpret_cast<T*>(t.mutable_data_ptr()); };
  p.keys = keys.const_data_ptr();
  p.xsrc = xsrc.const_data_ptr();
  p.w_x = w_x.const_data_ptr();
  p.h0 = cp(h0);
  p.c0 = d.lstm ? cp(c0) : nullptr;
  p.w_query = cp(wq), p.w_hh = cp(whh), p.b_ih = cp(bih), p.b_hh = cp(bhh);
  p.c_query = cp(cq), p.c_key = cp(ck), p.c_value = cp(cv), p.c_output = cp(co);
  p.out = mp(res[0]), p.h_n = mp(res[1]), p.c_n = d.lstm ? mp(res[2]) : nullptr;
  p.masks = res[3].mutable_data_ptr<bool>();
  void** sv[] = {&p.sv_h, &p.sv_c, &p.sv_ht, &p.sv_q, &p.sv_a, &p.sv_g, &p.sv_qkv, &p.sv_bp,
                 &p.sv_o};
  for (int i = 0; i < 9; ++i)
    *sv[i] = res[4 + i].numel() > 0 ? res[4 + i].mutable_data_ptr() : nullptr;
}

SeqBwdResult seq_bwd_alloc(const RimSeqDims& d, const at::Tensor& keys, const at::Tensor& xsrc);
// The backward kernel's transposed weight copies, contiguous: input_query^T (K, nk, H),
// weight_hh^T (K, GH, H), [comm_query | comm_key | comm_value]^T (K, C3, H),
// comm_output^T (K, H, cv), w_x^T (K, n_in, GH, Dx).
std::vector<at::Tensor> seq_bwd_transposed(const at::Tensor& wq, const at::Tensor& whh,
                                           const at::Tensor& cq, const at::Tensor& ck,
                                           const at::Tensor& cv, const at::Tensor& co,
                                           const at::Tensor& w_x);

template <typename T>
void seq_bwd_fill(RimSeqBwdParams<T>& p, const RimSeqDims& d, bool block,
                  const at::Tensor& g_out, const at::Tensor& g_hn, const at::Tensor& g_cn,
                  const at::Tensor& keys, const at::Tensor& xsrc,
                  const std::vector<at::Tensor>& wt, const at::Tensor& masks,
                  const std::vector<at::Tensor>& saved, SeqBwdResult& res) {
  static_cast<RimSeqDims&>(p) = d;
  auto cp = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.const_data_ptr()); };
  auto opt = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; };
  p.keys = keys.const_data_ptr(), p.xsrc = xsrc.const_data_ptr();
  p.w_query_t = cp(wt[0]), p.w_hh_t = cp(wt[1]), p.c_qkv_t = cp(wt[2]), p.c_output_t = cp(wt[3]);
  p.w_x_t = wt[4].const_data_ptr();
  p.masks = masks.const_data_ptr<bool>();
  const void** sv[] = {&p.sv_h, &p.sv_c, &p.sv_ht, &p.sv_q, &p.sv_a, &p.sv_g, &p.sv_qkv,
                       &p.sv_bp, &p.sv_o};
  for (int i = 0; i < 9; ++i) *sv[i] = saved[i].numel() > 0 ? saved[i].const_data_ptr() : nullptr;
  p.g_out = opt(g_out), p.g_hn = opt(g_hn), p.g_cn = opt(g_cn);
  p.block_inactive_grad = block;
  void** outs[] = {&p.d_keys, &p.d_xsrc, &p.d_h0, &p.d_c0, &p.h_dq, &p.h_dg, &p.h_dqkv,
                   &p.h_dhp, &p.h_xa};
  for (int i = 0; i < 9; ++i) *outs[i] = res[i].numel() > 0 ? res[i].mutable_data_ptr() : nullptr;
}

// The backward's checks: the forward's, plus the saved activations and incoming gradients.
RimSeqDims seq_bwd_check(
    const std::optional<at::Tensor>& g_out, const std::optional<at::Tensor>& g_hn,
    const std::optional<at::Tensor>& g_cn, const at::Tensor& keys, const at::Tensor& xsrc,
    const at::Tensor& w_x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& input_query, const at::Tensor& weight_hh, const at::Tensor& bias_ih,
    const at::Tensor& bias_hh, const at::Tensor& comm_query, const at::Tensor& comm_key,
    const at::Tensor& comm_value, const at::Tensor& comm_output, const at::Tensor& masks,
    const std::vector<at::Tensor>& saved, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, int64_t tile);

#ifdef RIMS_FAST_WITH_CUDA
SeqFwdResult rim_seq_fwd_cuda(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, int64_t tile,
    bool save);
SeqBwdResult rim_seq_bwd_cuda(
    const std::optional<at::Tensor>& g_out, const std::optional<at::Tensor>& g_hn,
    const std::optional<at::Tensor>& g_cn, const at::Tensor& keys, const at::Tensor& xsrc,
    const at::Tensor& w_x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& input_query, const at::Tensor& weight_hh, const at::Tensor& bias_ih,
    const at::Tensor& bias_hh, const at::Tensor& comm_query, const at::Tensor& comm_key,
    const at::Tensor& comm_value, const at::Tensor& comm_output, const at::Tensor& masks,
    at::TensorList saved, int64_t top_k, int64_t input_heads, int64_t comm_heads, bool per_head,
    double input_dropout, double comm_dropout, int64_t seed, bool block_inactive_grad,
    int64_t tile);
#endif

}  // namespace rims
