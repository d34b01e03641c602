// rims_fast::rim_seq_fwd / rim_seq_bwd: the persistent whole-sequence forward and backward
// (csrc/kernels/rim_seq_fwd.cuh, rim_seq_bwd.cuh).
// Schema, argument checks and the CPU implementation (the kernel's tile function run on the host,
// for tests) are in rim_seq_fwd.cpp; the CUDA launchers in rim_seq_fwd_cuda.cu,
// rim_seq_fwd_cluster_cuda.cu and rim_seq_bwd_cuda.cu (shared pieces: rim_seq_cuda.cuh).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "kernels/rim_seq_bwd.cuh"
#include "kernels/rim_seq_fwd.cuh"

namespace rims {

// The largest tile (samples per thread block) the kernel's accumulators hold: the per-sample code
// of every phase is unrolled this many times. setup.py sets it from RIMS_FAST_SEQ_TILE_MAX (a
// diagnostic: smaller kernels for a GPU run that asks whether code size bounds a step).
#ifndef RIMS_SEQ_TILE_MAX
#define RIMS_SEQ_TILE_MAX 8
#endif
constexpr int kSeqTileMax = RIMS_SEQ_TILE_MAX;
static_assert(kSeqTileMax >= 1 && kSeqTileMax <= 8, "RIMS_SEQ_TILE_MAX must be in 1..8");

// out, h_n, c_n, masks, then the 9 saved activations (empty unless save).
using SeqFwdResult = std::vector<at::Tensor>;
// d keys, d xsrc, d h0, d c0, then the histories dq, d gates, d Q|K|V, dh', xa.
using SeqBwdResult = std::vector<at::Tensor>;

// One checked call of the forward, shared by the CPU and CUDA implementations: the sizes (S is
// the tile asked for: the `tile` argument, or kSeqTileMax capped by B when it is 0, which the CUDA
// launcher lowers to ceil(B / SMs) and to what fits shared memory), the inputs made contiguous,
// and the allocated outputs.
struct SeqFwdCall {
  RimSeqDims d;
  at::Tensor keys, xsrc, w_x, h0, c0, wq, whh, bih, bhh, cq, ck, cv, co;
  // The tensor-core path's padded operands (seq_mma_weights; empty without it): the gates'
  // [F ; weight_hh], [comm_query | comm_key | comm_value], comm_output.
  std::vector<at::Tensor> w_mma;
  // The hoisted input term (RimSeqDims::xw_hoisted; undefined without it): (T, B, M, K, n_in, GH).
  at::Tensor xw;
  SeqFwdResult res;
};

// At most this many bytes of hoisted input term (seq_fwd_prepare's automatic choice): beyond,
// the forward reads F as before (the stepped ops take layers that large anyway).
constexpr int64_t kXwMaxBytes = int64_t(512) << 20;

SeqFwdCall seq_fwd_prepare(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, int64_t tile,
    bool save, bool mma, int64_t cluster, int64_t resident, int64_t xw);

// The largest tile the wide kernels are compiled for: the forward's SMAX = 2 instantiation at
// 512 threads fits 128 registers without spilling in 16-bit storage (8 bytes in float32, sm_90a
// ptxas), the backward's spilled ~250 bytes, so the backward keeps tile 1.
constexpr int64_t kSeqWideFwdTileMax = 2;

// The stepped ops' per-unit kernels (cell, residual, their backward) index the (B, K, H) units
// in 32-bit arithmetic (rim_step_fwd.cuh, step_detail::step_unit): refuse a layer with 2^31 or
// more of them, with the sizes, rather than wrap.
inline void rim_steps_check_sizes(const RimSeqDims& d, const char* op) {
  TORCH_CHECK(d.B * d.K * d.H < (int64_t(1) << 31), op, "B*K*H = ", d.B, "*", d.K, "*", d.H,
              " units is 2^31 or more, beyond the stepped kernels' 32-bit unit index; split the "
              "batch");
}

// Whether a one-block-per-tile call runs a wide kernel (seq_cuda::kSeqWideThreads threads, SMAX
// = its tile): on CUDA cores at a tile of at most max_tile (1 for the backward,
// kSeqWideFwdTileMax for the forward), unless RIMS_FAST_CUDA_WIDE=0 (the 256-thread kernel
// compiled for tiles up to 8, kept for the side-by-side timing, benchmark providers
// cuda_seq_narrow, cuda_seq_t2_narrow). Same arithmetic, same order: only which thread runs which
// item differs, so the results are bit-identical. The host runs follow it too (the SMAX = S
// instantiation), so that CI runs the wide kernels' code.
inline bool use_wide(const RimSeqDims& d, int64_t max_tile = 1) {
  const char* v = std::getenv("RIMS_FAST_CUDA_WIDE");
  const std::string s = v == nullptr ? "1" : v;
  TORCH_CHECK(s == "0" || s == "1", "RIMS_FAST_CUDA_WIDE must be 0 or 1, got '", s, "'");
  return s == "1" && d.S <= max_tile && !d.mma;
}

// The phase-timing buffer of the CUDA forward (which = 0) / backward (1) launches, or nullptr:
// kPhaseSlots device counters each (RimSeqDims::phase_clock), set by _set_phase_clock
// (rims_api.cpp) for tools/phase_clocks.py. Process-wide, read at every launch.
inline unsigned long long*& seq_phase_clock(int which) {
  static unsigned long long* slot[2] = {nullptr, nullptr};
  return slot[which];
}
// The CUDA device of that buffer: launches on other devices are not timed.
inline int& seq_phase_clock_device() {
  static int device = -1;
  return device;
}
inline unsigned long long* seq_phase_clock_for(int which, const at::Tensor& t) {
  return t.is_cuda() && t.get_device() == seq_phase_clock_device() ? seq_phase_clock(which)
                                                                    : nullptr;
}

// The kernel's parameters for a prepared call (T: the storage type as the kernel sees it).
template <typename T>
RimSeqFwdParams<T> seq_fwd_params(const SeqFwdCall& c) {
  RimSeqFwdParams<T> p{};
  static_cast<RimSeqDims&>(p) = c.d;
  p.phase_clock = seq_phase_clock_for(0, c.keys);
  auto cp = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.const_data_ptr()); };
  auto mp = [](const at::Tensor& t) { return reinterpret_cast<T*>(t.mutable_data_ptr()); };
  p.keys = c.keys.const_data_ptr();
  p.xsrc = c.xsrc.const_data_ptr();
  p.w_x = c.w_x.const_data_ptr();
  p.xw = c.xw.defined() ? c.xw.const_data_ptr() : nullptr;
  p.h0 = cp(c.h0);
  p.c0 = c.d.lstm ? cp(c.c0) : nullptr;
  p.w_query = cp(c.wq), p.w_hh = cp(c.whh), p.b_ih = cp(c.bih), p.b_hh = cp(c.bhh);
  const bool mma = !c.w_mma.empty();
  p.w_mma = mma ? cp(c.w_mma[0]) : nullptr;
  p.w_mma_qkv = mma ? cp(c.w_mma[1]) : nullptr;
  p.w_mma_out = mma ? cp(c.w_mma[2]) : nullptr;
  p.c_query = cp(c.cq), p.c_key = cp(c.ck), p.c_value = cp(c.cv), p.c_output = cp(c.co);
  p.out = mp(c.res[0]), p.h_n = mp(c.res[1]), p.c_n = c.d.lstm ? mp(c.res[2]) : nullptr;
  p.masks = c.res[3].mutable_data_ptr<bool>();
  void** sv[] = {&p.sv_h, &p.sv_c, &p.sv_ht, &p.sv_q, &p.sv_a, &p.sv_g, &p.sv_qkv, &p.sv_bp,
                 &p.sv_o};
  for (int i = 0; i < 9; ++i)
    *sv[i] = c.res[4 + i].numel() > 0 ? c.res[4 + i].mutable_data_ptr() : nullptr;
  return p;
}

// One checked call of the backward: the sizes, the incoming gradients (contiguous, undefined =
// zero), the inputs it reads, the transposed weight copies (input_query^T (K, nk, H),
// weight_hh^T (K, GH, H), [comm_query | comm_key | comm_value]^T (K, C3, H), comm_output^T
// (K, H, cv), w_x^T (K, n_in, GH, Dx)) and the allocated outputs.
struct SeqBwdCall {
  RimSeqDims d;
  bool block;
  at::Tensor g_out, g_hn, g_cn, keys, xsrc, masks;
  std::vector<at::Tensor> saved, wt;
  // The tensor-core path's padded operands (seq_bwd_mma_weights; empty without it) and the
  // operand tile's width (RimSeqBwdParams::ba).
  std::vector<at::Tensor> wb;
  int64_t ba = 0;
  // The hoisted input term (RimSeqDims::xw_hoisted; undefined without it): x F as the forward's, F, and
  // the sweep's a~ keep history (RimSeqBwdParams::h_ak).
  at::Tensor xw, w_x, ak;
  SeqBwdResult res;
};

// Whether a call hoists the input term (xw: -1 auto, 0, 1; the forward's and backward's rule):
// asked for, or automatically on CUDA cores when a tile reads fewer of its rows than of F and it
// fits kXwMaxBytes.
bool seq_use_xw(const RimSeqDims& d, int64_t xw, bool mma, int64_t elem_bytes);

// x_{m,n} F[k, n] for every step, sample and element: (T, B, M, K, n_in, GH), compute type.
at::Tensor seq_hoisted_xw(const RimSeqDims& d, const at::Tensor& xsrc, const at::Tensor& w_x);

// After a hoisted sweep: d xsrc and the xa history (c.res[1], c.res[8]) from the a~ keep history
// and d gi, as GEMMs over all rows.
void seq_bwd_input_term(SeqBwdCall& c);

SeqBwdCall seq_bwd_prepare(
    const std::optional<at::Tensor>& g_out, const std::optional<at::Tensor>& g_hn,
    const std::optional<at::Tensor>& g_cn, const at::Tensor& keys, const at::Tensor& xsrc,
    const at::Tensor& w_x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& input_query, const at::Tensor& weight_hh, const at::Tensor& bias_ih,
    const at::Tensor& bias_hh, const at::Tensor& comm_query, const at::Tensor& comm_key,
    const at::Tensor& comm_value, const at::Tensor& comm_output, const at::Tensor& masks,
    at::TensorList saved, int64_t top_k, int64_t input_heads, int64_t comm_heads, bool per_head,
    double input_dropout, double comm_dropout, int64_t seed, bool block_inactive_grad,
    int64_t tile, bool mma, int64_t xw);

template <typename T>
RimSeqBwdParams<T> seq_bwd_params(const SeqBwdCall& c) {
  RimSeqBwdParams<T> p{};
  static_cast<RimSeqDims&>(p) = c.d;
  p.phase_clock = seq_phase_clock_for(1, c.keys);
  auto cp = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.const_data_ptr()); };
  auto opt = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; };
  p.keys = c.keys.const_data_ptr(), p.xsrc = c.xsrc.const_data_ptr();
  p.w_query_t = cp(c.wt[0]), p.w_hh_t = cp(c.wt[1]), p.c_qkv_t = cp(c.wt[2]);
  p.c_output_t = cp(c.wt[3]), p.w_x_t = c.wt[4].const_data_ptr();
  p.masks = c.masks.const_data_ptr<bool>();
  const void** sv[] = {&p.sv_h, &p.sv_c, &p.sv_ht, &p.sv_q, &p.sv_a, &p.sv_g, &p.sv_qkv,
                       &p.sv_bp, &p.sv_o};
  for (int i = 0; i < 9; ++i)
    *sv[i] = c.saved[i].numel() > 0 ? c.saved[i].const_data_ptr() : nullptr;
  p.g_out = opt(c.g_out), p.g_hn = opt(c.g_hn), p.g_cn = opt(c.g_cn);
  p.block_inactive_grad = c.block;
  void** outs[] = {&p.d_keys, &p.d_xsrc, &p.d_h0, &p.d_c0, &p.h_dq, &p.h_dg, &p.h_dqkv,
                   &p.h_dhp, &p.h_xa};
  for (int i = 0; i < 9; ++i)
    *outs[i] = c.res[i].numel() > 0 ? c.res[i].mutable_data_ptr() : nullptr;
  p.xw = c.xw.defined() ? c.xw.const_data_ptr() : nullptr;
  p.h_ak = c.ak.defined() ? c.ak.mutable_data_ptr() : nullptr;
  if (!c.wb.empty()) {
    // Widths from the padded operands' shapes (seq_bwd_mma_weights), each (K, n, kd): stored
    // transposed, so a product's reduction width kd is the last dimension.
    p.wb_out = cp(c.wb[0]), p.wb_qkv = cp(c.wb[1]), p.wb_x = cp(c.wb[2]), p.wb_h = cp(c.wb[3]);
    p.bh = c.wb[0].size(2), p.bo = c.wb[0].size(1), p.bq = c.wb[1].size(2);
    p.bh2 = c.wb[1].size(1), p.bg = c.wb[2].size(2), p.bx = c.wb[2].size(1);
    p.bk = c.wb[3].size(2) - p.bg, p.ba = c.ba;
  }
  return p;
}

#ifdef RIMS_FAST_WITH_CUDA
SeqFwdResult rim_seq_fwd_cuda(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, int64_t tile,
    bool save, bool mma, int64_t cluster, int64_t resident, int64_t xw);
SeqBwdResult rim_seq_bwd_cuda(
    const std::optional<at::Tensor>& g_out, const std::optional<at::Tensor>& g_hn,
    const std::optional<at::Tensor>& g_cn, const at::Tensor& keys, const at::Tensor& xsrc,
    const at::Tensor& w_x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& input_query, const at::Tensor& weight_hh, const at::Tensor& bias_ih,
    const at::Tensor& bias_hh, const at::Tensor& comm_query, const at::Tensor& comm_key,
    const at::Tensor& comm_value, const at::Tensor& comm_output, const at::Tensor& masks,
    at::TensorList saved, int64_t top_k, int64_t input_heads, int64_t comm_heads, bool per_head,
    double input_dropout, double comm_dropout, int64_t seed, bool block_inactive_grad,
    int64_t tile, bool mma, int64_t xw);
#endif

}  // namespace rims
