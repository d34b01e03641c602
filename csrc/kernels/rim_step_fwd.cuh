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
#include "stage_run.cuh"

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

// Elements of an array a block-per-sample phase (rim_step_select, rim_step_comm,
// rim_step_comm_bwd, rim_step_select_bwd) stages in shared memory: n, or 0 (not staged, read from
// global memory) beyond 15 KB, so that a kernel's staged arrays stay near a block's default 48 KB
// (for_samples opts in beyond it).
RIMS_HD int64_t staged_elems(int64_t n, int64_t cb) { return n * cb <= 15 * 1024 ? n : 0; }

// Unit i = (b, k, j) of a (B, K, H) array (the per-unit kernels' items). 32-bit arithmetic: the
// stepped ops refuse B K H >= 2^31 (rim_steps_check_sizes); a 64-bit division is a subroutine
// call on the GPU, three per item in these kernels' index math.
struct StepUnit {
  int b, k, j;
};
RIMS_HD StepUnit step_unit(int64_t i, int64_t K, int64_t H) {
  const unsigned u = static_cast<unsigned>(i), h = static_cast<unsigned>(H);
  const unsigned kk = static_cast<unsigned>(K), r = u / h, b = r / kk;
  return {static_cast<int>(b), static_cast<int>(r - b * kk), static_cast<int>(u - r * h)};
}

}  // namespace step_detail

// Compute-type elements of rim_step_select's shared memory (cb: the compute type's size): p and
// the active flags, then the staged q rows (K, nk), the step's keys (M, nk), its input row (M,
// xrow) and the attention weights a~ (K, n_in, M), each where it fits
// (step_detail::staged_elems).
RIMS_HD int64_t rim_step_select_smem_elems(const RimSeqDims& d, int64_t cb) {
  return 2 * d.K + step_detail::staged_elems(d.K * d.nk, cb) +
         step_detail::staged_elems(d.M * d.nk, cb) +
         step_detail::staged_elems(d.M * d.xrow, cb) +
         step_detail::staged_elems(d.K * d.n_in * d.M, cb);
}

// SPEC steps 1-2 and the attention-weighted input for sample b: one block (Exec: items over its
// threads, a barrier after each loop). smem: rim_step_select_smem_elems compute-type values.
// Four phases:
//   - staging: the sample's q rows (also saved), the step's keys and its input row, in runs of
//     kStageRun elements whose loads are all in flight (stage_run): one L2 round trip. At `large`
//     on an H100 this kernel took 11.0 us a step when the rows were staged one element per item
//     (~5 rounds of a load, each waiting on the last: a shared-memory store may alias the next
//     load) and its weighted input read the input row from global memory K times per column
//     (results/nvidia-h100-profile-steps-2026-11-27b.log);
//   - one warp per mechanism: its scores, the lanes splitting each dk-long dot over consecutive
//     elements (warp_dot; a thread per (k, head, m) ran the dot alone), then lane 0 the null
//     softmax of each head and p (the persistent forward's phase 1b-2);
//   - the rank rule; items past K copy the staged a~ to its rows (saved or scratch);
//   - the weighted input xa per column, all K mechanisms in the item.
// On the host a warp item is one lane: the same sums in the same order as the persistent forward
// (on the device the lanes reassociate the dots: round-off only, as there).
template <typename C, typename T, class Exec>
RIMS_HD void rim_step_select(const Exec& ex, const RimStepParams<T>& p, int64_t t, int64_t b,
                             C* smem) {
  const RimSeqFwdParams<T>& d = p.s;
  const int64_t B = d.B, cb = sizeof(C);
  const int M = int(d.M), K = int(d.K), H = int(d.H), nk = int(d.nk), dk = int(d.dk);
  const int n_in = int(d.n_in), Dx = int(d.Dx), XW = n_in * Dx, HX = H + XW, NA = n_in * M;
  const int xrow = int(d.xrow), xhead = int(d.xhead);
  const C* kt = static_cast<const C*>(d.keys) + (t * B + b) * M * nk;
  const C* xt = static_cast<const C*>(d.xsrc) + (t * B + b) * M * xrow;
  const C* q = static_cast<const C*>(p.q);  // (K, B, nk)
  const C scale_in = C(1) / sqrt(C(dk));
  const C keep_in = C(1.0 - d.p_in);
  const float drop_in = static_cast<float>(d.p_in);
  const int nq = int(step_detail::staged_elems(int64_t(K) * nk, cb));
  const int nks = int(step_detail::staged_elems(int64_t(M) * nk, cb));
  const int nx = int(step_detail::staged_elems(int64_t(M) * xrow, cb));
  const int na = int(step_detail::staged_elems(int64_t(K) * NA, cb));
  C* pk = smem;
  C* on = smem + K;
  C* qs = smem + 2 * K;  // staged q rows (nq), keys (nks), input row (nx), a~ (na)
  C* ks = qs + nq;
  C* xs = ks + nks;
  C* as = xs + nx;
  auto a_row = [&](int k) {
    return step_detail::row_at<C>(p, d.sv_a, p.a, t, b * K + k, NA);
  };
  // Where a~ of mechanism k lives during this phase: shared memory, or its global row.
  auto a_work = [&](int k) { return na > 0 ? as + k * NA : a_row(k); };
  auto q_row = [&](int k) { return q + (k * B + b) * nk; };
  const C* keys = nks > 0 ? ks : kt;
  const C* x_in = nx > 0 ? xs : xt;
  // Staging: item (k, run) of the q rows (staged where they fit, saved when saving), then the
  // keys' runs, then the input row's.
  const int rq = stage_runs(nk);
  const int n_q = nq > 0 || d.sv_q != nullptr ? K * rq : 0;
  const int n_k = nks > 0 ? stage_runs(nks) : 0, n_x = nx > 0 ? stage_runs(nx) : 0;
  ex.parallel_for(n_q + n_k + n_x, [&](int x) {
    if (x < n_q) {
      const int k = x / rq;
      C* saved = d.sv_q != nullptr
                     ? static_cast<C*>(d.sv_q) + ((t * B + b) * K + k) * nk : nullptr;
      stage_run(nq > 0 ? qs + k * nk : nullptr, q_row(k), nk, x - k * rq, saved);
      return;
    }
    x -= n_q;
    if (x < n_k) {
      stage_run(ks, kt, nks, x);
      return;
    }
    stage_run(xs, xt, nx, x - n_k);
  });
  ex.warp_for(K, [&](int k, int, int lane, int lanes) {
    C* a = a_work(k);
    const C* qk = nq > 0 ? qs + k * nk : q_row(k);
    C psum = C(0);
    for (int n = 0; n < n_in; ++n) {
      for (int m = 0; m < M; ++m) {
        const C dot = warp_dot(qk + n * dk, keys + m * nk + n * dk, dk, lane, lanes);
        if (lane == 0) a[n * M + m] = dot * scale_in;
      }
      if (lane == 0) psum += null_softmax(a + n * M, M, a + n * M);
    }
    if (lane == 0) pk[k] = psum / C(n_in);
  });
  // The rank rule per k; items past K copy the staged a~ to its rows (saved or scratch).
  ex.parallel_for(K + na, [&](int i) {
    if (i >= K) {
      const int j = i - K;
      a_row(j / NA)[j % NA] = as[j];
      return;
    }
    const bool act = competition_active(pk, K, i, d.top_k);
    on[i] = act ? C(1) : C(0);
    d.masks[(t * B + b) * K + i] = act;
  });
  // xa per column of the input term, all K mechanisms in the item (one pass over the sample's
  // input row: items of (k, column) made each of K * XW / threads rounds wait on global loads).
  ex.parallel_for(XW, [&](int col) {
    const int n = col / Dx, dd = col % Dx;
    for (int k = 0; k < K; ++k) {
      T* dst = p.hx + (k * B + b) * HX + H + col;
      if (on[k] == C(0)) {
        from_c(C(0), dst);
        continue;
      }
      const C* ar = a_work(k) + n * M;
      C acc = C(0);
      for (int m = 0; m < M; ++m) {
        C w = ar[m];
        if (drop_in > 0.f) {
          const uint64_t idx = static_cast<uint64_t>((((t * B + b) * K + k) * n_in + n) * M + m);
          w = dropout_keep(d.seed, 0, idx, drop_in) ? w / keep_in : C(0);
        }
        acc += w * x_in[m * xrow + n * xhead + dd];
      }
      from_c(acc, dst);
    }
  });
}

// SPEC step 3 for unit j of row r = b * K + k: biases, the masked cell, saving. gi(q) and gh(q)
// are the row's products of gate q (its column q * H + j) before the biases (LSTM: gi holds both
// terms and gh is not called; GRU: gi = xa F, gh = h W_hh). The cell kernel reads them from the
// gate GEMM's result, the fused gates kernel (rim_step_gates.cuh) from its accumulator tile.
template <typename C, typename T, class Gi, class Gh>
RIMS_HD void rim_step_cell_unit(const RimStepParams<T>& p, int64_t t, int b, int k, int j,
                                const Gi& gi, const Gh& gh) {
  const RimSeqFwdParams<T>& d = p.s;
  const int64_t B = d.B, K = d.K, H = d.H, GH = d.GH, GW = d.lstm ? GH : 2 * GH;
  const int64_t r = b * K + k, i = r * H + j, kb = k * B + b;
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
      v[q] = gi(q) + (bias(d.b_ih, col) + bias(d.b_hh, col));
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
      v[q] = gi(q) + bias(d.b_ih, col);
      v[3 + q] = gh(q) + bias(d.b_hh, col);
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
  const step_detail::StepUnit u = step_detail::step_unit(i, d.K, d.H);
  const int64_t kb = u.k * d.B + u.b;
  const C* g = static_cast<const C*>(p.g) + kb * d.GH + u.j;
  const C* gh = d.lstm ? nullptr : static_cast<const C*>(p.gh) + kb * d.GH + u.j;
  rim_step_cell_unit<C>(p, t, u.b, u.k, u.j, [&](int q) { return g[q * d.H]; },
                        [&](int q) { return gh[q * d.H]; });
}

// Compute-type elements of rim_step_comm's shared memory (cb: the compute type's size): the
// masks (K), then the sample's Q|K|V rows (K, C3) and its probabilities (K, n_c, K), each where it
// fits (step_detail::staged_elems).
RIMS_HD int64_t rim_step_comm_smem_elems(const RimSeqDims& d, int64_t cb) {
  return d.K + step_detail::staged_elems(d.K * (2 * d.ck + d.cv), cb) +
         step_detail::staged_elems(d.K * d.n_c * d.K, cb);
}

// SPEC step 4 for sample b (one block; smem: rim_step_comm_smem_elems compute-type values): each
// active mechanism's heads attend over all K mechanisms. Three phases:
//   - staging: the masks and the sample's K rows of Q|K|V from the GEMM's result (runs of
//     kStageRun elements, all loads in flight: one L2 round trip), saved as they pass (inactive
//     rows' queries as zeros: no one reads them);
//   - one warp per (k, head) of the scores and the softmax (the persistent forward's phase 4b):
//     the lanes split each dc-long dot over consecutive elements, then the K keys; the
//     probabilities are saved undropped, and where staged the dropout's scale is applied in place;
//   - the read o per (k, column), from the staged rows and probabilities (global memory where
//     they were too large to stage).
// At `paper` on an H100 this kernel took 9.3 us a step and 13.7 at `large` with a thread per
// (k, head, j) running its dot on global loads, a thread per (k, head) its softmax, and the read
// loading K values of global memory per column (results/nvidia-h100-profile-steps-2026-11-27b.log).
// On the host a warp item is one lane: the same sums in the same order as the persistent forward.
template <typename C, typename T, class Exec>
RIMS_HD void rim_step_comm(const Exec& ex, const RimStepParams<T>& p, int64_t t, int64_t b,
                           C* smem) {
  const RimSeqFwdParams<T>& d = p.s;
  const int64_t B = d.B, cb = sizeof(C);
  const int K = int(d.K), n_c = int(d.n_c), dc = int(d.dc), dcv = int(d.dcv), ck = int(d.ck);
  const int cv = int(d.cv), C3 = 2 * ck + cv;
  const C* qkv = static_cast<const C*>(p.qkv);  // (K, B, C3): row (k, b) at (k * B + b) * C3
  const C scale_c = C(1) / sqrt(C(dc));
  const C keep_c = C(1.0 - d.p_c);
  const float drop_c = static_cast<float>(d.p_c);
  const int n3 = int(step_detail::staged_elems(int64_t(K) * C3, cb));
  const int nbp = int(step_detail::staged_elems(int64_t(K) * n_c * K, cb));
  C* acts = smem;       // masks (K)
  C* qs = smem + K;     // Q|K|V rows (n3)
  C* bps = qs + n3;     // probabilities (nbp)
  auto row = [&](int j) { return n3 > 0 ? qs + j * C3 : qkv + (j * B + b) * C3; };
  auto probs = [&](int k, int n) {  // b~[k, n, :] (the saved row or this step's scratch)
    return step_detail::row_at<C>(p, d.sv_bp, p.bp, t, b * K + k, n_c * K) + n * K;
  };
  auto drop = [&](int k, int n, int j, C w) {
    const uint64_t idx = static_cast<uint64_t>((((t * B + b) * K + k) * n_c + n) * K + j);
    return dropout_keep(d.seed, 1, idx, drop_c) ? w / keep_c : C(0);
  };
  const bool* masks = d.masks + (t * B + b) * K;
  const int r3 = stage_runs(C3);
  const int n_s = n3 > 0 || d.sv_qkv != nullptr ? K * r3 : 0;
  ex.parallel_for(K + n_s, [&](int x) {
    if (x < K) {
      acts[x] = masks[x] ? C(1) : C(0);
      return;
    }
    const int k = (x - K) / r3;
    C* sv = d.sv_qkv != nullptr ? static_cast<C*>(d.sv_qkv) + ((t * B + b) * K + k) * C3
                                : nullptr;
    const bool on = masks[k];
    stage_run(n3 > 0 ? qs + k * C3 : nullptr, qkv + (k * B + b) * C3, C3, x - K - k * r3, sv,
              [&](int e, C v) { return e < ck && !on ? C(0) : v; });
  });
  ex.warp_for(K * n_c, [&](int i, int, int lane, int lanes) {
    const int k = i / n_c, n = i % n_c;
    C* yg = probs(k, n);
    if (acts[k] == C(0)) {
      for (int j = lane; j < K; j += lanes) yg[j] = C(0);
      return;
    }
    C* y = nbp > 0 ? bps + i * K : yg;
    const C* qn = row(k) + n * dc;
    for (int j = 0; j < K; ++j) {
      const C dot = warp_dot(qn, row(j) + ck + n * dc, dc, lane, lanes);
      if (lane == 0) y[j] = dot * scale_c;
    }
    warp_softmax(ex, y, K, lane, lanes, [&](int j) {
      if (nbp == 0) return;  // y is the global row: the read applies the dropout
      yg[j] = y[j];
      if (drop_c > 0.f) y[j] = drop(k, n, j, y[j]);
    });
  });
  ex.parallel_for(K * cv, [&](int i) {
    const int k = i / cv, col = i % cv, n = col / dcv;
    const int64_t r = b * K + k;
    C acc = C(0);
    if (acts[k] != C(0)) {
      const C* y = nbp > 0 ? bps + (k * n_c + n) * K : probs(k, n);
      for (int j = 0; j < K; ++j) {
        const C w = nbp == 0 && drop_c > 0.f ? drop(k, n, j, y[j]) : y[j];
        acc += w * row(j)[2 * ck + col];
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
RIMS_HD void rim_step_residual_unit(const RimStepParams<T>& p, int64_t t, int b, int k, int j,
                                    const Y& y) {
  const RimSeqFwdParams<T>& d = p.s;
  const int64_t B = d.B, K = d.K, H = d.H, HX = H + d.n_in * d.Dx;
  const int64_t r = b * K + k, i = r * H + j, kb = k * B + b;
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
  const step_detail::StepUnit u = step_detail::step_unit(i, d.K, d.H);
  const int64_t kb = u.k * d.B + u.b;
  rim_step_residual_unit<C>(p, t, u.b, u.k, u.j,
                            [&] { return static_cast<const C*>(p.y)[kb * d.H + u.j]; });
}

}  // namespace rims
