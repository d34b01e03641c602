// The C++ sequence driver (backend="cpu"): one RIM layer over a whole sequence in one call, with
// a hand-written backward through time. SPEC.md is the contract; rims_fast/reference.py the
// oracle; rims_fast/rim_cpu.py registers the fake impls and the autograd formula.
//
// Layout. Every per-step tensor is (T, B, K, X): the K mechanisms of one sample are adjacent, and
// mechanism k of all samples (and of all steps) is one strided matrix with leading dimension
// K*X, which BLAS takes as is. Matrix products are ATen calls (mm_out / addmm_ / einsum) on
// views: they go to BLAS.
//
// Threads. Each step alternates phases "per sample" (the competition and the communication
// attention need all K mechanisms of a sample) and "per mechanism" (a task runs mechanism k's
// GEMMs single-threaded, inside at::parallel_for, then its pointwise work on all samples): a few
// barriers per step instead of a thread team per small GEMM.
//
// The input term is always folded (fold = input_value_n weight_ih[k]_n, xw = x fold), whatever
// M*D vs d_v: the reference switches to projecting values when M*D > d_v; the sums are the same,
// reassociated. xw holds T*B*M*K*n_in*G*H values.
//
// Forward. Hoisted over all T*B*M rows, before the loop: the input keys (x input_key) and the
// cell's input term folded through the values, xw = x (input_value_n weight_ih[k]_n) for every
// (k, n) (the read is linear in the probabilities, so u_k weight_ih[k] = sum_{n,m} a x_m fold).
// Per step: the queries (K GEMMs over B), scores, null softmax, p and the rank rule (one
// parallel pass), the recurrent gate GEMM of the ACTIVE rows only (gathered per mechanism), the
// cell pointwise, the Q|K|V communication GEMM (weights packed once per call), the attention
// pointwise, and the output projection of the active rows only.
//
// Saved for backward (save=true), all in the compute dtype: out (it is the h history), the c
// history (LSTM), h~ (after the cell, before communication), the input queries, the undropped
// input probabilities a, the gate pre-activations (LSTM: i,f,g,o with both terms and biases;
// GRU: gi | gh), the communication Q|K|V, the undropped communication probabilities, the
// dropped read o, plus the hoisted keys, xw and fold. Recomputed in backward: the cell
// activations (from the pre-activations), the dropout masks (from the counter-based stream),
// the dropped probabilities. With save=false only out, the masks, the final state and two
// steps of c are kept: per-step buffers are reused.
//
// Backward. A reverse sweep carries dh, dc and produces, per step, the gradients of the queries,
// gate pre-activations, communication Q|K|V and h' (masked to active rows); the weight
// gradients are then a few large GEMMs over all T*B rows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels/masked_cell.cuh"
#include "kernels/rim_numerics.h"
#include "rim_cpu_simd.h"

namespace rims {
namespace {

using at::Tensor;

struct Dims {
  int64_t T, B, M, D, K, H, G, GH, GW;  // GW: saved gate width (LSTM 4H, GRU gi|gh = 6H)
  int64_t n_in, dk, dv, nk, nv;
  int64_t n_c, dc, dcv, ck, cv, C3;  // C3 = 2*ck + cv: packed comm Q|K|V
  int64_t top_k;
  bool lstm;
  double p_in, p_c;
  uint64_t seed;
  bool drop_in() const { return p_in > 0.0; }
  bool drop_c() const { return p_c > 0.0; }
};

// Argument checks shared by both ops; returns the sizes.
Dims check_args(const char* op, const Tensor& x, const Tensor& h0, const std::optional<Tensor>& c0,
                const Tensor& input_key, const Tensor& input_value, const Tensor& input_query,
                const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& bias_ih,
                const Tensor& bias_hh, const Tensor& comm_query, const Tensor& comm_key,
                const Tensor& comm_value, const Tensor& comm_output, int64_t top_k,
                int64_t input_heads, int64_t comm_heads, double input_dropout,
                double comm_dropout, int64_t seed) {
  TORCH_CHECK(x.dim() == 4, "rims_fast::", op, ": x must have dim 4 (T, B, M, D), got shape ",
              x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "rims_fast::", op,
              ": x must be float32 or float64 (rims_fast.rim_cpu converts half precision), got ",
              dtype);
  Dims d{};
  d.T = x.size(0), d.B = x.size(1), d.M = x.size(2), d.D = x.size(3);
  TORCH_CHECK(weight_hh.dim() == 3, "rims_fast::", op, ": weight_hh must be (K, H, G*H), got ",
              weight_hh.sizes());
  d.K = weight_hh.size(0), d.H = weight_hh.size(1), d.GH = weight_hh.size(2);
  TORCH_CHECK(d.H > 0 && (d.GH == 4 * d.H || d.GH == 3 * d.H), "rims_fast::", op,
              ": weight_hh must be (K, H, 4H) (LSTM) or (K, H, 3H) (GRU), got ", weight_hh.sizes());
  d.G = d.GH / d.H;
  d.lstm = d.G == 4;
  d.GW = d.lstm ? d.GH : 2 * d.GH;
  TORCH_CHECK(d.lstm == (c0.has_value() && c0->defined()), "rims_fast::", op,
              d.lstm ? ": c0 is required for an LSTM cell" : ": c0 must be None for a GRU cell");
  TORCH_CHECK(input_heads >= 1 && comm_heads >= 1, "rims_fast::", op, ": heads must be >= 1");
  d.n_in = input_heads, d.n_c = comm_heads;
  d.nk = input_key.size(-1), d.nv = input_value.size(-1);
  d.ck = comm_query.size(-1), d.cv = comm_value.size(-1);
  TORCH_CHECK(d.nk % d.n_in == 0 && d.nv % d.n_in == 0, "rims_fast::", op,
              ": input_key/input_value widths must be divisible by input_heads");
  TORCH_CHECK(d.ck % d.n_c == 0 && d.cv % d.n_c == 0, "rims_fast::", op,
              ": comm_query/comm_value widths must be divisible by comm_heads");
  d.dk = d.nk / d.n_in, d.dv = d.nv / d.n_in, d.dc = d.ck / d.n_c, d.dcv = d.cv / d.n_c;
  d.C3 = 2 * d.ck + d.cv;
  TORCH_CHECK(top_k >= 1 && top_k <= d.K, "rims_fast::", op, ": top_k must be in 1..K=", d.K);
  d.top_k = top_k;
  TORCH_CHECK(input_dropout >= 0.0 && input_dropout < 1.0 && comm_dropout >= 0.0 &&
                  comm_dropout < 1.0, "rims_fast::", op, ": dropout must be in [0, 1)");
  d.p_in = input_dropout, d.p_c = comm_dropout;
  d.seed = static_cast<uint64_t>(seed);

  const int64_t K = d.K, H = d.H;
  auto check = [&](const char* name, const Tensor& t, std::vector<int64_t> shape) {
    TORCH_CHECK(t.scalar_type() == dtype, "rims_fast::", op, ": ", name, " has dtype ",
                t.scalar_type(), " but x has dtype ", dtype);
    TORCH_CHECK(t.device().is_cpu(), "rims_fast::", op, ": ", name, " must be a CPU tensor, got ",
                t.device());
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "rims_fast::", op, ": ", name,
                " must have shape ", at::IntArrayRef(shape), ", got shape ", t.sizes());
  };
  check("x", x, {d.T, d.B, d.M, d.D});
  check("h0", h0, {d.B, K, H});
  if (d.lstm) check("c0", *c0, {d.B, K, H});
  check("input_key", input_key, {d.D, d.nk});
  check("input_value", input_value, {d.D, d.nv});
  check("input_query", input_query, {K, H, d.nk});
  check("weight_ih", weight_ih, {K, d.nv, d.GH});
  check("weight_hh", weight_hh, {K, H, d.GH});
  check("bias_ih", bias_ih, {K, d.GH});
  check("bias_hh", bias_hh, {K, d.GH});
  check("comm_query", comm_query, {K, H, d.ck});
  check("comm_key", comm_key, {K, H, d.ck});
  check("comm_value", comm_value, {K, H, d.cv});
  check("comm_output", comm_output, {K, d.cv, H});
  return d;
}

// fold[d, k, n, g] = sum_v input_value[d, n*dv + v] weight_ih[k, n*dv + v, g]: (D, K*n_in*GH).
Tensor make_fold(const Dims& d, const Tensor& input_value, const Tensor& weight_ih) {
  return at::einsum("dnv,knvg->dkng", {input_value.view({d.D, d.n_in, d.dv}),
                                       weight_ih.view({d.K, d.n_in, d.dv, d.GH})})
      .contiguous();
}

// Per-step bookkeeping of the active rows: cnt[k] active samples of mechanism k, idx[k*B + r]
// the r-th of them, pos[b*K + k] the row of (b, k) in mechanism k's gathered block (or -1).
struct ActiveRows {
  std::vector<int64_t> cnt, idx, pos;
  ActiveRows(int64_t B, int64_t K) : cnt(K), idx(K * B), pos(B * K) {}
  void build(const bool* mask, int64_t B, int64_t K) {
    std::fill(cnt.begin(), cnt.end(), 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) {
        if (mask[b * K + k]) {
          pos[b * K + k] = cnt[k];
          idx[k * B + cnt[k]++] = b;
        } else {
          pos[b * K + k] = -1;
        }
      }
  }
};

// C = A @ B into an existing (possibly strided, row-major with leading dim >= cols) view.
void mm_into(Tensor c, const Tensor& a, const Tensor& b) { at::mm_out(c, a, b); }

template <size_t... I>
auto to_tuple_impl(const std::vector<Tensor>& v, std::index_sequence<I...>) {
  return std::make_tuple(v[I]...);
}
template <size_t N>
auto to_tuple(const std::vector<Tensor>& v) {
  return to_tuple_impl(v, std::make_index_sequence<N>{});
}

template <typename F>
void parallel_over(int64_t n, const F& f) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

// Row-major (rows, cols) view of mechanism k's slice of a (..., K, cols) block whose leading
// dims flatten to `rows` (e.g. one step's (B, K, X), or all steps' (T, B, K, X)).
Tensor mech(const Tensor& t, int64_t rows, int64_t K, int64_t k) {
  const int64_t cols = t.size(-1);
  return t.view({rows, K, cols}).select(1, k);
}

uint64_t in_index(const Dims& d, int64_t t, int64_t b, int64_t k, int64_t n, int64_t m) {
  return static_cast<uint64_t>((((t * d.B + b) * d.K + k) * d.n_in + n) * d.M + m);
}
uint64_t comm_index(const Dims& d, int64_t t, int64_t b, int64_t k, int64_t n, int64_t j) {
  return static_cast<uint64_t>((((t * d.B + b) * d.K + k) * d.n_c + n) * d.K + j);
}

// ================================= forward =================================
// Barriers per step: 4 parallel phases, alternating "per mechanism" (each task runs its own
// single-threaded GEMMs on mechanism k's rows: no thread team per small GEMM) and "per sample"
// (the competition and the communication attention need all K mechanisms of a sample).
template <typename S>
std::vector<Tensor> forward_impl(const Dims& d, const Tensor& x, const Tensor& h0, const Tensor& c0,
                                 const Tensor& Wk, const Tensor& Wq, const Tensor& fold,
                                 const Tensor& Whh, const Tensor& bih, const Tensor& bhh,
                                 const Tensor& Wc, const Tensor& Wco, bool save) {
  const int64_t T = d.T, B = d.B, M = d.M, K = d.K, H = d.H, GH = d.GH, GW = d.GW;
  const int64_t n_in = d.n_in, dk = d.dk, nk = d.nk, n_c = d.n_c, dc = d.dc, dcv = d.dcv;
  const int64_t ck = d.ck, cv = d.cv, C3 = d.C3;
  const auto opt = x.options();
  const S scale_in = S(1.0 / std::sqrt(double(dk)));
  const S scale_c = S(1.0 / std::sqrt(double(dc)));
  const S keep_in = S(1.0 - d.p_in), keep_c = S(1.0 - d.p_c);

  // Hoisted, state-independent work over all T*B*M rows (multi-threaded BLAS).
  const Tensor x2 = x.view({T * B * M, d.D});
  const Tensor keys = at::mm(x2, Wk);  // (T, B, M, nk)
  const Tensor xw = at::mm(x2, fold);  // (T, B, M, K, n_in, GH)

  const int64_t Ts = save ? T : 1;                        // per-step buffers: all, or one reused
  const int64_t Tc = save ? T : std::min<int64_t>(T, 2);  // c history: all, or ping-pong
  Tensor out = at::empty({T, B, K, H}, opt);
  Tensor masks = at::empty({T, B, K}, opt.dtype(at::kBool));
  Tensor cs = d.lstm ? at::empty({Tc, B, K, H}, opt) : at::empty({0}, opt);
  Tensor htil = at::empty({Ts, B, K, H}, opt);
  Tensor q = at::empty({Ts, B, K, nk}, opt);
  Tensor a = at::empty({Ts, B, K, n_in, M}, opt);
  Tensor gates = at::empty({Ts, B, K, GW}, opt);
  Tensor qkv = at::empty({Ts, B, K, C3}, opt);
  Tensor bprob = at::empty({Ts, B, K, n_c, K}, opt);
  Tensor o = at::empty({Ts, B, K, cv}, opt);
  // Gathered active rows per mechanism (compact, (K, B, .)), reused every step.
  Tensor hg = at::empty({K, B, H}, opt), ghc = at::empty({K, B, GH}, opt);
  Tensor og = at::empty({K, B, cv}, opt), rc = at::empty({K, B, H}, opt);
  ActiveRows rows(B, K);

  const S* keys_p = keys.const_data_ptr<S>();
  const S* xw_p = xw.const_data_ptr<S>();
  const S* bih_p = bih.const_data_ptr<S>();
  const S* bhh_p = bhh.const_data_ptr<S>();
  S* out_p = out.mutable_data_ptr<S>();
  bool* mask_p = masks.mutable_data_ptr<bool>();
  S* cs_p = d.lstm ? cs.mutable_data_ptr<S>() : nullptr;
  S* htil_p = htil.mutable_data_ptr<S>();
  S* q_p = q.mutable_data_ptr<S>();
  S* a_p = a.mutable_data_ptr<S>();
  S* gates_p = gates.mutable_data_ptr<S>();
  S* qkv_p = qkv.mutable_data_ptr<S>();
  S* bp_p = bprob.mutable_data_ptr<S>();
  S* o_p = o.mutable_data_ptr<S>();
  S* hg_p = hg.mutable_data_ptr<S>();
  const S* ghc_p = ghc.const_data_ptr<S>();
  S* og_p = og.mutable_data_ptr<S>();
  const S* rc_p = rc.const_data_ptr<S>();
  const int64_t BKH = B * K * H;

  // Per mechanism: finish step t-1 (h' = h~ + o comm_output on its active rows), then the
  // queries of step t from h_{t-1} (every mechanism: its state decides p, active or not).
  auto tail_and_queries = [&](int64_t t, int64_t k) {
    if (t > 0) {
      const int64_t tp = t - 1, n = rows.cnt[k];
      if (n > 0) mm_into(rc[k].narrow(0, 0, n), og[k].narrow(0, 0, n), Wco[k]);
      const S* ht = htil_p + (save ? tp : 0) * BKH;
      S* outt = out_p + tp * BKH;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = b * K + k, r = rows.pos[row];
        const S* src = ht + row * H;
        S* dst = outt + row * H;
        if (r < 0) {
          std::copy_n(src, H, dst);
        } else {
          const S* add = rc_p + (k * B + r) * H;
          for (int64_t j = 0; j < H; ++j) dst[j] = src[j] + add[j];
        }
      }
    }
    if (t < T) {
      const Tensor h_prev = t == 0 ? h0 : out[t - 1];
      mm_into(mech(q[save ? t : 0], B, K, k), mech(h_prev, B, K, k), Wq[k]);
    }
  };

  for (int64_t t = 0; t < T; ++t) {
    const int64_t ts = save ? t : 0;
    const S* hp = t == 0 ? h0.const_data_ptr<S>() : out_p + (t - 1) * BKH;
    const S* cp = !d.lstm ? nullptr : t == 0 ? c0.const_data_ptr<S>() : cs_p + ((t - 1) % Tc) * BKH;
    S* cn = d.lstm ? cs_p + (t % Tc) * BKH : nullptr;
    parallel_over(K, [&](int64_t k) { tail_and_queries(t, k); });

    // 1-2. Scores, null softmax, p and the rank rule, per sample.
    const S* qt = q_p + ts * B * K * nk;
    const S* kt = keys_p + t * B * M * nk;
    S* at_ = a_p + ts * B * K * n_in * M;
    bool* mt = mask_p + t * B * K;
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<S> s(M), p(K);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t k = 0; k < K; ++k) {
          S psum = S(0);
          for (int64_t n = 0; n < n_in; ++n) {
            const S* qv = qt + (b * K + k) * nk + n * dk;
            for (int64_t m = 0; m < M; ++m) {
              const S* kv = kt + (b * M + m) * nk + n * dk;
              S dot = S(0);
              for (int64_t i = 0; i < dk; ++i) dot += qv[i] * kv[i];
              s[m] = dot * scale_in;
            }
            psum += null_softmax(s.data(), M, at_ + ((b * K + k) * n_in + n) * M);
          }
          p[k] = psum / S(n_in);
        }
        for (int64_t k = 0; k < K; ++k) mt[b * K + k] = competition_active(p.data(), K, k, d.top_k);
      }
    });
    rows.build(mt, B, K);

    // 3. Per mechanism: recurrent gate GEMM of the active rows, input term (folded), cell
    // pointwise (inactive rows copy), then 4.'s Q|K|V GEMM of all its rows.
    S* gt = gates_p + ts * B * K * GW;
    S* ht = htil_p + ts * BKH;
    const S* xwt = xw_p + t * B * M * K * n_in * GH;
    const Tensor htil_t = htil[ts], qkv_t = qkv[ts];
    parallel_over(K, [&](int64_t k) {
      const int64_t cnt = rows.cnt[k];
      for (int64_t r = 0; r < cnt; ++r)
        std::copy_n(hp + (rows.idx[k * B + r] * K + k) * H, H, hg_p + (k * B + r) * H);
      if (cnt > 0) mm_into(ghc[k].narrow(0, 0, cnt), hg[k].narrow(0, 0, cnt), Whh[k]);
      const S* bi = bih_p + k * GH;
      const S* bh = bhh_p + k * GH;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = b * K + k, r = rows.pos[row];
        S* g = gt + row * GW;
        if (r < 0) {
          std::copy_n(hp + row * H, H, ht + row * H);
          if (d.lstm) std::copy_n(cp + row * H, H, cn + row * H);
          std::fill_n(g, GW, S(0));
          continue;
        }
        // gi = sum_{n,m} a~ xw + bias_ih (a~: the dropped probabilities).
        std::fill_n(g, GH, S(0));
        for (int64_t n = 0; n < n_in; ++n)
          for (int64_t m = 0; m < M; ++m) {
            S w = at_[(row * n_in + n) * M + m];
            if (d.drop_in())
              w = dropout_keep(d.seed, 0, in_index(d, t, b, k, n, m), float(d.p_in)) ? w / keep_in
                                                                                     : S(0);
            const S* src = xwt + ((b * M + m) * K + k) * n_in * GH + n * GH;
            for (int64_t j = 0; j < GH; ++j) g[j] += w * src[j];
          }
        const S* gh_c = ghc_p + (k * B + r) * GH;
        if (d.lstm) {
          for (int64_t j = 0; j < GH; ++j) g[j] = (g[j] + bi[j]) + (gh_c[j] + bh[j]);
          lstm_row_fwd(g, cp + row * H, ht + row * H, cn + row * H, H);
        } else {
          S* gh = g + GH;
          for (int64_t j = 0; j < GH; ++j) {
            g[j] = g[j] + bi[j];
            gh[j] = gh_c[j] + bh[j];
          }
          for (int64_t j = 0; j < H; ++j)
            ht[row * H + j] = gru_pointwise_fwd(g[j], g[H + j], g[2 * H + j], gh[j], gh[H + j],
                                                gh[2 * H + j], hp[row * H + j]);
        }
      }
      mm_into(mech(qkv_t, B, K, k), mech(htil_t, B, K, k), Wc[k]);
    });

    // 4. Communication attention of the active mechanisms, per sample.
    const S* qkvt = qkv_p + ts * B * K * C3;
    S* bpt = bp_p + ts * B * K * n_c * K;
    S* ot = o_p + ts * B * K * cv;
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<S> sc(K);
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t k = 0; k < K; ++k) {
          const int64_t row = b * K + k, r = rows.pos[row];
          S* orow = ot + row * cv;
          S* brow = bpt + row * n_c * K;
          std::fill_n(orow, cv, S(0));
          if (r < 0) {
            std::fill_n(brow, n_c * K, S(0));
            continue;
          }
          for (int64_t n = 0; n < n_c; ++n) {
            const S* qc = qkvt + row * C3 + n * dc;
            for (int64_t j = 0; j < K; ++j) {
              const S* kc = qkvt + (b * K + j) * C3 + ck + n * dc;
              S dot = S(0);
              for (int64_t i = 0; i < dc; ++i) dot += qc[i] * kc[i];
              sc[j] = dot * scale_c;
            }
            S* y = brow + n * K;
            softmax(sc.data(), K, y);
            for (int64_t j = 0; j < K; ++j) {
              S w = y[j];
              if (d.drop_c())
                w = dropout_keep(d.seed, 1, comm_index(d, t, b, k, n, j), float(d.p_c)) ? w / keep_c
                                                                                        : S(0);
              const S* vc = qkvt + (b * K + j) * C3 + 2 * ck + n * dcv;
              for (int64_t i = 0; i < dcv; ++i) orow[n * dcv + i] += w * vc[i];
            }
          }
          std::copy_n(orow, cv, og_p + (k * B + r) * cv);
        }
    });
  }
  // 5. The last step's h'.
  parallel_over(K, [&](int64_t k) { tail_and_queries(T, k); });

  Tensor h_n = out[T - 1].clone();
  Tensor c_n = d.lstm ? cs[(T - 1) % Tc].clone() : at::empty({0}, opt);
  Tensor none = at::empty({0}, opt);
  if (!save)
    return {out.view({T, B, K * H}), h_n, c_n, masks, none, none, none, none, none,
            none, none, none, none, none, none};
  return {out.view({T, B, K * H}), h_n, c_n, masks, cs, htil, q, a, gates, qkv, bprob, o,
          keys.view({T, B, M, nk}), xw.view({T, B, M, K, n_in, GH}), fold};
}

auto rim_cpu_fwd(const Tensor& x_, const Tensor& h0_, const std::optional<Tensor>& c0_,
                                const Tensor& input_key, const Tensor& input_value,
                                const Tensor& input_query, const Tensor& weight_ih,
                                const Tensor& weight_hh, const Tensor& bias_ih,
                                const Tensor& bias_hh, const Tensor& comm_query,
                                const Tensor& comm_key, const Tensor& comm_value,
                                const Tensor& comm_output, int64_t top_k, int64_t input_heads,
                                int64_t comm_heads, double input_dropout, double comm_dropout,
                                int64_t seed, bool /*block_inactive_grad: backward only*/,
                                bool save) {
  const Dims d = check_args("rim_cpu_fwd", x_, h0_, c0_, input_key, input_value, input_query,
                            weight_ih, weight_hh, bias_ih, bias_hh, comm_query, comm_key,
                            comm_value, comm_output, top_k, input_heads, comm_heads,
                            input_dropout, comm_dropout, seed);
  const Tensor x = x_.contiguous(), h0 = h0_.contiguous();
  const Tensor c0 = d.lstm ? c0_->contiguous() : Tensor();
  const Tensor fold = make_fold(d, input_value, weight_ih).view({d.D, -1});
  const Tensor Wc = at::cat({comm_query, comm_key, comm_value}, -1).contiguous();
  std::vector<Tensor> res;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rim_cpu_fwd", [&] {
    res = forward_impl<scalar_t>(d, x, h0, c0, input_key.contiguous(), input_query.contiguous(),
                                 fold, weight_hh.contiguous(), bias_ih.contiguous(),
                                 bias_hh.contiguous(), Wc, comm_output.contiguous(), save);
  });
  return to_tuple<15>(res);
}

// ================================= backward =================================
// Barriers per step: 2 parallel phases, per sample (communication attention backward) and per
// mechanism (everything else, including the head of step t-1). Weight gradients afterwards.
template <typename S>
std::vector<Tensor> backward_impl(const Dims& d, bool block, const Tensor& grad_out,
                                  const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x,
                                  const Tensor& h0, const Tensor& c0, const Tensor& Wk,
                                  const Tensor& Wv, const Tensor& Wq, const Tensor& Wih,
                                  const Tensor& Whh, const Tensor& Wc, const Tensor& Wco,
                                  const Tensor& out, const Tensor& masks, const Tensor& cs,
                                  const Tensor& htil, const Tensor& q, const Tensor& a,
                                  const Tensor& gates, const Tensor& qkv, const Tensor& bprob,
                                  const Tensor& o, const Tensor& keys, const Tensor& xw,
                                  const Tensor& fold) {
  const int64_t T = d.T, B = d.B, M = d.M, D = d.D, K = d.K, H = d.H, GH = d.GH, GW = d.GW;
  const int64_t n_in = d.n_in, dk = d.dk, nk = d.nk, n_c = d.n_c, dc = d.dc, dcv = d.dcv;
  const int64_t ck = d.ck, cv = d.cv, C3 = d.C3;
  const auto opt = x.options();
  const S scale_in = S(1.0 / std::sqrt(double(dk)));
  const S scale_c = S(1.0 / std::sqrt(double(dc)));
  const S keep_in = S(1.0 - d.p_in), keep_c = S(1.0 - d.p_c);
  const int64_t BKH = B * K * H;

  // Per-step gradients kept for the weight GEMMs after the sweep.
  Tensor dQ = at::empty({T, B, K, nk}, opt);
  Tensor dS = at::empty({T, B, K, n_in, M}, opt);  // d scores of the input attention
  Tensor dG = at::empty({T, B, K, GW}, opt);       // LSTM d(i,f,g,o); GRU d(gi) | d(gh)
  Tensor dQKV = at::empty({T, B, K, C3}, opt);
  Tensor dHP = at::empty({T, B, K, H}, opt);       // dh' of active rows, 0 elsewhere
  // Carried state gradients and per-step workspaces.
  Tensor dh = grad_h_n.defined() ? grad_h_n.clone() : at::zeros({B, K, H}, opt);
  if (grad_out.defined()) dh.add_(grad_out[T - 1]);
  Tensor dcar = d.lstm ? (grad_c_n.defined() ? grad_c_n.clone() : at::zeros({B, K, H}, opt))
                       : Tensor();
  Tensor dh_next = at::empty({B, K, H}, opt), tmp = at::empty({B, K, H}, opt);
  Tensor dhg = at::empty({K, B, H}, opt), doc = at::empty({K, B, cv}, opt);
  Tensor dgg = at::empty({K, B, GH}, opt), dhc = at::empty({K, B, H}, opt);
  ActiveRows rows(B, K), rows_prev(B, K);

  const bool* mask_p = masks.const_data_ptr<bool>();
  const S* cs_p = d.lstm ? cs.const_data_ptr<S>() : nullptr;
  const S* out_p = out.const_data_ptr<S>();
  const S* q_p = q.const_data_ptr<S>();
  const S* a_p = a.const_data_ptr<S>();
  const S* gates_p = gates.const_data_ptr<S>();
  const S* qkv_p = qkv.const_data_ptr<S>();
  const S* bp_p = bprob.const_data_ptr<S>();
  const S* keys_p = keys.const_data_ptr<S>();
  const S* xw_p = xw.const_data_ptr<S>();
  S* dQ_p = dQ.mutable_data_ptr<S>();
  S* dS_p = dS.mutable_data_ptr<S>();
  S* dG_p = dG.mutable_data_ptr<S>();
  S* dQKV_p = dQKV.mutable_data_ptr<S>();
  S* dHP_p = dHP.mutable_data_ptr<S>();
  S* dh_p = dh.mutable_data_ptr<S>();
  S* dc_p = d.lstm ? dcar.mutable_data_ptr<S>() : nullptr;
  S* dhn_p = dh_next.mutable_data_ptr<S>();
  S* dhg_p = dhg.mutable_data_ptr<S>();
  const S* doc_p = doc.const_data_ptr<S>();
  S* dgg_p = dgg.mutable_data_ptr<S>();
  const S* dhc_p = dhc.const_data_ptr<S>();
  const S* tmp_p = tmp.const_data_ptr<S>();
  const S* go_p = grad_out.defined() ? grad_out.const_data_ptr<S>() : nullptr;

  // Head of step t for mechanism k (5. backward): dh' of its active rows -> d o = dh' Wco^T.
  auto head = [&](int64_t t, int64_t k, const ActiveRows& rw) {
    S* dhpt = dHP_p + t * BKH;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = b * K + k, r = rw.pos[row];
      if (r < 0) {
        std::fill_n(dhpt + row * H, H, S(0));
      } else {
        std::copy_n(dh_p + row * H, H, dhpt + row * H);
        std::copy_n(dh_p + row * H, H, dhg_p + (k * B + r) * H);
      }
    }
    const int64_t n = rw.cnt[k];
    if (n > 0) mm_into(doc[k].narrow(0, 0, n), dhg[k].narrow(0, 0, n), Wco[k].t());
  };

  rows.build(mask_p + (T - 1) * B * K, B, K);
  parallel_over(K, [&](int64_t k) { head(T - 1, k, rows); });
  for (int64_t t = T - 1; t >= 0; --t) {
    const S* hp = t == 0 ? h0.const_data_ptr<S>() : out_p + (t - 1) * BKH;
    const S* cp = !d.lstm ? nullptr : t == 0 ? c0.const_data_ptr<S>() : cs_p + (t - 1) * BKH;

    // 4. Communication attention backward -> d(Q|K|V) of this step, per sample.
    const S* qkvt = qkv_p + t * B * K * C3;
    const S* bpt = bp_p + t * B * K * n_c * K;
    S* dqkvt = dQKV_p + t * B * K * C3;
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<S> db(K);
      for (int64_t b = b0; b < b1; ++b) {
        std::fill_n(dqkvt + b * K * C3, K * C3, S(0));
        for (int64_t k = 0; k < K; ++k) {
          const int64_t row = b * K + k, r = rows.pos[row];
          if (r < 0) continue;
          const S* dor = doc_p + (k * B + r) * cv;
          for (int64_t n = 0; n < n_c; ++n) {
            const S* y = bpt + (row * n_c + n) * K;
            const S* dov = dor + n * dcv;
            for (int64_t j = 0; j < K; ++j) {
              const S* vc = qkvt + (b * K + j) * C3 + 2 * ck + n * dcv;
              S dot = S(0);
              for (int64_t i = 0; i < dcv; ++i) dot += dov[i] * vc[i];
              S bd = y[j];
              if (d.drop_c()) {
                const bool keep =
                    dropout_keep(d.seed, 1, comm_index(d, t, b, k, n, j), float(d.p_c));
                dot = keep ? dot / keep_c : S(0);
                bd = keep ? bd / keep_c : S(0);
              }
              db[j] = dot;
              S* dvc = dqkvt + (b * K + j) * C3 + 2 * ck + n * dcv;
              for (int64_t i = 0; i < dcv; ++i) dvc[i] += bd * dov[i];
            }
            softmax_bwd(y, db.data(), K, db.data());
            const S* qc = qkvt + row * C3 + n * dc;
            S* dqc = dqkvt + row * C3 + n * dc;
            for (int64_t j = 0; j < K; ++j) {
              const S g = db[j] * scale_c;
              const S* kc = qkvt + (b * K + j) * C3 + ck + n * dc;
              S* dkc = dqkvt + (b * K + j) * C3 + ck + n * dc;
              for (int64_t i = 0; i < dc; ++i) {
                dqc[i] += g * kc[i];
                dkc[i] += g * qc[i];
              }
            }
          }
        }
      }
    });

    // Per mechanism: dh~ (the Q|K|V path, cut for inactive k under block_inactive_grad), cell
    // backward, input attention backward (dq, d scores), dh_{t-1}, then the head of step t-1.
    if (t > 0) rows_prev.build(mask_p + (t - 1) * B * K, B, K);
    const Tensor dqkv_t = dQKV[t], dq_t = dQ[t];
    const S* gt = gates_p + t * B * K * GW;
    S* dgt = dG_p + t * B * K * GW;
    const S* at_ = a_p + t * B * K * n_in * M;
    const S* kt = keys_p + t * B * M * nk;
    const S* xwt = xw_p + t * B * M * K * n_in * GH;
    S* dqt = dQ_p + t * B * K * nk;
    S* dst_ = dS_p + t * B * K * n_in * M;
    const S* go = (t > 0 && go_p != nullptr) ? go_p + (t - 1) * BKH : nullptr;
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      std::vector<S> dht(H), da(M);
      for (int64_t k = k0; k < k1; ++k) {
        mm_into(mech(tmp, B, K, k), mech(dqkv_t, B, K, k), Wc[k].t());
        for (int64_t b = 0; b < B; ++b) {
          const int64_t row = b * K + k, r = rows.pos[row];
          const bool active = r >= 0;
          const S* dhr = dh_p + row * H;
          const S* extra = tmp_p + row * H;
          if (active || !block)
            for (int64_t j = 0; j < H; ++j) dht[j] = dhr[j] + extra[j];
          else
            std::copy_n(dhr, H, dht.data());
          S* dg = dgt + row * GW;
          S* dhn = dhn_p + row * H;
          S* dqr = dqt + row * nk;
          S* dsr = dst_ + row * n_in * M;
          std::fill_n(dqr, nk, S(0));
          if (!active) {  // exact copy: the gradient passes through unchanged
            std::copy_n(dht.data(), H, dhn);
            std::fill_n(dg, GW, S(0));
            std::fill_n(dsr, n_in * M, S(0));
            continue;
          }
          const S* g = gt + row * GW;
          if (d.lstm) {
            S* dcr = dc_p + row * H;
            lstm_row_bwd(dht.data(), dcr, g, cp + row * H, dg, H);
            std::fill_n(dhn, H, S(0));
            std::copy_n(dg, GH, dgg_p + (k * B + r) * GH);
          } else {
            const S* gh = g + GH;
            S* dgh = dg + GH;
            for (int64_t j = 0; j < H; ++j)
              gru_pointwise_bwd(dht[j], g[j], g[H + j], g[2 * H + j], gh[j], gh[H + j],
                                gh[2 * H + j], hp[row * H + j], dg[j], dg[H + j], dg[2 * H + j],
                                dgh[j], dgh[H + j], dgh[2 * H + j], dhn[j]);
            std::copy_n(dgh, GH, dgg_p + (k * B + r) * GH);
          }
          // gi = sum_{n,m} a~ xw + bias: d a~ = dgi . xw; through dropout; null softmax bwd.
          for (int64_t n = 0; n < n_in; ++n) {
            for (int64_t m = 0; m < M; ++m) {
              const S* src = xwt + ((b * M + m) * K + k) * n_in * GH + n * GH;
              S dot = S(0);
              for (int64_t j = 0; j < GH; ++j) dot += dg[j] * src[j];
              if (d.drop_in())
                dot = dropout_keep(d.seed, 0, in_index(d, t, b, k, n, m), float(d.p_in))
                          ? dot / keep_in : S(0);
              da[m] = dot;
            }
            S* ds = dsr + n * M;
            softmax_bwd(at_ + (row * n_in + n) * M, da.data(), M, ds);
            S* dqv = dqr + n * dk;
            for (int64_t m = 0; m < M; ++m) {
              const S g_ = ds[m] * scale_in;
              const S* kv = kt + (b * M + m) * nk + n * dk;
              for (int64_t i = 0; i < dk; ++i) dqv[i] += g_ * kv[i];
            }
          }
        }
        // dh_{t-1} = direct + dgh Whh^T (active rows) + dq Wq^T (+ grad of out[t-1]).
        const int64_t cnt = rows.cnt[k];
        if (cnt > 0) mm_into(dhc[k].narrow(0, 0, cnt), dgg[k].narrow(0, 0, cnt), Whh[k].t());
        mech(dh_next, B, K, k).addmm_(mech(dq_t, B, K, k), Wq[k].t());
        for (int64_t b = 0; b < B; ++b) {
          const int64_t row = b * K + k, r = rows.pos[row];
          S* dst = dh_p + row * H;
          const S* src = dhn_p + row * H;
          for (int64_t j = 0; j < H; ++j) dst[j] = src[j];
          if (r >= 0) {
            const S* add = dhc_p + (k * B + r) * H;
            for (int64_t j = 0; j < H; ++j) dst[j] += add[j];
          }
          if (go != nullptr)
            for (int64_t j = 0; j < H; ++j) dst[j] += go[row * H + j];
        }
        if (t > 0) head(t - 1, k, rows_prev);
      }
    });
    std::swap(rows, rows_prev);
  }

  // Weight gradients: per mechanism, large single-threaded GEMMs over all T*B rows (strided
  // views, no copies), run in parallel over mechanisms.
  const Tensor hprev = T > 1 ? at::cat({h0.unsqueeze(0), out.view({T, B, K, H}).narrow(0, 0, T - 1)})
                             : h0.unsqueeze(0);
  const Tensor dGI = dG.narrow(-1, 0, GH), dGH = d.lstm ? dGI : dG.narrow(-1, GH, GH);
  Tensor ad = a.clone();  // a~: the dropped input probabilities
  if (d.drop_in()) {
    S* ad_p = ad.mutable_data_ptr<S>();
    const int64_t per_t = B * K * n_in * M;
    parallel_over(T, [&](int64_t t) {
      for (int64_t i = 0; i < per_t; ++i) {
        S& v = ad_p[t * per_t + i];
        v = dropout_keep(d.seed, 0, static_cast<uint64_t>(t * per_t + i), float(d.p_in))
                ? v / keep_in : S(0);
      }
    });
  }
  // xa[t,b,k,n] = sum_m a~ x_m (the input term is xa fold[:,k,n]); dKEY from the d scores.
  Tensor xa = at::empty({T, B, K, n_in, D}, opt);
  Tensor dKEY = at::empty({T, B, M, nk}, opt);
  {
    const S* ad_p = ad.const_data_ptr<S>();
    const S* x_p = x.const_data_ptr<S>();
    S* xa_p = xa.mutable_data_ptr<S>();
    S* dkey_p = dKEY.mutable_data_ptr<S>();
    parallel_over(T * B, [&](int64_t tb) {
      const S* xr = x_p + tb * M * D;
      S* dkr = dkey_p + tb * M * nk;
      std::fill_n(dkr, M * nk, S(0));
      for (int64_t k = 0; k < K; ++k)
        for (int64_t n = 0; n < n_in; ++n) {
          const S* w = ad_p + ((tb * K + k) * n_in + n) * M;
          const S* ds = dS_p + ((tb * K + k) * n_in + n) * M;
          const S* qv = q_p + (tb * K + k) * nk + n * dk;
          S* dst = xa_p + ((tb * K + k) * n_in + n) * D;
          std::fill_n(dst, D, S(0));
          for (int64_t m = 0; m < M; ++m) {
            for (int64_t i = 0; i < D; ++i) dst[i] += w[m] * xr[m * D + i];
            const S g = ds[m] * scale_in;
            S* dkv = dkr + m * nk + n * dk;
            for (int64_t i = 0; i < dk; ++i) dkv[i] += g * qv[i];
          }
        }
    });
  }
  Tensor g_Wq = at::empty({K, H, nk}, opt), g_Whh = at::empty({K, H, GH}, opt);
  Tensor g_Wc = at::empty({K, H, C3}, opt), g_Wco = at::empty({K, cv, H}, opt);
  Tensor g_fold = at::empty({D, K, n_in, GH}, opt), dgf = at::empty({T, B, K, n_in, D}, opt);
  const Tensor fold4 = fold.view({D, K, n_in, GH});
  const int64_t TB = T * B;
  parallel_over(K, [&](int64_t k) {
    const Tensor hk = mech(hprev, TB, K, k);
    mm_into(g_Wq[k], hk.t(), mech(dQ, TB, K, k));
    mm_into(g_Whh[k], hk.t(), mech(dGH, TB, K, k));
    mm_into(g_Wc[k], mech(htil, TB, K, k).t(), mech(dQKV, TB, K, k));
    mm_into(g_Wco[k], mech(o, TB, K, k).t(), mech(dHP, TB, K, k));
    const Tensor dgi_k = mech(dGI, TB, K, k);
    for (int64_t n = 0; n < n_in; ++n) {
      const Tensor xa_kn = xa.view({TB, K, n_in, D}).select(1, k).select(1, n);
      mm_into(g_fold.select(1, k).select(1, n), xa_kn.t(), dgi_k);
      mm_into(dgf.view({TB, K, n_in, D}).select(1, k).select(1, n), dgi_k,
              fold4.select(1, k).select(1, n).t());
    }
  });
  Tensor g_bhh = dGH.sum(at::IntArrayRef{0, 1});
  Tensor g_bih = d.lstm ? g_bhh.clone() : dGI.sum(at::IntArrayRef{0, 1});
  const Tensor x2 = x.view({T * B * M, D});
  Tensor g_Wk = at::mm(x2.t(), dKEY.view({T * B * M, nk}));
  Tensor dx = at::mm(dKEY.view({T * B * M, nk}), Wk.t()).view({T, B, M, D});
  {  // dx_m += sum_{k,n} a~[k,n,m] dgf[k,n]
    const S* ad_p = ad.const_data_ptr<S>();
    const S* dgf_p = dgf.const_data_ptr<S>();
    S* dx_p = dx.mutable_data_ptr<S>();
    parallel_over(TB, [&](int64_t tb) {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t n = 0; n < n_in; ++n) {
          const S* w = ad_p + ((tb * K + k) * n_in + n) * M;
          const S* src = dgf_p + ((tb * K + k) * n_in + n) * D;
          for (int64_t m = 0; m < M; ++m) {
            S* dst = dx_p + (tb * M + m) * D;
            for (int64_t i = 0; i < D; ++i) dst[i] += w[m] * src[i];
          }
        }
    });
  }
  Tensor g_Wv = at::einsum("dkng,knvg->dnv", {g_fold, Wih.view({K, n_in, d.dv, GH})})
                    .reshape({D, d.nv});
  Tensor g_Wih = at::einsum("dnv,dkng->knvg", {Wv.view({D, n_in, d.dv}), g_fold})
                     .reshape({K, d.nv, GH});

  const Tensor dh0 = dh;  // after the t = 0 step: d h_0 (no grad_out is added there)
  Tensor dc0 = d.lstm ? dcar : at::empty({0}, opt);
  auto parts = g_Wc.split({ck, ck, cv}, -1);
  return {dx, dh0, dc0, g_Wk, g_Wv, g_Wq, g_Wih, g_Whh, g_bih, g_bhh,
          parts[0].contiguous(), parts[1].contiguous(), parts[2].contiguous(), g_Wco};
}

auto rim_cpu_bwd(
    const std::optional<Tensor>& grad_out_, const std::optional<Tensor>& grad_h_n_,
    const std::optional<Tensor>& grad_c_n_, const Tensor& x_, const Tensor& h0_,
    const std::optional<Tensor>& c0_, const Tensor& input_key, const Tensor& input_value,
    const Tensor& input_query, const Tensor& weight_ih, const Tensor& weight_hh,
    const Tensor& bias_ih, const Tensor& bias_hh, const Tensor& comm_query,
    const Tensor& comm_key, const Tensor& comm_value, const Tensor& comm_output,
    const Tensor& out, const Tensor& masks, const Tensor& cs, const Tensor& htil, const Tensor& q,
    const Tensor& a, const Tensor& gates, const Tensor& qkv, const Tensor& bprob, const Tensor& o,
    const Tensor& keys, const Tensor& xw, const Tensor& fold, int64_t top_k, int64_t input_heads,
    int64_t comm_heads, double input_dropout, double comm_dropout, int64_t seed,
    bool block_inactive_grad) {
  const Dims d = check_args("rim_cpu_bwd", x_, h0_, c0_, input_key, input_value, input_query,
                            weight_ih, weight_hh, bias_ih, bias_hh, comm_query, comm_key,
                            comm_value, comm_output, top_k, input_heads, comm_heads,
                            input_dropout, comm_dropout, seed);
  TORCH_CHECK(htil.dim() == 4 && htil.size(0) == d.T && xw.numel() > 0,
              "rims_fast::rim_cpu_bwd: the forward ran with save=False, so nothing was saved for "
              "backward");
  auto opt_grad = [&](const std::optional<Tensor>& g) {
    return g.has_value() && g->defined() ? g->contiguous() : Tensor();
  };
  Tensor grad_out = opt_grad(grad_out_);
  if (grad_out.defined()) grad_out = grad_out.view({d.T, d.B, d.K, d.H});
  const Tensor grad_h_n = opt_grad(grad_h_n_);
  const Tensor grad_c_n = d.lstm ? opt_grad(grad_c_n_) : Tensor();
  const Tensor Wc = at::cat({comm_query, comm_key, comm_value}, -1).contiguous();
  std::vector<Tensor> res;
  AT_DISPATCH_FLOATING_TYPES(x_.scalar_type(), "rim_cpu_bwd", [&] {
    res = backward_impl<scalar_t>(
        d, block_inactive_grad, grad_out, grad_h_n, grad_c_n, x_.contiguous(), h0_.contiguous(),
        d.lstm ? c0_->contiguous() : Tensor(), input_key.contiguous(), input_value.contiguous(),
        input_query.contiguous(), weight_ih.contiguous(), weight_hh.contiguous(), Wc,
        comm_output.contiguous(), out.contiguous(), masks.contiguous(), cs.contiguous(),
        htil.contiguous(), q.contiguous(), a.contiguous(), gates.contiguous(), qkv.contiguous(),
        bprob.contiguous(), o.contiguous(), keys.contiguous(), xw.contiguous(), fold.contiguous());
  });
  return to_tuple<14>(res);
}

// Keep-masks of the dropout stream of one call, in rim_ref's `dropout_masks` layout, so the
// reference can replay this backend's draw exactly (tests).
std::tuple<Tensor, Tensor> rim_cpu_dropout_masks(int64_t seed, int64_t T, int64_t B, int64_t K,
                                          int64_t input_heads, int64_t M, int64_t comm_heads,
                                          double input_dropout, double comm_dropout) {
  auto opt = at::TensorOptions().dtype(at::kBool);
  Tensor in = at::empty({T, B, K, input_heads, M}, opt), cm = at::empty({T, B, K, comm_heads, K}, opt);
  bool* ip = in.mutable_data_ptr<bool>();
  bool* cp = cm.mutable_data_ptr<bool>();
  const uint64_t s = static_cast<uint64_t>(seed);
  for (int64_t i = 0; i < in.numel(); ++i)
    ip[i] = dropout_keep(s, 0, static_cast<uint64_t>(i), float(input_dropout));
  for (int64_t i = 0; i < cm.numel(); ++i)
    cp[i] = dropout_keep(s, 1, static_cast<uint64_t>(i), float(comm_dropout));
  return {in, cm};
}

}  // namespace
}  // namespace rims

TORCH_LIBRARY_FRAGMENT(rims_fast, m) {
  m.def("rim_cpu_fwd(Tensor x, Tensor h0, Tensor? c0, Tensor input_key, Tensor input_value,"
        " Tensor input_query, Tensor weight_ih, Tensor weight_hh, Tensor bias_ih, Tensor bias_hh,"
        " Tensor comm_query, Tensor comm_key, Tensor comm_value, Tensor comm_output, int top_k,"
        " int input_heads, int comm_heads, float input_dropout, float comm_dropout, int seed,"
        " bool block_inactive_grad, bool save) -> (Tensor out, Tensor h_n, Tensor c_n,"
        " Tensor masks, Tensor cs, Tensor htil, Tensor q, Tensor a, Tensor gates, Tensor qkv, Tensor bprob, Tensor o,"
        " Tensor keys, Tensor xw, Tensor fold)");
  m.def("rim_cpu_bwd(Tensor? grad_out, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, Tensor h0,"
        " Tensor? c0, Tensor input_key, Tensor input_value, Tensor input_query, Tensor weight_ih,"
        " Tensor weight_hh, Tensor bias_ih, Tensor bias_hh, Tensor comm_query, Tensor comm_key,"
        " Tensor comm_value, Tensor comm_output, Tensor out, Tensor masks, Tensor cs, Tensor htil,"
        " Tensor q, Tensor a, Tensor gates, Tensor qkv, Tensor bprob, Tensor o, Tensor keys,"
        " Tensor xw, Tensor fold, int top_k, int input_heads, int comm_heads, float input_dropout,"
        " float comm_dropout, int seed, bool block_inactive_grad) -> (Tensor grad_x,"
        " Tensor grad_h0, Tensor grad_c0, Tensor grad_input_key, Tensor grad_input_value,"
        " Tensor grad_input_query, Tensor grad_weight_ih, Tensor grad_weight_hh,"
        " Tensor grad_bias_ih, Tensor grad_bias_hh, Tensor grad_comm_query, Tensor grad_comm_key,"
        " Tensor grad_comm_value, Tensor grad_comm_output)");
  m.def("rim_cpu_dropout_masks(int seed, int T, int B, int K, int input_heads, int M,"
        " int comm_heads, float input_dropout, float comm_dropout) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rims_fast, CPU, m) {
  m.impl("rim_cpu_fwd", &rims::rim_cpu_fwd);
  m.impl("rim_cpu_bwd", &rims::rim_cpu_bwd);
}

// No tensor inputs: registered for every backend, so it needs no dispatch key.
TORCH_LIBRARY_IMPL(rims_fast, CompositeExplicitAutograd, m) {
  m.impl("rim_cpu_dropout_masks", &rims::rim_cpu_dropout_masks);
}
