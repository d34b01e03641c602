// Torch-free phases of the stepped RIM backward (rims_fast::rim_steps_bwd, csrc/rim_steps_bwd.h):
// the reverse-time sweep of rim_step_fwd.cuh's forward, each step four batched GEMMs over the
// whole batch (the driver calls ATen: cuBLAS on a GPU) and four small kernels:
//
//   d o = dh' comm_output^T                       GEMM   (active rows; zero operand otherwise)
//   comm_bwd                                      kernel a block per sample: d scores, dQ, dK, dV
//   dh~_Q|K|V = d(Q|K|V) [c_q | c_k | c_v]^T      GEMM
//   cell_bwd                                      kernel dh~, the masked cell's backward
//   d xa = d gi F^T                               GEMM
//   select_bwd                                    kernel a block per sample: xa, d scores, dq,
//                                                        this step's d keys and d x
//   dh_{t-1} += [d gh | dq] [W_hh^T ; W_q^T]      GEMM
//   dh_final                                      kernel dh_{t-1}, the next step's operand
//
// Inputs, outputs and every per-step gradient written are those of the persistent backward
// (rim_seq_bwd.cuh, RimSeqBwdParams), with the same formulas in the same order apart from the
// GEMMs' sums and select_bwd's input-score dots (kDotChunks partial sums), so the caller's
// weight-gradient GEMMs are shared. GEMM operands (the gradient
// rows) are in the storage type T, results and everything else in the compute type C.
#pragma once

#include "rim_seq_bwd.cuh"
#include "rim_step_fwd.cuh"  // step_detail::staged_elems

namespace rims {

template <typename T>
struct RimStepBwdParams {
  RimSeqBwdParams<T> s;  // sizes, inputs, saved activations, outputs as the persistent backward
  // GEMM operands (storage type, (K, B, width)).
  T* dhp_op;   // dh' of active rows, width H
  T* dqkv_op;  // d(Q|K|V), K|V cut for inactive rows under block_inactive_grad, width C3
  T* dg_op;    // [d gates | dq], width GW + nk (LSTM [dg | dq], GRU [d gi | d gh | dq])
  // GEMM results (compute type, (K, B, width)).
  const void* dout;    // cv
  const void* dht;     // H: d(Q|K|V) [c_q | c_k | c_v]^T
  const void* dxa;     // XW
  const void* dhprev;  // H: [d gh | dq] [W_hh^T ; W_q^T]
  // Compute-type state and per-step scratch, (B, K, width).
  void* dh;      // H: dh_t, then dh_{t-1}
  void* dc;      // H (LSTM)
  void* direct;  // H: the part of dh_{t-1} that does not go through a GEMM
  void* dsc;     // n_c K: communication score gradients
  void* dsi;     // n_in M: input score gradients (where select_bwd does not stage them)
  void* dsi_part;  // n_in M kDotChunks: their dot products' partial sums (likewise)
};

// select_bwd splits each input score's D-long dot product d xa . x_m into this many partial sums,
// so that a block has work for more than K n_in M threads (8 at `large`, where the whole phase
// took 45 us per step on an H100: results/nvidia-h100-profile-steps-2026-11-27a.log). Partial
// sum c takes the elements c, c + kDotChunks, ... in ascending order, so that a warp's lanes (its
// 32 chunks) read consecutive elements: coalesced d xa, no shared-memory bank conflicts on the
// staged input row (contiguous chunks of Dx / 32 made them 16-way at `large`).
constexpr int64_t kDotChunks = 32;

namespace step_bwd_detail {

template <typename C, typename T>
RIMS_HD const C* saved_row(const RimStepBwdParams<T>& p, const void* base, int64_t t, int64_t r,
                           int64_t width) {
  return static_cast<const C*>(base) + (t * p.s.B * p.s.K + r) * width;
}

template <typename C, typename T>
RIMS_HD C* hist_row(const RimStepBwdParams<T>& p, void* base, int64_t t, int64_t r,
                    int64_t width) {
  return static_cast<C*>(base) + (t * p.s.B * p.s.K + r) * width;
}

template <typename T>
RIMS_HD bool active(const RimStepBwdParams<T>& p, int64_t t, int64_t r) {
  return p.s.masks[t * p.s.B * p.s.K + r];
}

// The dropout keep factors of the forward's stream (1 without dropout).
template <typename C, typename T>
RIMS_HD C keep_a(const RimStepBwdParams<T>& p, int64_t t, int64_t r, int64_t n, int64_t m) {
  const RimSeqBwdParams<T>& d = p.s;
  const float drop = static_cast<float>(d.p_in);
  if (!(drop > 0.f)) return C(1);
  const uint64_t idx = static_cast<uint64_t>(((t * d.B * d.K + r) * d.n_in + n) * d.M + m);
  return dropout_keep(d.seed, 0, idx, drop) ? C(1) / C(1.0 - d.p_in) : C(0);
}

template <typename C, typename T>
RIMS_HD C keep_b(const RimStepBwdParams<T>& p, int64_t t, int64_t r, int64_t n, int64_t j) {
  const RimSeqBwdParams<T>& d = p.s;
  const float drop = static_cast<float>(d.p_c);
  if (!(drop > 0.f)) return C(1);
  const uint64_t idx = static_cast<uint64_t>(((t * d.B * d.K + r) * d.n_c + n) * d.K + j);
  return dropout_keep(d.seed, 1, idx, drop) ? C(1) / C(1.0 - d.p_c) : C(0);
}

// dh_{t} rows of step t's active mechanisms: the history dh' and the d o GEMM's operand.
template <typename C, typename T>
RIMS_HD void put_dhp(const RimStepBwdParams<T>& p, int64_t t, int64_t i, C v) {
  const RimSeqBwdParams<T>& d = p.s;
  const int64_t r = i / d.H, j = i % d.H, b = r / d.K, k = r % d.K;
  const C a = active(p, t, r) ? v : C(0);
  hist_row<C>(p, d.h_dhp, t, r, d.H)[j] = a;
  from_c(a, p.dhp_op + (k * d.B + b) * d.H + j);
}

}  // namespace step_bwd_detail

// Before the sweep, element i = (b, k, j): dh_{T-1} = d h_n + d out[T-1], dc = d c_n.
template <typename C, typename T>
RIMS_HD void rim_step_bwd_init(const RimStepBwdParams<T>& p, int64_t i) {
  const RimSeqBwdParams<T>& d = p.s;
  const int64_t KH = d.K * d.H, T_ = d.T_;
  C v = d.g_hn != nullptr ? static_cast<const C*>(d.g_hn)[i] : C(0);
  if (d.g_out != nullptr) v += static_cast<const C*>(d.g_out)[(T_ - 1) * d.B * KH + i];
  static_cast<C*>(p.dh)[i] = v;
  if (d.lstm) static_cast<C*>(p.dc)[i] = d.g_cn != nullptr ? static_cast<const C*>(d.g_cn)[i] : C(0);
  step_bwd_detail::put_dhp<C>(p, T_ - 1, i, v);
}

// Compute-type elements of rim_step_comm_bwd's shared memory (cb: the compute type's size): the
// sample's saved Q|K|V rows (K, C3) and probabilities (K, n_c, K), each padded to 4 elements so
// that both start 16-byte aligned for the block copy, its score gradients (K, n_c, K), the masks
// (K) and its d o rows (K, cv); each array only where it fits 15 KB (step_detail::staged_elems).
RIMS_HD int64_t rim_step_comm_bwd_smem_elems(const RimSeqDims& d, int64_t cb) {
  const int64_t nkk = step_detail::staged_elems(d.K * d.n_c * d.K, cb);
  return (step_detail::staged_elems(d.K * (2 * d.ck + d.cv), cb) + 3) / 4 * 4 +
         (nkk + 3) / 4 * 4 + nkk + d.K + step_detail::staged_elems(d.K * d.cv, cb);
}

// SPEC step 4 backward for sample b (one block): d scores per (k, head, j), their softmax
// backward per (k, head), then per (k, column of Q|K|V) dQ of k or dK, dV of k summed over the
// querying mechanisms (no atomics), saved and written as the dh~ GEMM's operand. The sample's
// d o rows, saved Q|K|V rows, probabilities, score gradients and masks are staged in shared
// memory (where each fits): at `large` on an H100 this kernel took 45 us per step when every
// item's chain read them from global memory (results/nvidia-h100-profile-steps-2026-11-27a.log).
// Same sums in the same order.
template <typename C, typename T, class Exec>
RIMS_HD void rim_step_comm_bwd(const Exec& ex, const RimStepBwdParams<T>& p, int64_t t,
                               int64_t b, C* smem) {
  using namespace step_bwd_detail;
  const RimSeqBwdParams<T>& d = p.s;
  const int64_t B = d.B, K = d.K, n_c = d.n_c, dc = d.dc, dcv = d.dcv, ck = d.ck, cv = d.cv;
  const int64_t C3 = 2 * ck + cv, nK = n_c * K, cb = sizeof(C);
  const C scale_c = C(1) / sqrt(C(dc));
  const int64_t n3 = step_detail::staged_elems(K * C3, cb);
  const int64_t nkk = step_detail::staged_elems(K * nK, cb);
  const int64_t ndo = step_detail::staged_elems(K * cv, cb);
  C* qs = smem;                     // Q|K|V rows (n3)
  C* bps = qs + (n3 + 3) / 4 * 4;   // probabilities (nkk)
  C* dss = bps + (nkk + 3) / 4 * 4;  // score gradients (nkk)
  C* acts = dss + nkk;              // masks (K)
  C* dos = acts + K;                // d o rows (ndo)
  const C* qkv_g = saved_row<C>(p, d.sv_qkv, t, b * K, C3);  // row (b, j) at + j * C3
  const C* bp_g = saved_row<C>(p, d.sv_bp, t, b * K, nK);
  const C* qkv = n3 > 0 ? qs : qkv_g;
  const C* bp = nkk > 0 ? bps : bp_g;
  C* dsc = nkk > 0 ? dss : static_cast<C*>(p.dsc) + b * K * nK;
  const C* dout = static_cast<const C*>(p.dout);  // (K, B, cv)
  auto do_row = [&](int64_t k) { return ndo > 0 ? dos + k * cv : dout + (k * B + b) * cv; };
  auto on = [&](int64_t k) { return acts[k] != C(0); };
  C* dqkv = hist_row<C>(p, d.h_dqkv, t, b * K, C3);
  ex.parallel_for(int(K + ndo), [&](int i) {
    if (i < K) {
      acts[i] = active(p, t, b * K + i) ? C(1) : C(0);
      return;
    }
    const int64_t k = (i - K) / cv, e = (i - K) % cv;
    dos[i - K] = dout[(k * B + b) * cv + e];
  });
  ex.copy(qs, qkv_g, n3, bps, bp_g, nkk);
  ex.parallel_for(int(K * nK), [&](int i) {
    const int64_t k = i / nK, n = (i / K) % n_c, j = i % K, r = b * K + k;
    C dot = C(0);
    if (on(k)) {
      const C* don = do_row(k) + n * dcv;
      const C* vj = qkv + j * C3 + 2 * ck + n * dcv;
      for (int64_t e = 0; e < dcv; ++e) dot += don[e] * vj[e];
      dot *= keep_b<C>(p, t, r, n, j);
    }
    dsc[i] = dot;
  });
  ex.parallel_for(int(K * n_c), [&](int i) {
    const int64_t k = i / n_c;
    if (!on(k)) return;
    C* ds = dsc + i * K;
    softmax_bwd(bp + i * K, ds, K, ds);
    for (int64_t j = 0; j < K; ++j) ds[j] *= scale_c;
  });
  ex.parallel_for(int(K * C3), [&](int i) {
    const int64_t k = i / C3, col = i % C3;
    C acc = C(0);
    if (col < ck) {  // d query_k[n, e] = sum_j d score[k, n, j] k_j[n, e]
      const C* ds = dsc + (k * n_c + col / dc) * K;
      if (on(k))
        for (int64_t j = 0; j < K; ++j) acc += ds[j] * qkv[j * C3 + ck + col];
    } else if (col < 2 * ck) {  // d key_k[n, e] = sum_q d score[q, n, k] q_q[n, e]
      const int64_t c1 = col - ck, n = c1 / dc;
      for (int64_t q = 0; q < K; ++q) acc += dsc[(q * n_c + n) * K + k] * qkv[q * C3 + c1];
    } else {  // d value_k[n, e] = sum_q b~[q, n, k] d o_q[n, e]
      const int64_t c2 = col - 2 * ck, n = c2 / dcv;
      for (int64_t q = 0; q < K; ++q) {
        if (!on(q)) continue;
        const C bw = bp[(q * n_c + n) * K + k] * keep_b<C>(p, t, b * K + q, n, k);
        acc += bw * do_row(q)[c2];
      }
    }
    dqkv[k * C3 + col] = acc;
    const bool kv = on(k) || !d.block_inactive_grad;
    from_c(col < ck || kv ? acc : C(0), p.dqkv_op + (k * B + b) * C3 + col);
  });
}

// SPEC step 3 backward for element i = (b, k, j): dh~ = dh' + the Q|K|V GEMM's part, the masked
// cell's backward (inactive rows pass dh~ and dc through), d gates to the history and the GEMMs'
// operand.
template <typename C, typename T>
RIMS_HD void rim_step_cell_bwd(const RimStepBwdParams<T>& p, int64_t t, int64_t i) {
  using namespace step_bwd_detail;
  const RimSeqBwdParams<T>& d = p.s;
  const int64_t B = d.B, K = d.K, H = d.H, GH = d.GH, GW = d.lstm ? GH : 2 * GH;
  const int64_t r = i / H, j = i % H, b = r / K, k = r % K, kb = k * B + b;
  const C dht = static_cast<const C*>(p.dh)[i] + static_cast<const C*>(p.dht)[kb * H + j];
  C* direct = static_cast<C*>(p.direct);
  C* dg = hist_row<C>(p, d.h_dg, t, r, GW);
  T* op = p.dg_op + kb * (GW + d.nk);
  if (!active(p, t, r)) {
    direct[i] = dht;
    for (int64_t col = j; col < GW; col += H) {
      dg[col] = C(0);
      from_c(C(0), op + col);
    }
    return;
  }
  const C* g = saved_row<C>(p, d.sv_g, t, r, GW);
  if (d.lstm) {
    C* dc = static_cast<C*>(p.dc);
    const C cprev = saved_row<C>(p, d.sv_c, t, r, H)[j];
    lstm_pointwise_bwd(dht, dc[i], g[j], g[H + j], g[2 * H + j], g[3 * H + j], cprev, dg[j],
                       dg[H + j], dg[2 * H + j], dg[3 * H + j], dc[i]);
    direct[i] = C(0);
  } else {
    const C hprev = saved_row<C>(p, d.sv_h, t, r, H)[j];
    const C* gh = g + GH;
    C* dgh = dg + GH;
    gru_pointwise_bwd(dht, g[j], g[H + j], g[2 * H + j], gh[j], gh[H + j], gh[2 * H + j], hprev,
                      dg[j], dg[H + j], dg[2 * H + j], dgh[j], dgh[H + j], dgh[2 * H + j],
                      direct[i]);
  }
  for (int64_t col = j; col < GW; col += H) from_c(dg[col], op + col);
}

// Compute-type elements of rim_step_select_bwd's shared memory (cb: the compute type's size):
// the step's input row (M, xrow) first (16-byte aligned for the block copy), then the masks (K),
// and the saved a~, a~ times its dropout keep factor, the score gradients (K, n_in, M each) and
// their dot products' partial sums (K, n_in, M, kDotChunks), each where it fits 15 KB
// (step_detail::staged_elems).
RIMS_HD int64_t rim_step_select_bwd_smem_elems(const RimSeqDims& d, int64_t cb) {
  const int64_t na = step_detail::staged_elems(d.K * d.n_in * d.M, cb);
  return (step_detail::staged_elems(d.M * d.xrow, cb) + 3) / 4 * 4 + d.K + 3 * na +
         step_detail::staged_elems(d.K * d.n_in * d.M * kDotChunks, cb);
}

// SPEC step 1 backward for sample b (one block): the forward's read xa (for d F), the input
// scores' gradients (d xa . x_m, their dot products in kDotChunks strided partial sums, added in
// order)
// through dropout and the null softmax, dq (history and the last GEMM's operand), then this
// step's d keys and d x. d xa is the GEMM's result, read on active rows only. The step's input
// row, the masks, a~ (and times its keep factor), the score gradients and the partial sums are
// staged in shared memory where each fits: at `large` on an H100 this kernel took 45 us per step
// when every item read them from global memory (results/nvidia-h100-profile-steps-2026-11-27a.log;
// K XW = 4096 items of the read xa in 16 rounds, each waiting on global loads). Same sums in the
// same order.
template <typename C, typename T, class Exec>
RIMS_HD void rim_step_select_bwd(const Exec& ex, const RimStepBwdParams<T>& p, int64_t t,
                                 int64_t b, C* smem) {
  using namespace step_bwd_detail;
  const RimSeqBwdParams<T>& d = p.s;
  const int64_t B = d.B, K = d.K, M = d.M, n_in = d.n_in, dk = d.dk, nk = d.nk, Dx = d.Dx;
  const int64_t XW = n_in * Dx, xrow = d.xrow, xhead = d.xhead, NA = n_in * M, cb = sizeof(C);
  const int64_t GW = d.lstm ? d.GH : 2 * d.GH;
  const C scale_in = C(1) / sqrt(C(dk));
  const C* kt = static_cast<const C*>(d.keys) + (t * B + b) * M * nk;
  const C* xt_g = static_cast<const C*>(d.xsrc) + (t * B + b) * M * xrow;
  const C* dxa = static_cast<const C*>(p.dxa);  // (K, B, XW)
  const int64_t nx = step_detail::staged_elems(M * xrow, cb);
  const int64_t na = step_detail::staged_elems(K * NA, cb);
  const int64_t np = step_detail::staged_elems(K * NA * kDotChunks, cb);
  C* xs = smem;                       // the input row (nx)
  C* acts = xs + (nx + 3) / 4 * 4;   // masks (K)
  C* as = acts + K;                  // saved a~ (na)
  C* aks = as + na;                  // a~ keep (na)
  C* dss = aks + na;                 // score gradients (na)
  C* parts = dss + na;               // partial sums (np)
  const C* xt = nx > 0 ? xs : xt_g;
  const C* a_g = saved_row<C>(p, d.sv_a, t, b * K, NA);  // row k at + k * NA
  const C* a_all = na > 0 ? as : a_g;
  C* dsi = na > 0 ? dss : static_cast<C*>(p.dsi) + b * K * NA;
  C* part = np > 0 ? parts : static_cast<C*>(p.dsi_part) + b * K * NA * kDotChunks;
  auto on = [&](int64_t k) { return acts[k] != C(0); };
  // a~_{k,n,m} times its dropout keep factor (the product the forward's read used).
  auto ak = [&](int64_t k, int64_t n, int64_t m) {
    return na > 0 ? aks[(k * n_in + n) * M + m]
                  : a_g[k * NA + n * M + m] * keep_a<C>(p, t, b * K + k, n, m);
  };
  auto dxa_row = [&](int64_t k) { return dxa + (k * B + b) * XW; };
  ex.parallel_for(int(K + na), [&](int i) {
    if (i < K) {
      acts[i] = active(p, t, b * K + i) ? C(1) : C(0);
      return;
    }
    const int64_t j = i - K, k = j / NA, n = (j / M) % n_in, m = j % M;
    as[j] = a_g[j];
    aks[j] = a_g[j] * keep_a<C>(p, t, b * K + k, n, m);
  });
  ex.copy(xs, xt_g, nx);
  // The forward's read xa of active rows (zero elsewhere), for d F: stores only.
  ex.parallel_for(int(K * XW), [&](int i) {
    const int64_t k = i / XW, col = i % XW, n = col / Dx, dd = col % Dx;
    C xacc = C(0);
    if (on(k))
      for (int64_t m = 0; m < M; ++m) xacc += ak(k, n, m) * xt[m * xrow + n * xhead + dd];
    hist_row<C>(p, d.h_xa, t, b * K + k, XW)[col] = xacc;
  });
  ex.parallel_for(int(K * NA * kDotChunks), [&](int i) {
    const int64_t km = i / kDotChunks, c = i % kDotChunks;  // km = (k * n_in + n) * M + m
    const int64_t k = km / NA, n = (km / M) % n_in, m = km % M;
    C dot = C(0);
    if (on(k)) {
      const C* dx = dxa_row(k) + n * Dx;
      const C* xm = xt + m * xrow + n * xhead;
      for (int64_t dd = c; dd < Dx; dd += kDotChunks) dot += dx[dd] * xm[dd];
    }
    part[i] = dot;
  });
  ex.parallel_for(int(K * n_in), [&](int i) {
    const int64_t k = i / n_in, n = i % n_in, r = b * K + k;
    C* ds = dsi + i * M;
    if (!on(k)) {
      for (int64_t m = 0; m < M; ++m) ds[m] = C(0);
      return;
    }
    for (int64_t m = 0; m < M; ++m) {
      C dot = C(0);
      for (int64_t c = 0; c < kDotChunks; ++c) dot += part[(i * M + m) * kDotChunks + c];
      ds[m] = dot * keep_a<C>(p, t, r, n, m);
    }
    softmax_bwd(a_all + k * NA + n * M, ds, M, ds);
    for (int64_t m = 0; m < M; ++m) ds[m] *= scale_in;
  });
  ex.parallel_for(int(K * nk), [&](int i) {
    const int64_t k = i / nk, col = i % nk, n = col / dk, r = b * K + k;
    const C* ds = dsi + (k * n_in + n) * M;
    C acc = C(0);
    if (on(k))
      for (int64_t m = 0; m < M; ++m) acc += ds[m] * kt[m * nk + col];
    hist_row<C>(p, d.h_dq, t, r, nk)[col] = acc;
    from_c(acc, p.dg_op + (k * B + b) * (GW + nk) + GW + col);
  });
  ex.parallel_for(int(M * nk), [&](int i) {
    const int64_t m = i / nk, e = i % nk, n = e / dk;
    C acc = C(0);
    for (int64_t k = 0; k < K; ++k)
      acc += dsi[(k * n_in + n) * M + m] * saved_row<C>(p, d.sv_q, t, b * K + k, nk)[e];
    static_cast<C*>(d.d_keys)[(t * B + b) * M * nk + i] = acc;
  });
  ex.parallel_for(int(M * xrow), [&](int i) {
    const int64_t m = i / xrow, col = i % xrow;
    const int64_t n_lo = xhead > 0 ? col / Dx : 0, n_hi = xhead > 0 ? n_lo + 1 : n_in;
    const int64_t dd = xhead > 0 ? col % Dx : col;
    C acc = C(0);
    for (int64_t k = 0; k < K; ++k) {
      if (!on(k)) continue;
      for (int64_t n = n_lo; n < n_hi; ++n) acc += ak(k, n, m) * dxa_row(k)[n * Dx + dd];
    }
    static_cast<C*>(d.d_xsrc)[(t * B + b) * M * xrow + i] = acc;
  });
}

// Element i = (b, k, j): dh_{t-1} = the direct part + the last GEMM's + d out[t-1]; for t > 0 the
// next (earlier) step's dh' history and operand.
template <typename C, typename T>
RIMS_HD void rim_step_dh_final(const RimStepBwdParams<T>& p, int64_t t, int64_t i) {
  const RimSeqBwdParams<T>& d = p.s;
  const int64_t B = d.B, K = d.K, H = d.H;
  const int64_t r = i / H, j = i % H, b = r / K, k = r % K;
  C v = static_cast<const C*>(p.direct)[i] + static_cast<const C*>(p.dhprev)[(k * B + b) * H + j];
  if (t > 0 && d.g_out != nullptr) v += static_cast<const C*>(d.g_out)[(t - 1) * B * K * H + i];
  static_cast<C*>(p.dh)[i] = v;
  if (t > 0) step_bwd_detail::put_dhp<C>(p, t - 1, i, v);
}

}  // namespace rims
