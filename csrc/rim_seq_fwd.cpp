// rims_fast::rim_seq_fwd — the persistent whole-sequence forward of csrc/kernels/rim_seq_fwd.cuh.
// Here: the schema, the argument checks (shared with the CUDA launcher) and the CPU
// implementation, which runs the kernel's tile function on the host with HostExec (items in
// order, so every barrier holds trivially). It exists so that CI checks the kernel's arithmetic
// against the reference without a GPU; it is not a fast path (backend="cpu" is).
#include "rim_seq_fwd.h"

#include <torch/library.h>

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

}  // namespace

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
              " (0 = automatic), got ", tile);
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

namespace {

// Host run of the kernel: every tile in order, one shared-memory buffer reused.
template <typename T>
SeqFwdResult seq_fwd_host(const RimSeqDims& d, const at::Tensor& keys, const at::Tensor& xsrc,
                          const at::Tensor& w_x, const at::Tensor& h0, const at::Tensor& c0,
                          const at::Tensor& wq, const at::Tensor& whh, const at::Tensor& bih,
                          const at::Tensor& bhh, const at::Tensor& cq, const at::Tensor& ck,
                          const at::Tensor& cv, const at::Tensor& co) {
  const auto opt = h0.options();
  at::Tensor out = at::empty({d.T_, d.B, d.K * d.H}, opt);
  at::Tensor h_n = at::empty({d.B, d.K, d.H}, opt);
  at::Tensor c_n = d.lstm ? at::empty({d.B, d.K, d.H}, opt) : at::empty({0}, opt);
  at::Tensor masks = at::empty({d.T_, d.B, d.K}, opt.dtype(at::kBool));
  RimSeqFwdParams<T> p;
  static_cast<RimSeqDims&>(p) = d;
  p.keys = keys.const_data_ptr();
  p.xsrc = xsrc.const_data_ptr();
  p.w_x = w_x.const_data_ptr();
  p.h0 = h0.const_data_ptr<T>();
  p.c0 = d.lstm ? c0.const_data_ptr<T>() : nullptr;
  p.w_query = wq.const_data_ptr<T>();
  p.w_hh = whh.const_data_ptr<T>();
  p.b_ih = bih.const_data_ptr<T>();
  p.b_hh = bhh.const_data_ptr<T>();
  p.c_query = cq.const_data_ptr<T>();
  p.c_key = ck.const_data_ptr<T>();
  p.c_value = cv.const_data_ptr<T>();
  p.c_output = co.const_data_ptr<T>();
  p.out = out.mutable_data_ptr<T>();
  p.h_n = h_n.mutable_data_ptr<T>();
  p.c_n = d.lstm ? c_n.mutable_data_ptr<T>() : nullptr;
  p.masks = masks.mutable_data_ptr<bool>();
  std::vector<T> smem(rim_seq_smem_elems(d.S, d.M, d.K, d.H, d.GH, d.n_in, d.nk, d.Dx, d.n_c,
                                         d.ck, d.cv, d.lstm));
  const int64_t tiles = (d.B + d.S - 1) / d.S;
  for (int64_t tile = 0; tile < tiles; ++tile)
    rim_seq_fwd_tile<kSeqTileMax, T>(HostExec{}, p, tile, smem.data());
  return {out, h_n, c_n, masks};
}

SeqFwdResult rim_seq_fwd_cpu(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, int64_t tile) {
  const RimSeqDims d = seq_fwd_check(keys, xsrc, w_x, h0, c0, input_query, weight_hh, bias_ih,
                                     bias_hh, comm_query, comm_key, comm_value, comm_output,
                                     top_k, input_heads, comm_heads, per_head, input_dropout,
                                     comm_dropout, seed, tile);
  const auto st = h0.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble,
              "rims_fast::rim_seq_fwd: the CPU implementation (a host run of the CUDA kernel, "
              "for tests) takes float32 and float64, got ", st);
  auto c = [](const at::Tensor& t) { return t.contiguous(); };
  const at::Tensor c0c = d.lstm ? c0->contiguous() : at::Tensor();
  SeqFwdResult res;
  AT_DISPATCH_FLOATING_TYPES(st, "rim_seq_fwd_cpu", [&] {
    res = seq_fwd_host<scalar_t>(d, c(keys), c(xsrc), c(w_x), c(h0), c0c, c(input_query),
                                 c(weight_hh), c(bias_ih), c(bias_hh), c(comm_query),
                                 c(comm_key), c(comm_value), c(comm_output));
  });
  return res;
}

}  // namespace
}  // namespace rims

TORCH_LIBRARY_FRAGMENT(rims_fast, m) {
  m.def("rim_seq_fwd(Tensor keys, Tensor xsrc, Tensor w_x, Tensor h0, Tensor? c0,"
        " Tensor input_query, Tensor weight_hh, Tensor bias_ih, Tensor bias_hh,"
        " Tensor comm_query, Tensor comm_key, Tensor comm_value, Tensor comm_output, int top_k,"
        " int input_heads, int comm_heads, bool per_head, float input_dropout,"
        " float comm_dropout, int seed, int tile) -> (Tensor out, Tensor h_n, Tensor c_n,"
        " Tensor masks)");
}

TORCH_LIBRARY_IMPL(rims_fast, CPU, m) {
  m.impl("rim_seq_fwd", &rims::rim_seq_fwd_cpu);
}

#ifdef RIMS_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(rims_fast, CUDA, m) {
  m.impl("rim_seq_fwd", &rims::rim_seq_fwd_cuda);
}
#endif
