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
RIMS_HD void put_dhp(const RimStepBwdParams<T>& p, int64_t t, step_detail::StepUnit u, C v) {
  const RimSeqBwdParams<T>& d = p.s;
  const int64_t r = u.b * d.K + u.k;
  const C a = active(p, t, r) ? v : C(0);
  hist_row<C>(p, d.h_dhp, t, r, d.H)[u.j] = a;
  from_c(a, p.dhp_op + (u.k * d.B + u.b) * d.H + u.j);
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
  step_bwd_detail::put_dhp<C>(p, T_ - 1, step_detail::step_unit(i, d.K, d.H), v);
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

// SPEC step 4 backward for sample b (one block): d scores and their softmax backward per (k,
// head), one warp each, then per (k, column of Q|K|V) dQ of k or dK, dV of k summed over the
// querying mechanisms (no atomics), saved and written as the dh~ GEMM's operand. The sample's
// d o rows, saved Q|K|V rows, probabilities, score gradients and masks are staged in shared
// memory (where each fits): at `large` on an H100 this kernel took 45 us per step when every
// item's chain read them from global memory (results/nvidia-h100-profile-steps-2026-11-27a.log),
// 22.9 once staged (27b). On the host a warp item is one lane: the same sums in the same order as
// the persistent backward (the device's lanes reassociate the d b~ dots: round-off only).
template <typename C, typename T, class Exec>
RIMS_HD void rim_step_comm_bwd(const Exec& ex, const RimStepBwdParams<T>& p, int64_t t,
                               int64_t b, C* smem) {
  using namespace step_bwd_detail;
  const RimSeqBwdParams<T>& d = p.s;
  const int64_t B = d.B, cb = sizeof(C);
  const int K = int(d.K), n_c = int(d.n_c), dc = int(d.dc), dcv = int(d.dcv), ck = int(d.ck);
  const int cv = int(d.cv), C3 = 2 * ck + cv, nK = n_c * K;
  const C scale_c = C(1) / sqrt(C(dc));
  const int n3 = int(step_detail::staged_elems(int64_t(K) * C3, cb));
  const int nkk = int(step_detail::staged_elems(int64_t(K) * nK, cb));
  const int ndo = int(step_detail::staged_elems(int64_t(K) * cv, cb));
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
  auto do_row = [&](int k) { return ndo > 0 ? dos + k * cv : dout + (k * B + b) * cv; };
  auto on = [&](int k) { return acts[k] != C(0); };
  C* dqkv = hist_row<C>(p, d.h_dqkv, t, b * K, C3);
  ex.parallel_for(K + ndo, [&](int i) {
    if (i < K) {
      acts[i] = active(p, t, b * K + i) ? C(1) : C(0);
      return;
    }
    const int k = (i - K) / cv, e = (i - K) % cv;
    dos[i - K] = dout[(k * B + b) * cv + e];
  });
  ex.copy(qs, qkv_g, n3, bps, bp_g, nkk);
  // One warp per (k, head): d b~_j = d o . v_j through the dropout, the lanes splitting each
  // dcv-long dot over consecutive elements, then through the softmax to the scaled d scores with
  // the lanes splitting j (the persistent backward's phase; on the host one lane: softmax_bwd's
  // loops exactly). A thread per (k, head, j) ran its dot alone with every row's d o and every
  // key's v of a head at one shared-memory bank (rows C3 and cv apart), and the softmax backward
  // took a phase of its own. Zero on inactive rows.
  ex.warp_for(K * n_c, [&](int i, int, int lane, int lanes) {
    const int k = i / n_c, n = i % n_c;
    const int64_t r = b * K + k;
    C* ds = dsc + i * K;
    if (!on(k)) {
      for (int j = lane; j < K; j += lanes) ds[j] = C(0);
      return;
    }
    const C* don = do_row(k) + n * dcv;
    for (int j = 0; j < K; ++j) {
      const C dot = warp_dot(don, qkv + j * C3 + 2 * ck + n * dcv, dcv, lane, lanes);
      if (lane == 0) ds[j] = dot * keep_b<C>(p, t, r, n, j);
    }
    ex.syncwarp();  // lane 0's d b~, read by every lane
    const C* y = bp + i * K;
    C dot = C(0);
    for (int j = lane; j < K; j += lanes) dot += y[j] * ds[j];
    dot = warp_sum(dot);
    for (int j = lane; j < K; j += lanes) {
      ds[j] = y[j] * (ds[j] - dot);
      ds[j] *= scale_c;
    }
  });
  ex.parallel_for(K * C3, [&](int i) {
    const int k = i / C3, col = i - k * C3;
    C acc = C(0);
    if (col < ck) {  // d query_k[n, e] = sum_j d score[k, n, j] k_j[n, e]
      const C* ds = dsc + (k * n_c + col / dc) * K;
      if (on(k))
        for (int j = 0; j < K; ++j) acc += ds[j] * qkv[j * C3 + ck + col];
    } else if (col < 2 * ck) {  // d key_k[n, e] = sum_q d score[q, n, k] q_q[n, e]
      const int c1 = col - ck, n = c1 / dc;
      for (int q = 0; q < K; ++q) acc += dsc[(q * n_c + n) * K + k] * qkv[q * C3 + c1];
    } else {  // d value_k[n, e] = sum_q b~[q, n, k] d o_q[n, e]
      const int c2 = col - 2 * ck, n = c2 / dcv;
      for (int q = 0; q < K; ++q) {
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
  const step_detail::StepUnit u = step_detail::step_unit(i, K, H);
  const int64_t j = u.j, r = u.b * K + u.k, kb = u.k * B + u.b;
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
// the step's input row (M, xrow) and the sample's saved input queries (K, nk) first (each padded
// to 4 elements: 16-byte aligned for the block copy), then the masks (K), and the saved a~, a~
// times its dropout keep factor, the score gradients (K, n_in, M each) and their dot products'
// partial sums (K, n_in, M, kDotChunks), each where it fits 15 KB (step_detail::staged_elems).
RIMS_HD int64_t rim_step_select_bwd_smem_elems(const RimSeqDims& d, int64_t cb) {
  const int64_t na = step_detail::staged_elems(d.K * d.n_in * d.M, cb);
  return (step_detail::staged_elems(d.M * d.xrow, cb) + 3) / 4 * 4 +
         (step_detail::staged_elems(d.K * d.nk, cb) + 3) / 4 * 4 + d.K + 3 * na +
         step_detail::staged_elems(d.K * d.n_in * d.M * kDotChunks, cb);
}

// SPEC step 1 backward for sample b (one block): the forward's read xa (for d F), the input
// scores' gradients (d xa . x_m, their dot products in kDotChunks strided partial sums, added in
// order) through dropout and the null softmax, dq (history and the last GEMM's operand), then
// this step's d keys and d x. d xa is the GEMM's result, read on active rows only. The step's
// input row, the saved queries, the masks, a~ (and times its keep factor), the score gradients
// and the partial sums are staged in shared memory where each fits: at `large` on an H100 this
// kernel took 45 us per step when every item read them from global memory
// (results/nvidia-h100-profile-steps-2026-11-27a.log; K XW = 4096 items of the read xa in 16
// rounds, each waiting on global loads), 19.4 once staged but the queries (27b). Item indices are
// 32-bit (those 4096 items each did four 64-bit divisions). Same sums in the same order.
template <typename C, typename T, class Exec>
RIMS_HD void rim_step_select_bwd(const Exec& ex, const RimStepBwdParams<T>& p, int64_t t,
                                 int64_t b, C* smem) {
  using namespace step_bwd_detail;
  const RimSeqBwdParams<T>& d = p.s;
  const int64_t B = d.B, cb = sizeof(C);
  const int K = int(d.K), M = int(d.M), n_in = int(d.n_in), dk = int(d.dk), nk = int(d.nk);
  const int Dx = int(d.Dx), XW = n_in * Dx, xrow = int(d.xrow), xhead = int(d.xhead);
  const int NA = n_in * M, GW = int(d.lstm ? d.GH : 2 * d.GH), KC = int(kDotChunks);
  const C scale_in = C(1) / sqrt(C(dk));
  const C* kt = static_cast<const C*>(d.keys) + (t * B + b) * M * nk;
  const C* xt_g = static_cast<const C*>(d.xsrc) + (t * B + b) * M * xrow;
  const C* dxa = static_cast<const C*>(p.dxa);  // (K, B, XW)
  const int nx = int(step_detail::staged_elems(int64_t(M) * xrow, cb));
  const int nq = int(step_detail::staged_elems(int64_t(K) * nk, cb));
  const int na = int(step_detail::staged_elems(int64_t(K) * NA, cb));
  const int np = int(step_detail::staged_elems(int64_t(K) * NA * KC, cb));
  C* xs = smem;                      // the input row (nx)
  C* qs = xs + (nx + 3) / 4 * 4;     // saved input queries (nq)
  C* acts = qs + (nq + 3) / 4 * 4;   // masks (K)
  C* as = acts + K;                  // saved a~ (na)
  C* aks = as + na;                  // a~ keep (na)
  C* dss = aks + na;                 // score gradients (na)
  C* parts = dss + na;               // partial sums (np)
  const C* xt = nx > 0 ? xs : xt_g;
  const C* q_g = saved_row<C>(p, d.sv_q, t, b * K, nk);  // row k at + k * nk
  const C* q_all = nq > 0 ? qs : q_g;
  const C* a_g = saved_row<C>(p, d.sv_a, t, b * K, NA);  // row k at + k * NA
  const C* a_all = na > 0 ? as : a_g;
  C* dsi = na > 0 ? dss : static_cast<C*>(p.dsi) + b * K * NA;
  C* part = np > 0 ? parts : static_cast<C*>(p.dsi_part) + b * K * NA * KC;
  auto on = [&](int k) { return acts[k] != C(0); };
  // a~_{k,n,m} times its dropout keep factor (the product the forward's read used).
  auto ak = [&](int k, int n, int m) {
    return na > 0 ? aks[(k * n_in + n) * M + m]
                  : a_g[k * NA + n * M + m] * keep_a<C>(p, t, b * K + k, n, m);
  };
  auto dxa_row = [&](int k) { return dxa + (k * B + b) * XW; };
  ex.parallel_for(K + na, [&](int i) {
    if (i < K) {
      acts[i] = active(p, t, b * K + i) ? C(1) : C(0);
      return;
    }
    const int j = i - K, k = j / NA, n = (j / M) % n_in, m = j % M;
    as[j] = a_g[j];
    aks[j] = a_g[j] * keep_a<C>(p, t, b * K + k, n, m);
  });
  ex.copy(xs, xt_g, nx, qs, q_g, nq);
  // The forward's read xa of active rows (zero elsewhere), for d F: stores only.
  ex.parallel_for(K * XW, [&](int i) {
    const int k = i / XW, col = i - k * XW, n = col / Dx, dd = col - n * Dx;
    C xacc = C(0);
    if (on(k))
      for (int m = 0; m < M; ++m) xacc += ak(k, n, m) * xt[m * xrow + n * xhead + dd];
    hist_row<C>(p, d.h_xa, t, b * K + k, XW)[col] = xacc;
  });
  ex.parallel_for(K * NA * KC, [&](int i) {
    const int km = i / KC, c = i % KC;  // km = (k * n_in + n) * M + m
    const int k = km / NA, n = (km / M) % n_in, m = km % M;
    C dot = C(0);
    if (on(k)) {
      const C* dx = dxa_row(k) + n * Dx;
      const C* xm = xt + m * xrow + n * xhead;
      for (int dd = c; dd < Dx; dd += KC) dot += dx[dd] * xm[dd];
    }
    part[i] = dot;
  });
  ex.parallel_for(K * n_in, [&](int i) {
    const int k = i / n_in, n = i % n_in;
    const int64_t r = b * K + k;
    C* ds = dsi + i * M;
    if (!on(k)) {
      for (int m = 0; m < M; ++m) ds[m] = C(0);
      return;
    }
    for (int m = 0; m < M; ++m) {
      C dot = C(0);
      for (int c = 0; c < KC; ++c) dot += part[(i * M + m) * KC + c];
      ds[m] = dot * keep_a<C>(p, t, r, n, m);
    }
    softmax_bwd(a_all + k * NA + n * M, ds, M, ds);
    for (int m = 0; m < M; ++m) ds[m] *= scale_in;
  });
  ex.parallel_for(K * nk, [&](int i) {
    const int k = i / nk, col = i - k * nk, n = col / dk;
    const int64_t r = b * K + k;
    const C* ds = dsi + (k * n_in + n) * M;
    C acc = C(0);
    if (on(k))
      for (int m = 0; m < M; ++m) acc += ds[m] * kt[m * nk + col];
    hist_row<C>(p, d.h_dq, t, r, nk)[col] = acc;
    from_c(acc, p.dg_op + (k * B + b) * (GW + nk) + GW + col);
  });
  ex.parallel_for(M * nk, [&](int i) {
    const int m = i / nk, e = i - m * nk, n = e / dk;
    C acc = C(0);
    for (int k = 0; k < K; ++k) acc += dsi[(k * n_in + n) * M + m] * q_all[k * nk + e];
    static_cast<C*>(d.d_keys)[(t * B + b) * M * nk + i] = acc;
  });
  ex.parallel_for(M * xrow, [&](int i) {
    const int m = i / xrow, col = i - m * xrow;
    const int n_lo = xhead > 0 ? col / Dx : 0, n_hi = xhead > 0 ? n_lo + 1 : n_in;
    const int dd = xhead > 0 ? col % Dx : col;
    C acc = C(0);
    for (int k = 0; k < K; ++k) {
      if (!on(k)) continue;
      for (int n = n_lo; n < n_hi; ++n) acc += ak(k, n, m) * dxa_row(k)[n * Dx + dd];
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
  const step_detail::StepUnit u = step_detail::step_unit(i, K, H);
  C v = static_cast<const C*>(p.direct)[i] +
        static_cast<const C*>(p.dhprev)[(u.k * B + u.b) * H + u.j];
  if (t > 0 && d.g_out != nullptr) v += static_cast<const C*>(d.g_out)[(t - 1) * B * K * H + i];
  static_cast<C*>(p.dh)[i] = v;
  if (t > 0) step_bwd_detail::put_dhp<C>(p, t - 1, u, v);
}

}  // namespace rims
