// Torch-free phases of the stepped RIM forward (rims_fast::rim_steps_fwd, csrc/rim_steps_fwd.h):
// each step is four batched GEMMs over the whole batch (the driver calls ATen, i.e. cuBLAS on a
// GPU) and four small kernels between them:
//
//   q = h_{t-1} input_query           GEMM    (K, B, H) x (K, H, nk)
//   select                            kernel  scores, null softmax, p, rank rule, xa
//   gates = [h_{t-1} | xa] [W_hh ; F]  GEMM    (GRU: two, gh and gi apart)
//   cell                              kernel  biases, masked LSTM/GRU update
//   Q|K|V = h~ [c_q | c_k | c_v]      GEMM
//   comm                              kernel  a block per sample: attention of the active
//                                             mechanisms over all K
//   y = o comm_output                 GEMM
//   residual                          kernel  h_t = h~ + y (active), h~ (inactive)
//
// Where the persistent kernels (rim_seq_fwd.cuh) reuse a weight only across the <= 8 samples of
// their tile and so read every weight B / 8 times per step, here each GEMM reads each weight once
// per step for the whole batch: the design for layers whose weights do not fit on chip (the
// `large` config; benchmarks/README.md). The GEMMs compute inactive rows too (their inputs are
// zero or their results discarded): a dense GEMM on tensor cores is cheaper than a gather.
//
// Layouts: GEMM operands and results are mechanism-major (K, B, width), contiguous, so that
// each GEMM is a plain batched product; the state, the outputs and the saved activations are the
// persistent forward's sample-major (B, K, width) / (T, B, K, width), so either backward
// (rim_seq_bwd.cuh, or the stepped rim_step_bwd.cuh) can follow either forward. GEMM operands are in the storage type T (bf16/fp16
// operands with fp32 accumulation on tensor cores: activations are rounded to T before a product,
// as the reference rounds them); results and everything else are in the compute type C.
//
// Each phase reads and writes what the persistent forward does, in the same order of operations
// for everything but the GEMMs' sums, and saves the same values (rim_seq_fwd.cuh, RimSeqFwdParams).
#pragma once

#include "rim_seq_fwd.cuh"

namespace rims {

template <typename T>
struct RimStepParams {
  RimSeqFwdParams<T> s;  // sizes, inputs, outputs and saved histories as the persistent forward
  // GEMM operands (storage type, (K, B, width)).
  T* hx;     // [h_{t-1} | xa], width H + XW
  T* ht_op;  // h~, width H
  T* o_op;   // the dropped read o, width cv (zero on inactive rows)
  // The fused kernels' weights (RIMS_FAST_CUDA_FUSED=1), else nullptr: [W_hh ; F]
  // gate-interleaved (rim_step_gates.cuh, LSTM), W_o transposed (rim_step_output.cuh).
  const T* wgi;
  const T* wot;
  // GEMM results (compute type, (K, B, width)).
  const void* q;    // nk
  const void* g;    // GH: LSTM both terms; GRU gi = xa F
  const void* gh;   // GH: GRU h W_hh; nullptr for LSTM
  const void* qkv;  // 2 ck + cv
  const void* y;    // H
  // Compute-type state and per-step rows, (B, K, width).
  void* h;   // h_{t-1}, then h_t
  void* c;   // LSTM only
  // One step's scratch where nothing is saved (the saved history's slice at t otherwise).
  void *ht, *a, *bp, *o;
};

namespace step_detail {

// Row r = b * K + k of step t in a (T, B, K, width) history, or of the one-step scratch.
template <typename C, typename T>
RIMS_HD C* row_at(const RimStepParams<T>& p, void* saved, void* scratch, int64_t t, int64_t r,
                  int64_t width) {
  return saved != nullptr ? static_cast<C*>(saved) + (t * p.s.B * p.s.K + r) * width
                          : static_cast<C*>(scratch) + r * width;
}

// Elements of an array a block-per-sample phase (rim_step_select, rim_step_comm_bwd,
// rim_step_select_bwd) stages in shared memory: n, or 0 (not staged, read from global memory)
// beyond 15 KB, so that a kernel's staged arrays stay near a block's default 48 KB (for_samples
// opts in beyond it).
RIMS_HD int64_t staged_elems(int64_t n, int64_t cb) { return n * cb <= 15 * 1024 ? n : 0; }

}  // namespace step_detail

// Compute-type elements of rim_step_select's shared memory (cb: the compute type's size): p and
// the active flags, then the staged q rows (K, nk), the step's keys (M, nk) and the attention
// weights a~ (K, n_in, M), each where it fits (step_detail::staged_elems).
RIMS_HD int64_t rim_step_select_smem_elems(const RimSeqDims& d, int64_t cb) {
  return 2 * d.K + step_detail::staged_elems(d.K * d.nk, cb) +
         step_detail::staged_elems(d.M * d.nk, cb) +
         step_detail::staged_elems(d.K * d.n_in * d.M, cb);
}

// SPEC steps 1-2 and the attention-weighted input for sample b: one block (Exec: items over its
// threads, a barrier after each loop). smem: rim_step_select_smem_elems compute-type values.
// The sample's q rows, keys and a~ are staged in shared memory (where they fit), so that no
// item's dependent chain reads global memory element by element: at `large` on an H100 this
// kernel took 20.7 us per step, its scores a 64-long dot per (k, head, element) on 8 threads
// fed by global loads, its weighted input 16 rounds of items each waiting on global loads
// (results/nvidia-h100-profile-steps-2026-11-27a.log). Same sums in the same order.
template <typename C, typename T, class Exec>
RIMS_HD void rim_step_select(const Exec& ex, const RimStepParams<T>& p, int64_t t, int64_t b,
                             C* smem) {
  const RimSeqFwdParams<T>& d = p.s;
  const int64_t B = d.B, M = d.M, K = d.K, H = d.H, nk = d.nk, dk = d.dk, n_in = d.n_in;
  const int64_t Dx = d.Dx, XW = n_in * Dx, HX = H + XW;
  const C* kt = static_cast<const C*>(d.keys) + (t * B + b) * M * nk;
  const C* xt = static_cast<const C*>(d.xsrc) + (t * B + b) * M * d.xrow;
  const C* q = static_cast<const C*>(p.q);
  const C scale_in = C(1) / sqrt(C(dk));
  const C keep_in = C(1.0 - d.p_in);
  const float drop_in = static_cast<float>(d.p_in);
  const int64_t cb = sizeof(C), NA = n_in * M;
  const int64_t nq = step_detail::staged_elems(K * nk, cb);
  const int64_t nks = step_detail::staged_elems(M * nk, cb);
  const int64_t na = step_detail::staged_elems(K * NA, cb);
  C* pk = smem;
  C* on = smem + K;
  C* qs = smem + 2 * K;  // staged q rows (nq), keys (nks), a~ (na)
  C* ks = qs + nq;
  C* as = ks + nks;
  auto a_row = [&](int64_t k) {
    return step_detail::row_at<C>(p, d.sv_a, p.a, t, b * K + k, NA);
  };
  // Where a~ of mechanism k lives during this phase: shared memory, or its global row.
  auto a_work = [&](int64_t k) { return na > 0 ? as + k * NA : a_row(k); };
  // The sample's q rows (saved per (k, column)) and the step's keys, staged.
  ex.parallel_for(int(K * nk + nks), [&](int i) {
    if (i >= K * nk) {
      ks[i - K * nk] = kt[i - K * nk];
      return;
    }
    const int64_t k = i / nk, e = i % nk;
    const C v = q[(k * B + b) * nk + e];
    if (nq > 0) qs[i] = v;
    if (d.sv_q != nullptr) static_cast<C*>(d.sv_q)[(t * B * K + b * K + k) * nk + e] = v;
  });
  // Scores per (k, head, m), then per k the null softmax of each head and p.
  ex.parallel_for(int(K * NA), [&](int i) {
    const int64_t k = i / NA, n = (i / M) % n_in, m = i % M;
    const C* qn = (nq > 0 ? qs + k * nk : q + (k * B + b) * nk) + n * dk;
    const C* km = (nks > 0 ? ks : kt) + m * nk + n * dk;
    C dot = C(0);
    for (int64_t j = 0; j < dk; ++j) dot += qn[j] * km[j];
    a_work(k)[n * M + m] = dot * scale_in;
  });
  ex.parallel_for(int(K), [&](int k) {
    C psum = C(0);
    C* a = a_work(k);
    for (int64_t n = 0; n < n_in; ++n) psum += null_softmax(a + n * M, M, a + n * M);
    pk[k] = psum / C(n_in);
  });
  // The rank rule per k; items past K copy the staged a~ to its rows (saved or scratch).
  ex.parallel_for(int(K + na), [&](int i) {
    if (i >= K) {
      const int64_t j = i - K;
      a_row(j / NA)[j % NA] = as[j];
      return;
    }
    const int64_t k = i;
    const bool act = competition_active(pk, K, k, d.top_k);
    on[k] = act ? C(1) : C(0);
    d.masks[(t * B + b) * K + k] = act;
  });
  // xa per column of the input term, all K mechanisms in the item (one pass over the sample's
  // input row: items of (k, column) made each of K * XW / threads rounds wait on global loads).
  ex.parallel_for(int(XW), [&](int col) {
    const int64_t n = col / Dx, dd = col % Dx;
    for (int64_t k = 0; k < K; ++k) {
      T* dst = p.hx + (k * B + b) * HX + H + col;
      if (on[k] == C(0)) {
        from_c(C(0), dst);
        continue;
      }
      const C* ar = a_work(k) + n * M;
      C acc = C(0);
      for (int64_t m = 0; m < M; ++m) {
        C w = ar[m];
        if (drop_in > 0.f) {
          const uint64_t idx = static_cast<uint64_t>((((t * B + b) * K + k) * n_in + n) * M + m);
          w = dropout_keep(d.seed, 0, idx, drop_in) ? w / keep_in : C(0);
        }
        acc += w * xt[m * d.xrow + n * d.xhead + dd];
      }
      from_c(acc, dst);
    }
  });
}

// SPEC step 3 for unit j of row r = b * K + k: biases, the masked cell, saving. gi(col) and
// gh(col) are the row's gate products before the biases, col = gate * H + j (LSTM: gi holds both
// terms and gh is not called; GRU: gi = xa F, gh = h W_hh). The cell kernel reads them from the
// gate GEMM's result, the fused gates kernel (rim_step_gates.cuh) from its accumulator tile.
template <typename C, typename T, class Gi, class Gh>
RIMS_HD void rim_step_cell_unit(const RimStepParams<T>& p, int64_t t, int64_t r, int64_t j,
                                const Gi& gi, const Gh& gh) {
  const RimSeqFwdParams<T>& d = p.s;
  const int64_t B = d.B, K = d.K, H = d.H, GH = d.GH, GW = d.lstm ? GH : 2 * GH;
  const int64_t i = r * H + j, b = r / K, k = r % K, kb = k * B + b;
  C* h = static_cast<C*>(p.h);
  C* c = static_cast<C*>(p.c);
  C* ht = step_detail::row_at<C>(p, d.sv_ht, p.ht, t, r, H);
  C* sg = d.sv_g != nullptr ? static_cast<C*>(d.sv_g) + (t * B * K + r) * GW : nullptr;
  if (d.sv_h != nullptr) {
    static_cast<C*>(d.sv_h)[(t * B * K + r) * H + j] = h[i];
    if (d.lstm) static_cast<C*>(d.sv_c)[(t * B * K + r) * H + j] = c[i];
  }
  T* op = p.ht_op + kb * H + j;
  if (!d.masks[t * B * K + r]) {  // copied, not evaluated; saved gates zero
    ht[j] = h[i];
    from_c(h[i], op);
    if (sg != nullptr)
      for (int64_t col = j; col < GW; col += H) sg[col] = C(0);
    return;
  }
  auto bias = [&](const T* w, int64_t col) { return to_c(w[k * GH + col]); };
  if (d.lstm) {
    C v[4];
    for (int q = 0; q < 4; ++q) {
      const int64_t col = q * H + j;
      v[q] = gi(col) + (bias(d.b_ih, col) + bias(d.b_hh, col));
      if (sg != nullptr) sg[col] = v[q];
    }
    C hn, cn;
    lstm_pointwise_fwd(v[0], v[1], v[2], v[3], c[i], hn, cn);
    ht[j] = hn;
    c[i] = cn;
  } else {
    C v[6];
    for (int q = 0; q < 3; ++q) {
      const int64_t col = q * H + j;
      v[q] = gi(col) + bias(d.b_ih, col);
      v[3 + q] = gh(col) + bias(d.b_hh, col);
      if (sg != nullptr) {
        sg[col] = v[q];
        sg[GH + col] = v[3 + q];
      }
    }
    ht[j] = gru_pointwise_fwd(v[0], v[1], v[2], v[3], v[4], v[5], h[i]);
  }
  from_c(ht[j], op);
}

// The cell kernel's element i = (b, k, j) of (B, K, H), its gate products from the GEMMs' results.
template <typename C, typename T>
RIMS_HD void rim_step_cell(const RimStepParams<T>& p, int64_t t, int64_t i) {
  const RimSeqFwdParams<T>& d = p.s;
  const int64_t r = i / d.H, j = i % d.H, kb = (r % d.K) * d.B + r / d.K;
  const C* g = static_cast<const C*>(p.g) + kb * d.GH;
  const C* gh = d.lstm ? nullptr : static_cast<const C*>(p.gh) + kb * d.GH;
  rim_step_cell_unit<C>(p, t, r, j, [&](int64_t col) { return g[col]; },
                        [&](int64_t col) { return gh[col]; });
}

// SPEC step 4 for sample b (one block; smem unused): each active mechanism's heads attend over
// all K mechanisms. Three loops so that more threads have work (one thread per (k, head) ran the
// K x (dc + dcv) products serially, accumulating o in global memory: 100 us of a 133 us step at
// `paper` on an H100, results/nvidia-h100-profile-steps-2026-11-27a.log): the scores per
// (k, head, j), the softmax per (k, head), then the read o per (k, column) and saving Q|K|V. Same
// sums in the same order as the persistent forward.
template <typename C, typename T, class Exec>
RIMS_HD void rim_step_comm(const Exec& ex, const RimStepParams<T>& p, int64_t t, int64_t b) {
  const RimSeqFwdParams<T>& d = p.s;
  const int64_t B = d.B, K = d.K, n_c = d.n_c, dc = d.dc, dcv = d.dcv, ck = d.ck, cv = d.cv;
  const int64_t C3 = 2 * ck + cv;
  const C* qkv = static_cast<const C*>(p.qkv);  // (K, B, C3): row (k, b) at (k * B + b) * C3
  const bool* on = d.masks + (t * B + b) * K;
  const C scale_c = C(1) / sqrt(C(dc));
  auto probs = [&](int64_t k, int64_t n) {  // b~[k, n, :] (the saved row or this step's scratch)
    return step_detail::row_at<C>(p, d.sv_bp, p.bp, t, b * K + k, n_c * K) + n * K;
  };
  ex.parallel_for(int(K * n_c * K), [&](int i) {
    const int64_t k = i / (n_c * K), n = (i / K) % n_c, j = i % K;
    C* y = probs(k, n);
    if (!on[k]) {
      y[j] = C(0);
      return;
    }
    const C* qn = qkv + (k * B + b) * C3 + n * dc;
    const C* kj = qkv + (j * B + b) * C3 + ck + n * dc;
    C dot = C(0);
    for (int64_t e = 0; e < dc; ++e) dot += qn[e] * kj[e];
    y[j] = dot * scale_c;
  });
  ex.parallel_for(int(K * n_c), [&](int i) {
    const int64_t k = i / n_c, n = i % n_c;
    if (on[k]) softmax(probs(k, n), K, probs(k, n));
  });
  const C keep_c = C(1.0 - d.p_c);
  const float drop_c = static_cast<float>(d.p_c);
  ex.parallel_for(int(K * cv), [&](int i) {
    const int64_t k = i / cv, col = i % cv, n = col / dcv, r = b * K + k;
    const C* mine = qkv + (k * B + b) * C3;
    if (d.sv_qkv != nullptr) {  // V's column col; Q's and K's columns col, col + cv, ...
      C* sv = static_cast<C*>(d.sv_qkv) + (t * B * K + r) * C3;
      for (int64_t c2 = col; c2 < ck; c2 += cv) {
        sv[c2] = on[k] ? mine[c2] : C(0);  // inactive rows' queries are read by no one: zeros
        sv[ck + c2] = mine[ck + c2];
      }
      sv[2 * ck + col] = mine[2 * ck + col];
    }
    C acc = C(0);
    if (on[k]) {
      const C* y = probs(k, n);
      for (int64_t j = 0; j < K; ++j) {
        C w = y[j];
        if (drop_c > 0.f) {
          const uint64_t idx = static_cast<uint64_t>((((t * B + b) * K + k) * n_c + n) * K + j);
          w = dropout_keep(d.seed, 1, idx, drop_c) ? w / keep_c : C(0);
        }
        acc += w * qkv[(j * B + b) * C3 + 2 * ck + col];
      }
    }
    step_detail::row_at<C>(p, d.sv_o, p.o, t, r, cv)[col] = acc;
    from_c(acc, p.o_op + (k * B + b) * cv + col);
  });
}

// SPEC step 5 for unit j of row r = b * K + k: the residual of active rows, out[t], the next
// step's operand row. y() is the row's output product at j (read on active rows only): from the
// GEMM's result in the residual kernel, from the accumulator tile in rim_step_output.cuh.
template <typename C, typename T, class Y>
RIMS_HD void rim_step_residual_unit(const RimStepParams<T>& p, int64_t t, int64_t r, int64_t j,
                                    const Y& y) {
  const RimSeqFwdParams<T>& d = p.s;
  const int64_t B = d.B, K = d.K, H = d.H, HX = H + d.n_in * d.Dx;
  const int64_t i = r * H + j, kb = (r % K) * B + r / K;
  const C ht = step_detail::row_at<C>(p, d.sv_ht, p.ht, t, r, H)[j];
  const C v = d.masks[t * B * K + r] ? ht + y() : ht;
  static_cast<C*>(p.h)[i] = v;
  from_c(v, d.out + t * B * K * H + i);
  from_c(v, p.hx + kb * HX + j);
}

// The residual kernel's element i = (b, k, j) of (B, K, H).
template <typename C, typename T>
RIMS_HD void rim_step_residual(const RimStepParams<T>& p, int64_t t, int64_t i) {
  const RimSeqFwdParams<T>& d = p.s;
  const int64_t r = i / d.H, j = i % d.H, kb = (r % d.K) * d.B + r / d.K;
  rim_step_residual_unit<C>(p, t, r, j,
                            [&] { return static_cast<const C*>(p.y)[kb * d.H + j]; });
}

}  // namespace rims
