// rims_fast::rim_seq_fwd / rim_seq_bwd — the persistent whole-sequence forward and backward of
// csrc/kernels/rim_seq_fwd.cuh and rim_seq_bwd.cuh.
// Here: the schema, the argument checks (shared with the CUDA launcher) and the CPU
// implementation, which runs the kernel's tile function on the host with HostExec (items one by
// one, so every barrier holds trivially; kernels/host_exec.h: their order, the tiles' order and
// the NaN-started, guarded shared memory). It exists so that CI checks the kernel's arithmetic
// against the reference without a GPU; it is not a fast path (backend="cpu" is).
#include "rim_seq_fwd.h"

#include <torch/library.h>

#include "kernels/cluster_host.h"

#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

namespace rims {

namespace {

void check_tensor(const char* name, const at::Tensor& t, at::ScalarType dtype,
                  const at::Device& device, const std::vector<int64_t>& shape_) {
  const at::IntArrayRef shape(shape_);
  TORCH_CHECK(t.scalar_type() == dtype, "rims_fast::rim_seq_fwd: ", name, " has dtype ",
              t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.device() == device, "rims_fast::rim_seq_fwd: ", name, " is on ", t.device(),
              ", expected ", device);
  TORCH_CHECK(t.sizes() == shape, "rims_fast::rim_seq_fwd: ", name, " must have shape ", shape,
              ", got shape ", t.sizes());
}

// Checks every argument (shapes, dtypes, devices) and returns the sizes.
RimSeqDims seq_fwd_check(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, int64_t tile) {
  const char* op = "rims_fast::rim_seq_fwd: ";
  TORCH_CHECK(keys.dim() == 4 && xsrc.dim() == 4, op,
              "keys and xsrc must have dim 4 (T, B, M, .), got shapes ", keys.sizes(), " and ",
              xsrc.sizes());
  TORCH_CHECK(w_x.dim() == 4, op, "w_x must have dim 4 (K, n_in, Dx, G*H), got shape ",
              w_x.sizes());
  TORCH_CHECK(weight_hh.dim() == 3, op, "weight_hh must have dim 3 (K, H, G*H), got shape ",
              weight_hh.sizes());
  TORCH_CHECK(input_query.dim() == 3 && comm_query.dim() == 3 && comm_value.dim() == 3, op,
              "input_query, comm_query and comm_value must have dim 3 (K, H, width)");
  const auto st = h0.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              op, "h0 and the parameters must be float64, float32, float16 or bfloat16, got ", st);
  const auto ct = st == at::kDouble ? at::kDouble : at::kFloat;  // the compute type
  const at::Device dev = h0.device();
  RimSeqDims d{};
  d.T_ = keys.size(0), d.B = keys.size(1), d.M = keys.size(2), d.nk = keys.size(3);
  d.K = weight_hh.size(0), d.H = weight_hh.size(1), d.GH = weight_hh.size(2);
  TORCH_CHECK(d.T_ >= 1 && d.B >= 1 && d.M >= 1 && d.K >= 1 && d.H >= 1, op,
              "T, B, M, K and H must be >= 1");
  TORCH_CHECK(d.GH == 4 * d.H || d.GH == 3 * d.H, op,
              "weight_hh must be (K, H, 4H) (LSTM) or (K, H, 3H) (GRU), got ", weight_hh.sizes());
  d.lstm = d.GH == 4 * d.H;
  TORCH_CHECK(d.lstm == (c0.has_value() && c0->defined()), op,
              d.lstm ? "c0 is required for an LSTM cell" : "c0 must be None for a GRU cell");
  TORCH_CHECK(input_heads >= 1 && comm_heads >= 1, op, "heads must be >= 1");
  d.n_in = input_heads, d.n_c = comm_heads;
  TORCH_CHECK(d.nk % d.n_in == 0, op, "the key width ", d.nk, " is not divisible by input_heads");
  d.dk = d.nk / d.n_in;
  TORCH_CHECK(w_x.size(1) == d.n_in, op, "w_x must be (K, n_in, Dx, G*H), got ", w_x.sizes());
  d.Dx = w_x.size(2);
  d.xrow = xsrc.size(3);
  d.xhead = per_head ? d.Dx : 0;
  TORCH_CHECK(d.xrow == (per_head ? d.n_in * d.Dx : d.Dx), op, "xsrc's last dim ", d.xrow,
              " does not match w_x ", w_x.sizes(), per_head ? " (per-head values)" : " (folded)");
  d.ck = comm_query.size(2), d.cv = comm_value.size(2);
  TORCH_CHECK(d.ck % d.n_c == 0 && d.cv % d.n_c == 0, op,
              "communication widths must be divisible by comm_heads");
  d.dc = d.ck / d.n_c, d.dcv = d.cv / d.n_c;
  TORCH_CHECK(top_k >= 1 && top_k <= d.K, op, "top_k must be in 1..K=", d.K, ", got ", top_k);
  d.top_k = top_k;
  TORCH_CHECK(input_dropout >= 0.0 && input_dropout < 1.0 && comm_dropout >= 0.0 &&
                  comm_dropout < 1.0, op, "dropout must be in [0, 1)");
  d.p_in = input_dropout, d.p_c = comm_dropout;
  d.seed = static_cast<uint64_t>(seed);
  TORCH_CHECK(tile >= 0 && tile <= kSeqTileMax, op, "tile must be in 0..", kSeqTileMax,
              " (0 = automatic; the build's RIMS_FAST_SEQ_TILE_MAX), got ", tile);
  d.S = tile > 0 ? tile : std::min<int64_t>(kSeqTileMax, d.B);
  d.S = std::min<int64_t>(d.S, d.B);

  const int64_t K = d.K, H = d.H;
  check_tensor("keys", keys, ct, dev, {d.T_, d.B, d.M, d.nk});
  check_tensor("xsrc", xsrc, ct, dev, {d.T_, d.B, d.M, d.xrow});
  check_tensor("w_x", w_x, ct, dev, {K, d.n_in, d.Dx, d.GH});
  check_tensor("h0", h0, st, dev, {d.B, K, H});
  if (d.lstm) check_tensor("c0", *c0, st, dev, {d.B, K, H});
  check_tensor("input_query", input_query, st, dev, {K, H, d.nk});
  check_tensor("weight_hh", weight_hh, st, dev, {K, H, d.GH});
  check_tensor("bias_ih", bias_ih, st, dev, {K, d.GH});
  check_tensor("bias_hh", bias_hh, st, dev, {K, d.GH});
  check_tensor("comm_query", comm_query, st, dev, {K, H, d.ck});
  check_tensor("comm_key", comm_key, st, dev, {K, H, d.ck});
  check_tensor("comm_value", comm_value, st, dev, {K, H, d.cv});
  check_tensor("comm_output", comm_output, st, dev, {K, d.cv, H});
  return d;
}

// The saved activations' widths, in the order of RimSeqFwdParams::sv_*.
std::vector<int64_t> seq_saved_widths(const RimSeqDims& d) {
  const int64_t GW = d.lstm ? d.GH : 2 * d.GH;
  return {d.H, d.lstm ? d.H : 0, d.H, d.nk, d.n_in * d.M, GW, 2 * d.ck + d.cv, d.n_c * d.K, d.cv};
}

SeqFwdResult seq_fwd_alloc(const RimSeqDims& d, const at::Tensor& h0, bool save) {
  const auto opt = h0.options();
  const auto copt = opt.dtype(h0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  SeqFwdResult res = {at::empty({d.T_, d.B, d.K * d.H}, opt), at::empty({d.B, d.K, d.H}, opt),
                      d.lstm ? at::empty({d.B, d.K, d.H}, opt) : at::empty({0}, opt),
                      at::empty({d.T_, d.B, d.K}, opt.dtype(at::kBool))};
  for (int64_t w : seq_saved_widths(d))
    res.push_back(save && w > 0 ? at::empty({d.T_, d.B, d.K, w}, copt) : at::empty({0}, copt));
  return res;
}

SeqBwdResult seq_bwd_alloc(const RimSeqDims& d, const at::Tensor& keys, const at::Tensor& xsrc) {
  const auto opt = keys.options();  // the compute type
  const int64_t T = d.T_, B = d.B, K = d.K, GW = d.lstm ? d.GH : 2 * d.GH;
  return {at::empty(keys.sizes(), opt), at::empty(xsrc.sizes(), opt),
          at::empty({B, K, d.H}, opt),
          d.lstm ? at::empty({B, K, d.H}, opt) : at::empty({0}, opt),
          at::empty({T, B, K, d.nk}, opt), at::empty({T, B, K, GW}, opt),
          at::empty({T, B, K, 2 * d.ck + d.cv}, opt), at::empty({T, B, K, d.H}, opt),
          at::empty({T, B, K, d.n_in * d.Dx}, opt)};
}

RimSeqDims seq_bwd_check(
    const std::optional<at::Tensor>& g_out, const std::optional<at::Tensor>& g_hn,
    const std::optional<at::Tensor>& g_cn, const at::Tensor& keys, const at::Tensor& xsrc,
    const at::Tensor& w_x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& input_query, const at::Tensor& weight_hh, const at::Tensor& bias_ih,
    const at::Tensor& bias_hh, const at::Tensor& comm_query, const at::Tensor& comm_key,
    const at::Tensor& comm_value, const at::Tensor& comm_output, const at::Tensor& masks,
    const std::vector<at::Tensor>& saved, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, int64_t tile) {
  const RimSeqDims d = seq_fwd_check(keys, xsrc, w_x, h0, c0, input_query, weight_hh, bias_ih,
                                     bias_hh, comm_query, comm_key, comm_value, comm_output,
                                     top_k, input_heads, comm_heads, per_head, input_dropout,
                                     comm_dropout, seed, tile);
  const auto ct = keys.scalar_type();
  const at::Device dev = h0.device();
  check_tensor("masks", masks, at::kBool, dev, {d.T_, d.B, d.K});
  const std::vector<int64_t> widths = seq_saved_widths(d);
  TORCH_CHECK(saved.size() == widths.size(), "rims_fast::rim_seq_bwd: expected ", widths.size(),
              " saved activations, got ", saved.size());
  static const char* names[] = {"saved h", "saved c", "saved h~", "saved q", "saved a",
                                "saved gates", "saved qkv", "saved b", "saved o"};
  for (size_t i = 0; i < widths.size(); ++i) {
    if (widths[i] == 0) continue;
    TORCH_CHECK(saved[i].numel() > 0, "rims_fast::rim_seq_bwd: ", names[i],
                " is empty (the forward ran with save=False)");
    check_tensor(names[i], saved[i], ct, dev, {d.T_, d.B, d.K, widths[i]});
  }
  if (g_out.has_value() && g_out->defined())
    check_tensor("grad_out", *g_out, ct, dev, {d.T_, d.B, d.K * d.H});
  if (g_hn.has_value() && g_hn->defined()) check_tensor("grad_h_n", *g_hn, ct, dev, {d.B, d.K, d.H});
  if (d.lstm && g_cn.has_value() && g_cn->defined())
    check_tensor("grad_c_n", *g_cn, ct, dev, {d.B, d.K, d.H});
  return d;
}

std::vector<at::Tensor> seq_bwd_transposed(const at::Tensor& wq, const at::Tensor& whh,
                                           const at::Tensor& cq, const at::Tensor& ck,
                                           const at::Tensor& cv, const at::Tensor& co,
                                           const at::Tensor& w_x) {
  return {wq.transpose(1, 2).contiguous(), whh.transpose(1, 2).contiguous(),
          at::cat({cq, ck, cv}, -1).transpose(1, 2).contiguous(), co.transpose(1, 2).contiguous(),
          w_x.transpose(2, 3).contiguous()};
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A padded (K, kd, n) product matrix as the tensor-core products read it: (K, n, kd), the
// column-major operand of csrc/kernels/mma_tile.cuh.
at::Tensor mma_operand(const at::Tensor& w) { return w.transpose(1, 2).contiguous(); }

// The tensor-core path's sizes (RimSeqDims::mk ... ma) and its zero-padded operands in the
// storage type (rounding the fold F to it): per mechanism the gates' [F ; weight_hh] (mk, mn),
// [comm_query | comm_key | comm_value] (mh, mq) and comm_output (mv, mo), each stored transposed
// (mma_operand). The gate columns are
// interleaved by hidden unit, U per unit (LSTM 4: i f g o; GRU 8: r z n from F, r z n from
// weight_hh, 2 zero), so that a warp's 32 columns hold whole units and its epilogue runs the cell
// (rim_seq_fwd_tile).
std::vector<at::Tensor> seq_mma_weights(RimSeqDims& d, const at::Tensor& w_x,
                                        const at::Tensor& whh, const at::Tensor& cq,
                                        const at::Tensor& ck, const at::Tensor& cv,
                                        const at::Tensor& co) {
  const int64_t XW = d.n_in * d.Dx, C3 = 2 * d.ck + d.cv, U = d.lstm ? 4 : 8;
  d.mma = true;
  d.mxw = round_up(XW, kMmaK);
  d.mh = round_up(d.H, kMmaK);
  d.mk = d.mxw + d.mh;
  d.mv = round_up(d.cv, kMmaK);
  d.mn = round_up(U * d.H, kMmaN);
  d.mq = round_up(C3, kMmaN);
  d.mo = round_up(d.H, kMmaN);
  d.ma = std::max(d.mk, d.mv);
  const auto opt = whh.options();
  at::Tensor g = at::zeros({d.K, d.mk, d.mn}, opt);
  at::Tensor slots = g.narrow(2, 0, U * d.H).view({d.K, d.mk, d.H, U});
  // w (K, rows, G H), gate-major: gate q of unit j at slot q0 + q of unit j, rows from row0.
  auto put = [&](const at::Tensor& w, int64_t row0, int64_t q0) {
    const int64_t rows = w.size(1), G = w.size(2) / d.H;
    slots.narrow(1, row0, rows).narrow(3, q0, G).copy_(
        w.reshape({d.K, rows, G, d.H}).transpose(2, 3));
  };
  put(w_x.reshape({d.K, XW, d.GH}), 0, 0);
  put(whh, d.mxw, d.lstm ? 0 : 3);
  at::Tensor qkv = at::zeros({d.K, d.mh, d.mq}, opt);
  qkv.narrow(1, 0, d.H).narrow(2, 0, C3).copy_(at::cat({cq, ck, cv}, -1));
  at::Tensor out = at::zeros({d.K, d.mv, d.mo}, opt);
  out.narrow(1, 0, d.cv).narrow(2, 0, d.H).copy_(co);
  return {mma_operand(g), mma_operand(qkv), mma_operand(out)};
}

// The backward's tensor-core operands, zero-padded per mechanism in the storage type (rounding F):
// comm_output^T (bh, bo), [comm_query|comm_key|comm_value]^T (bq, bh2), F^T (bg, bx) and
// [weight_hh^T ; input_query^T] (bg + bk, bh2), each stored transposed (mma_operand); sets the
// operand tile's width ba.
std::vector<at::Tensor> seq_bwd_mma_weights(const RimSeqDims& d, const at::Tensor& w_x,
                                            const std::vector<at::Tensor>& wt, int64_t& ba) {
  const int64_t XW = d.n_in * d.Dx, C3 = 2 * d.ck + d.cv;
  const int64_t bh = round_up(d.H, kMmaK), bq = round_up(C3, kMmaK), bg = round_up(d.GH, kMmaK);
  const int64_t bk = round_up(d.nk, kMmaK), bo = round_up(d.cv, kMmaN);
  const int64_t bh2 = round_up(d.H, kMmaN), bx = round_up(XW, kMmaN);
  ba = std::max({bh, bq, bg + bk});
  const auto opt = wt[1].options();  // the storage type
  at::Tensor w_out = at::zeros({d.K, bh, bo}, opt);
  w_out.narrow(1, 0, d.H).narrow(2, 0, d.cv).copy_(wt[3]);
  at::Tensor w_qkv = at::zeros({d.K, bq, bh2}, opt);
  w_qkv.narrow(1, 0, C3).narrow(2, 0, d.H).copy_(wt[2]);
  at::Tensor w_x_t = at::zeros({d.K, bg, bx}, opt);
  w_x_t.narrow(1, 0, d.GH).narrow(2, 0, XW).copy_(w_x.reshape({d.K, XW, d.GH}).transpose(1, 2));
  at::Tensor w_h = at::zeros({d.K, bg + bk, bh2}, opt);
  w_h.narrow(1, 0, d.GH).narrow(2, 0, d.H).copy_(wt[1]);
  w_h.narrow(1, bg, d.nk).narrow(2, 0, d.H).copy_(wt[0]);
  return {mma_operand(w_out), mma_operand(w_qkv), mma_operand(w_x_t), mma_operand(w_h)};
}

}  // namespace

// One GEMM (folded: every head reads x_m) or one per head (per-head values v_{m,n}). Autocast
// stays out (the kernels read the result as the compute type); the products follow torch's TF32
// setting, as the reference's own products do.
at::Tensor seq_hoisted_xw(const RimSeqDims& d, const at::Tensor& xsrc, const at::Tensor& w_x) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t R = d.T_ * d.B * d.M;
  at::Tensor xw;
  if (d.xhead == 0) {
    xw = at::matmul(xsrc.reshape({R, d.Dx}),
                    w_x.permute({2, 0, 1, 3}).reshape({d.Dx, d.K * d.n_in * d.GH}))
             .view({d.T_, d.B, d.M, d.K, d.n_in, d.GH});
  } else {
    const at::Tensor v = xsrc.reshape({R, d.n_in, d.Dx}).transpose(0, 1);          // (n, R, Dx)
    const at::Tensor f = w_x.permute({1, 2, 0, 3}).reshape({d.n_in, d.Dx, d.K * d.GH});
    xw = at::bmm(v, f).view({d.n_in, R, d.K, d.GH}).permute({1, 2, 0, 3}).contiguous()
             .view({d.T_, d.B, d.M, d.K, d.n_in, d.GH});
  }
  TORCH_CHECK(xw.scalar_type() == xsrc.scalar_type() && xw.is_contiguous(),
              "rims_fast::rim_seq: the hoisted input term came out as ", xw.scalar_type(),
              xw.is_contiguous() ? "" : " (not contiguous)", ", expected ", xsrc.scalar_type());
  return xw;
}

bool seq_use_xw(const RimSeqDims& d, int64_t xw, bool mma, int64_t elem_bytes) {
  TORCH_CHECK(xw >= -1 && xw <= 1, "rims_fast::rim_seq: xw (hoist the input term) must be -1 "
              "(auto), 0 or 1, got ", xw);
  TORCH_CHECK(xw != 1 || !mma, "rims_fast::rim_seq: the hoisted input term (xw=1) runs on "
              "CUDA cores; mma=True needs xw=0 or -1");
  const int64_t bytes = d.T_ * d.B * d.M * d.K * d.n_in * d.GH * elem_bytes;
  return xw == 1 || (xw == -1 && !mma && d.M * d.S < d.Dx && bytes <= kXwMaxBytes);
}

void seq_bwd_input_term(SeqBwdCall& c) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const RimSeqDims& d = c.d;
  const int64_t R = d.T_ * d.B, K = d.K, n = d.n_in, M = d.M, Dx = d.Dx;
  // d xa = d gi F[k, n]^T for every row: (K, R, n*Dx); d gi zero on inactive rows.
  const at::Tensor dgi = c.res[5].narrow(-1, 0, d.GH).reshape({R, K, d.GH}).transpose(0, 1);
  const at::Tensor dxa = at::bmm(dgi, c.w_x.reshape({K, n * Dx, d.GH}).transpose(1, 2));
  const at::Tensor ak = c.ak.view({R, K, n, M});  // zero on inactive rows
  at::Tensor d_x, xa;
  if (d.xhead == 0) {  // folded: every head reads x_m
    const at::Tensor akm = ak.reshape({R, K * n, M});
    d_x = at::bmm(akm.transpose(1, 2), dxa.view({K, R, n, Dx}).permute({1, 0, 2, 3})
                                           .reshape({R, K * n, Dx}));
    xa = at::bmm(akm, c.xsrc.reshape({R, M, Dx}));
  } else {  // per-head values: head n reads its slice of the row
    d_x = at::einsum("rknm,krnd->rmnd", {ak, dxa.view({K, R, n, Dx})});
    xa = at::einsum("rknm,rmnd->rknd", {ak, c.xsrc.reshape({R, M, n, Dx})});
  }
  TORCH_CHECK(d_x.scalar_type() == c.keys.scalar_type() && xa.scalar_type() == c.keys.scalar_type(),
              "rims_fast::rim_seq_bwd: the input term's gradients came out as ", d_x.scalar_type(),
              ", expected ", c.keys.scalar_type());
  c.res[1] = d_x.reshape({d.T_, d.B, M, d.xrow}).contiguous();
  c.res[8] = xa.reshape({d.T_, d.B, K, n * Dx}).contiguous();
}

namespace {

at::Tensor contig_or_undef(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

}  // namespace

SeqFwdCall seq_fwd_prepare(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, int64_t tile,
    bool save, bool mma, int64_t cluster, int64_t resident, int64_t xw) {
  SeqFwdCall c;
  c.d = seq_fwd_check(keys, xsrc, w_x, h0, c0, input_query, weight_hh, bias_ih, bias_hh,
                      comm_query, comm_key, comm_value, comm_output, top_k, input_heads,
                      comm_heads, per_head, input_dropout, comm_dropout, seed, tile);
  c.keys = keys.contiguous(), c.xsrc = xsrc.contiguous(), c.w_x = w_x.contiguous();
  c.h0 = h0.contiguous(), c.c0 = c.d.lstm ? c0->contiguous() : at::Tensor();
  c.wq = input_query.contiguous(), c.whh = weight_hh.contiguous();
  c.bih = bias_ih.contiguous(), c.bhh = bias_hh.contiguous();
  c.cq = comm_query.contiguous(), c.ck = comm_key.contiguous(), c.cv = comm_value.contiguous();
  c.co = comm_output.contiguous();
  if (mma) c.w_mma = seq_mma_weights(c.d, c.w_x, c.whh, c.cq, c.ck, c.cv, c.co);
  TORCH_CHECK(cluster >= 0 && cluster <= c.d.K, "rims_fast::rim_seq_fwd: cluster (mechanisms per "
              "block of a cluster) must be in 0..K=", c.d.K, " (0: no cluster), got ", cluster);
  TORCH_CHECK(cluster == 0 || !mma, "rims_fast::rim_seq_fwd: the cluster variant runs on CUDA "
              "cores; mma=True needs cluster=0");
  TORCH_CHECK(cluster == 0 || (c.d.K + cluster - 1) / cluster <= 8, "rims_fast::rim_seq_fwd: ",
              "cluster=", cluster, " makes ", (c.d.K + cluster - 1) / cluster, " blocks of K=",
              c.d.K, " mechanisms, more than the portable cluster size 8");
  c.d.kpr = cluster;
  TORCH_CHECK(resident >= -1 && resident <= kResAll, "rims_fast::rim_seq_fwd: resident (a bit set "
              "of the weights a cluster block keeps in shared memory) must be -1 (auto) or in "
              "0..", kResAll, ", got ", resident);
  TORCH_CHECK(resident <= 0 || cluster > 0, "rims_fast::rim_seq_fwd: resident weights need "
              "cluster > 0");
  c.d.resident = resident;  // -1: each implementation's choice
  c.d.xw_hoisted = seq_use_xw(c.d, xw, mma, c.keys.element_size());
  if (c.d.xw_hoisted) {
    c.xw = seq_hoisted_xw(c.d, c.xsrc, c.w_x);
    if (c.d.resident > 0) c.d.resident &= ~kResWx;  // F is not read
  }
  c.res = seq_fwd_alloc(c.d, h0, save);
  return c;
}

SeqBwdCall seq_bwd_prepare(
    const std::optional<at::Tensor>& g_out, const std::optional<at::Tensor>& g_hn,
    const std::optional<at::Tensor>& g_cn, const at::Tensor& keys, const at::Tensor& xsrc,
    const at::Tensor& w_x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& input_query, const at::Tensor& weight_hh, const at::Tensor& bias_ih,
    const at::Tensor& bias_hh, const at::Tensor& comm_query, const at::Tensor& comm_key,
    const at::Tensor& comm_value, const at::Tensor& comm_output, const at::Tensor& masks,
    at::TensorList saved, int64_t top_k, int64_t input_heads, int64_t comm_heads, bool per_head,
    double input_dropout, double comm_dropout, int64_t seed, bool block_inactive_grad,
    int64_t tile, bool mma, int64_t xw) {
  SeqBwdCall c;
  for (const auto& t : saved) c.saved.push_back(t.contiguous());
  c.d = seq_bwd_check(g_out, g_hn, g_cn, keys, xsrc, w_x, h0, c0, input_query, weight_hh,
                      bias_ih, bias_hh, comm_query, comm_key, comm_value, comm_output, masks,
                      c.saved, top_k, input_heads, comm_heads, per_head, input_dropout,
                      comm_dropout, seed, tile);
  c.block = block_inactive_grad;
  c.g_out = contig_or_undef(g_out), c.g_hn = contig_or_undef(g_hn);
  c.g_cn = c.d.lstm ? contig_or_undef(g_cn) : at::Tensor();
  c.keys = keys.contiguous(), c.xsrc = xsrc.contiguous(), c.masks = masks.contiguous();
  c.d.xw_hoisted = seq_use_xw(c.d, xw, mma, keys.element_size());
  c.wt = seq_bwd_transposed(input_query, weight_hh, comm_query, comm_key, comm_value,
                            comm_output, w_x);
  if (mma) {
    c.d.mma = true;
    c.wb = seq_bwd_mma_weights(c.d, w_x, c.wt, c.ba);
  }
  c.res = seq_bwd_alloc(c.d, keys, xsrc);
  if (c.d.xw_hoisted) {
    // The sweep reads no F^T and writes neither d xsrc nor xa (seq_bwd_input_term makes them).
    c.wt[4] = c.res[1] = c.res[8] = at::empty({0}, keys.options());
    c.w_x = w_x.contiguous();
    c.xw = seq_hoisted_xw(c.d, c.xsrc, c.w_x);
    c.ak = at::empty({c.d.T_, c.d.B, c.d.K, c.d.n_in * c.d.M}, keys.options());
  }
  return c;
}

namespace {

// After a host block: its shared memory's guard (host_exec.h) is untouched.
template <class C>
void check_guard(const C* smem, int64_t elems, const char* which) {
  TORCH_CHECK(shared_guard_intact(smem, elems), "rims_fast: the persistent ", which,
              " kernel wrote past its shared memory (", elems, " elements) in a host run");
}

void check_host_dtype(const char* op, const at::Tensor& h0) {
  const auto st = h0.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "rims_fast::", op,
              ": the CPU implementation (a host run of the CUDA kernel, for tests) takes float32 "
              "and float64, got ", st);
}

SeqFwdResult rim_seq_fwd_cpu(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, int64_t tile,
    bool save, bool mma, int64_t cluster, int64_t resident, int64_t xw) {
  SeqFwdCall c = seq_fwd_prepare(keys, xsrc, w_x, h0, c0, input_query, weight_hh, bias_ih,
                                       bias_hh, comm_query, comm_key, comm_value, comm_output,
                                       top_k, input_heads, comm_heads, per_head, input_dropout,
                                       comm_dropout, seed, tile, save, mma, cluster, resident, xw);
  check_host_dtype("rim_seq_fwd", h0);
  // Auto: every weight resident, the most code the host run can check (no capacity limit here).
  if (c.d.resident < 0)
    c.d.resident = c.d.kpr > 0 ? kResAll & ~(c.d.xw_hoisted ? kResWx : 0) : 0;
  const RimSeqDims& d = c.d;
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "rim_seq_fwd_cpu", [&] {
    const RimSeqFwdParams<scalar_t> p = seq_fwd_params<scalar_t>(c);
    const int64_t bytes = sizeof(scalar_t);
    const int64_t elems = (rim_seq_fwd_smem_bytes(d, d.S, bytes, bytes) + bytes - 1) / bytes;
    const int64_t tiles = (d.B + d.S - 1) / d.S;  // in host_item_order(), as the blocks' order
    const bool wide = use_wide(d, kSeqWideFwdTileMax);
    if (d.kpr > 0) {  // one host thread per block of the cluster, each with its shared memory
      const int64_t ranks = (d.K + d.kpr - 1) / d.kpr;
      at::Tensor smem = at::empty({ranks, elems + kHostSharedGuard}, h0.options());
      std::vector<char*> bases;
      for (int64_t r = 0; r < ranks; ++r)
        bases.push_back(reinterpret_cast<char*>(smem[r].mutable_data_ptr<scalar_t>()));
      const bool wide1 = use_wide(d);  // the device's 512-thread tile-1 cluster kernel
      host_grid_for(tiles, [&](int64_t tile_i) {
        smem.fill_(std::numeric_limits<double>::quiet_NaN());  // poison_shared (host_exec.h)
        run_cluster_on_host(bases, [&](const ClusterHostExec& ex, int rank) {
          scalar_t* base = reinterpret_cast<scalar_t*>(bases[rank]);
          if (wide1)
            rim_seq_fwd_tile<1, scalar_t, false, true>(ex, p, tile_i, base, rank);
          else
            rim_seq_fwd_tile<kSeqTileMax, scalar_t, false, true>(ex, p, tile_i, base, rank);
        });
        for (char* b : bases) check_guard(reinterpret_cast<const scalar_t*>(b), elems, "forward");
      });
      return;
    }
    // An ATen buffer: 64-byte aligned, as the tensor-core tiles require of shared memory's base.
    at::Tensor smem = at::empty({elems + kHostSharedGuard}, h0.options());
    scalar_t* base = smem.mutable_data_ptr<scalar_t>();
    host_grid_for(tiles, [&](int64_t tile_i) {
      poison_shared(base, elems);
      if (d.mma)
        rim_seq_fwd_tile<kSeqTileMax, scalar_t, true>(HostExec{}, p, tile_i, base);
      else if (wide && d.S == 2)  // the device's 512-thread kernels' instantiations
        rim_seq_fwd_tile<2, scalar_t>(HostExec{}, p, tile_i, base);
      else if (wide)
        rim_seq_fwd_tile<1, scalar_t>(HostExec{}, p, tile_i, base);
      else
        rim_seq_fwd_tile<kSeqTileMax, scalar_t>(HostExec{}, p, tile_i, base);
      check_guard(base, elems, "forward");
    });
  });
  return c.res;
}

SeqBwdResult rim_seq_bwd_cpu(
    const std::optional<at::Tensor>& g_out, const std::optional<at::Tensor>& g_hn,
    const std::optional<at::Tensor>& g_cn, const at::Tensor& keys, const at::Tensor& xsrc,
    const at::Tensor& w_x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& input_query, const at::Tensor& weight_hh, const at::Tensor& bias_ih,
    const at::Tensor& bias_hh, const at::Tensor& comm_query, const at::Tensor& comm_key,
    const at::Tensor& comm_value, const at::Tensor& comm_output, const at::Tensor& masks,
    at::TensorList saved, int64_t top_k, int64_t input_heads, int64_t comm_heads, bool per_head,
    double input_dropout, double comm_dropout, int64_t seed, bool block_inactive_grad,
    int64_t tile, bool mma, int64_t xw) {
  SeqBwdCall c = seq_bwd_prepare(g_out, g_hn, g_cn, keys, xsrc, w_x, h0, c0, input_query,
                                 weight_hh, bias_ih, bias_hh, comm_query, comm_key, comm_value,
                                 comm_output, masks, saved, top_k, input_heads, comm_heads,
                                 per_head, input_dropout, comm_dropout, seed, block_inactive_grad,
                                 tile, mma, xw);
  check_host_dtype("rim_seq_bwd", h0);
  const RimSeqDims& d = c.d;
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "rim_seq_bwd_cpu", [&] {
    const RimSeqBwdParams<scalar_t> p = seq_bwd_params<scalar_t>(c);
    const int64_t bytes = sizeof(scalar_t);
    const int64_t elems =
        rim_seq_bwd_smem_elems(d.S, d.M, d.K, d.H, d.GH, d.n_in, d.nk, rim_seq_bwd_dgf_width(d),
                               d.n_c, d.ck, d.cv,
                               d.lstm, d.mma) +
        (d.mma ? mma_smem_elems(d.K, d.S, c.ba, bytes, bytes) : 0);
    // 64-byte aligned, as in the forward
    at::Tensor smem = at::empty({elems + kHostSharedGuard}, h0.options());
    const int64_t tiles = (d.B + d.S - 1) / d.S;
    const bool wide = use_wide(d);
    scalar_t* base = smem.mutable_data_ptr<scalar_t>();
    host_grid_for(tiles, [&](int64_t tile_i) {
      poison_shared(base, elems);
      if (d.mma)
        rim_seq_bwd_tile<kSeqTileMax, scalar_t, true>(HostExec{}, p, tile_i, base);
      else if (wide)
        rim_seq_bwd_tile<1, scalar_t>(HostExec{}, p, tile_i, base);
      else
        rim_seq_bwd_tile<kSeqTileMax, scalar_t>(HostExec{}, p, tile_i, base);
      check_guard(base, elems, "backward");
    });
  });
  if (d.xw_hoisted) seq_bwd_input_term(c);
  return c.res;
}

}  // namespace
}  // namespace rims

TORCH_LIBRARY_FRAGMENT(rims_fast, m) {
  m.def("rim_seq_fwd(Tensor keys, Tensor xsrc, Tensor w_x, Tensor h0, Tensor? c0,"
        " Tensor input_query, Tensor weight_hh, Tensor bias_ih, Tensor bias_hh,"
        " Tensor comm_query, Tensor comm_key, Tensor comm_value, Tensor comm_output, int top_k,"
        " int input_heads, int comm_heads, bool per_head, float input_dropout,"
        " float comm_dropout, int seed, int tile, bool save, bool mma=False, int cluster=0,"
        " int resident=-1, int xw=-1) -> Tensor[]");
  m.def("rim_seq_bwd(Tensor? grad_out, Tensor? grad_h_n, Tensor? grad_c_n, Tensor keys,"
        " Tensor xsrc, Tensor w_x, Tensor h0, Tensor? c0, Tensor input_query, Tensor weight_hh,"
        " Tensor bias_ih, Tensor bias_hh, Tensor comm_query, Tensor comm_key, Tensor comm_value,"
        " Tensor comm_output, Tensor masks, Tensor[] saved, int top_k, int input_heads,"
        " int comm_heads, bool per_head, float input_dropout, float comm_dropout, int seed,"
        " bool block_inactive_grad, int tile, bool mma=False, int xw=-1) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(rims_fast, CPU, m) {
  m.impl("rim_seq_fwd", &rims::rim_seq_fwd_cpu);
  m.impl("rim_seq_bwd", &rims::rim_seq_bwd_cpu);
}

#ifdef RIMS_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(rims_fast, CUDA, m) {
  m.impl("rim_seq_fwd", &rims::rim_seq_fwd_cuda);
  m.impl("rim_seq_bwd", &rims::rim_seq_bwd_cuda);
}
#endif
