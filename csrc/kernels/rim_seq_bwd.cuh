// Torch-free persistent whole-sequence RIM backward: the reverse-time sweep of
// rim_seq_fwd.cuh's forward, one thread block per tile of samples, dh and dc in shared memory.
//
// Same execution model as the forward (Exec::parallel_for = items then a barrier; HostExec runs
// it on the host for tests). Per step, in order: the output projection's backward (d o), the
// communication attention's backward (score gradients, dQ; then dK, dV of every mechanism as a
// sum over the querying mechanisms: no atomics), dh~ through Q|K|V (cut for inactive mechanisms
// under block_inactive_grad), the masked cell's backward, the input term's backward (d xa, the
// attention-weighted input xa recomputed), the input attention's backward (d scores, dq), the
// gradients of this step's keys and input elements, and dh_{t-1}, dc_{t-1}.
// The sweep writes the per-step gradients the weight gradients need (dq, d gates, d Q|K|V, dh'
// of active rows, xa); the caller turns them into weight gradients with GEMMs over all T*B rows
// (deterministic). Everything in the compute type C.
#pragma once

#include <cstdint>

#include "rim_seq_fwd.cuh"
#include "stage_run.cuh"

namespace rims {

template <typename T>
struct RimSeqBwdParams : RimSeqDims {
  // The forward's inputs (as in RimSeqFwdParams) and its saved activations.
  const void* keys;
  const void* xsrc;
  // Weights transposed once per call (the launcher's copies), so that the weight-stationary
  // phases below read them coalesced: item (k, column) -> consecutive columns, consecutive
  // addresses. input_query^T (K, nk, H), weight_hh^T (K, GH, H), [comm_query | comm_key |
  // comm_value]^T (K, C3, H), comm_output^T (K, H, cv), F^T (K, n_in, GH, Dx; compute type).
  const T* w_query_t;
  const T* w_hh_t;
  const T* c_qkv_t;
  const T* c_output_t;
  const void* w_x_t;
  const bool* masks;
  const void *sv_h, *sv_c, *sv_ht, *sv_q, *sv_a, *sv_g, *sv_qkv, *sv_bp, *sv_o;
  // Incoming gradients (compute type, nullptr = zero): out (T, B, K*H), h_n, c_n (B, K, H).
  const void *g_out, *g_hn, *g_cn;
  bool block_inactive_grad;
  // Outputs (compute type): d keys (T, B, M, nk), d xsrc (T, B, M, xrow), d h0, d c0 (B, K, H),
  // and the per-step histories (T, B, K, width): dq (nk), d gates (GW), d Q|K|V (C3),
  // dh' of active rows (H, zero elsewhere), xa (n_in*Dx, zero on inactive rows).
  void *d_keys, *d_xsrc, *d_h0, *d_c0, *h_dq, *h_dg, *h_dqkv, *h_dhp, *h_xa;
  // Tensor-core path (rim_seq_bwd_tile's MMA): the four products' zero-padded operands per
  // mechanism, storage type: comm_output^T (bh, bo), [comm_query|comm_key|comm_value]^T (bq, bh2),
  // F^T (bg, bx) and [weight_hh^T ; input_query^T] (bg + bk, bh2) (dq's rows from bg).
  // Widths: bh = H, bq = C3, bg = GH, bk = nk padded to 16; bo = cv, bh2 = H, bx = XW padded to
  // 32; ba: the largest operand width (the operand tile's). Each stored transposed, (n, kd) per
  // mechanism (mma_rows.cuh).
  const T *wb_out, *wb_qkv, *wb_x, *wb_h;
  int64_t bh, bq, bg, bk, bo, bh2, bx, ba;
  // The hoisted input term (RimSeqDims::xw_hoisted; CUDA cores): x_{m,n} F[k, n] of every step,
  // (T, B, M, K, n_in, GH) as the forward's (nullptr without it). With it the sweep reads no F: d a~ is
  // d gi . (x F) per (row, head, element), and instead of d xsrc and the xa history it writes
  // h_ak (T, B, K, n_in*M), a~ with the dropout's keep scale on active rows (zero elsewhere), from
  // which the caller makes both with GEMMs after the sweep (seq_bwd_input_term).
  const void* xw;
  void* h_ak;
};

// Columns per head of the d xa array (dgf): Dx, or none with the input term hoisted (its sweep
// has no d xa). The Dx argument of rim_seq_bwd_smem_elems and RimSeqBwdSmem, which use it for that
// array alone.
RIMS_HD int64_t rim_seq_bwd_dgf_width(const RimSeqDims& d) { return d.xw_hoisted ? 0 : d.Dx; }

// Elements of a staged array, rounded up to 4 so that the next one starts 16-byte aligned (the
// block copies move 16 bytes per access where source and destination allow).
RIMS_HD int64_t rim_seq_bwd_pad4(int64_t n) { return (n + 3) / 4 * 4; }

// Parts of the two long CUDA-core products of the backward's step, each summed by its own items
// and added by the next phase: dh~ through Q|K|V in three (d Q, d K, d V rows), dh_{t-1} in four
// (weight_hh's rows in three equal runs, then input_query's). Fixed, not chosen by the block's
// size, so that every block size gives the same bits.
constexpr int kQkvParts = 3, kDhParts = 4;

RIMS_HD int64_t rim_seq_bwd_smem_elems(int64_t S, int64_t M, int64_t K, int64_t H, int64_t GH,
                                       int64_t n_in, int64_t nk, int64_t Dx, int64_t n_c,
                                       int64_t ck, int64_t cv, bool lstm, bool mma) {
  const int64_t GW = lstm ? GH : 2 * GH;
  return rim_seq_bwd_pad4(S * K * (2 * ck + cv)) + rim_seq_bwd_pad4(S * K * n_c * K) +
         S * K * (H * (4 + (mma ? 0 : kDhParts - 1))  // dh, dc, dh~, dh_{t-1} (direct part,
                                                       // then the sum), the split products'
                                                       // partial sums (CUDA cores only)
                  + cv + n_c * K + (2 * ck + cv) + GW + n_in * Dx + nk + n_in * M + 1
                  + (mma ? 0 : nk + n_in * M))  // the staged saved queries and probabilities
         + (mma ? 0 : S * M * nk);               // and the step's keys (CUDA cores only)
}

// The tile's arrays. Staged per step from the forward's saved activations (block copies, so that
// the communication backward's per-item chains read shared memory, not global): qkv, the
// tile's Q|K|V rows (S, K, C3), and bp, its communication probabilities (S, K, n_c, K); first,
// each padded to 4 elements, so that both start 16-byte aligned. act: the step's masks (0 / 1).
template <typename C>
struct RimSeqBwdSmem {
  C *qkv, *bp, *dh, *dc, *dht, *dhp, *dout, *dsc, *dqkv, *dg, *dgf, *dq, *dsi, *act;
  // The split products' partial sums after the first (kDhParts - 1 of them; dh~ uses two),
  // read by the phase after each.
  C* part[kDhParts - 1];
  // CUDA cores only: the step's saved input queries (S, K, nk) and undropped input probabilities
  // (S, K, n_in * M) and its keys (S, M, nk), staged with qkv and bp by the d o phase's idle
  // threads for the input attention's backward phases.
  C *sq, *sa, *skx;
  RIMS_HD RimSeqBwdSmem(C* base, int64_t S, int64_t M, int64_t K, int64_t H, int64_t GH,
                        int64_t n_in, int64_t nk, int64_t Dx, int64_t n_c, int64_t ck, int64_t cv,
                        bool lstm, bool mma) {
    const int64_t R = S * K, GW = lstm ? GH : 2 * GH;
    C* cur = base;
    auto take = [&](int64_t n) { C* r = cur; cur += n; return r; };
    qkv = take(rim_seq_bwd_pad4(R * (2 * ck + cv)));
    bp = take(rim_seq_bwd_pad4(R * n_c * K));
    dh = take(R * H);
    dc = take(R * H);
    dht = take(R * H);
    dhp = take(R * H);
    dout = take(R * cv);
    dsc = take(R * n_c * K);
    dqkv = take(R * (2 * ck + cv));
    dg = take(R * GW);
    dgf = take(R * n_in * Dx);
    dq = take(R * nk);
    dsi = take(R * n_in * M);
    act = take(R);
    for (C*& a : part) a = take(mma ? 0 : R * H);  // the tensor-core products are not split
    sq = take(mma ? 0 : R * nk);
    sa = take(mma ? 0 : R * n_in * M);
    skx = take(mma ? 0 : S * M * nk);
  }
};

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// SMAX: the largest tile the per-sample accumulators of the weight-stationary phases hold.
// MMA: the four weight products of a step (d o, dh~ through Q|K|V, d xa, dh_{t-1} through the
// gates and queries) on tensor cores, as the forward's (mma_rows.cuh: gradient rows rounded to
// the storage type, epilogues fused; the scratch first in shared memory); the rest unchanged.
template <int SMAX, typename C, bool MMA = false, typename T, class Exec>
RIMS_HD void rim_seq_bwd_tile(const Exec& ex, const RimSeqBwdParams<T>& p, int64_t tile, C* smem) {
  // Tile-local sizes and item indices are 32-bit (a tile's S*K*width and a mechanism's weight
  // block stay far below 2^31; 64-bit division costs many instructions on a GPU); offsets into
  // (T, B, ...) tensors are 64-bit (every such expression starts from t, B or b0).
  const int64_t B = p.B;
  const int M = int(p.M), K = int(p.K), H = int(p.H), GH = int(p.GH), n_in = int(p.n_in);
  const int dk = int(p.dk), nk = int(p.nk), Dx = int(p.Dx), n_c = int(p.n_c), dc = int(p.dc);
  const int dcv = int(p.dcv), ck = int(p.ck), cv = int(p.cv);
  const int xrow = int(p.xrow), xhead = int(p.xhead);
  const int C3 = 2 * ck + cv, GW = p.lstm ? GH : 2 * GH, XW = n_in * Dx;
  const int64_t b0 = tile * p.S;
  const int S = int((B - b0) < p.S ? (B - b0) : p.S);
  // The CUDA-core products' items: NC adjacent columns each (column_dot.cuh); groups per
  // mechanism of d o (cv columns), of dh~ and dh_{t-1} (H) and per input head of d xa (Dx).
  constexpr int NC = kColumnsOf<C>;
  const int g_cv = column_groups(cv, NC), g_h = column_groups(H, NC);
  const int g_dx = column_groups(Dx, NC);
  const int KH = K * H;
  const C* keys = static_cast<const C*>(p.keys);
  const C* xsrc = static_cast<const C*>(p.xsrc);
  const C* wx_t = static_cast<const C*>(p.w_x_t);
  // The hoisted input term, or nullptr; never with MMA (seq_use_xw), so that the tensor-core
  // instantiations drop its phases at compile time (they sit at the register limit).
  const C* xwp = MMA ? nullptr : static_cast<const C*>(p.xw);
  const int NM = n_in * M;
  const C* g_out = static_cast<const C*>(p.g_out);
  const C scale_in = C(1) / sqrt(C(dk));
  const C scale_c = C(1) / sqrt(C(dc));
  const C keep_in = C(1.0 - p.p_in), keep_c = C(1.0 - p.p_c);
  const float drop_in = static_cast<float>(p.p_in), drop_c = static_cast<float>(p.p_c);
  const int64_t mma_el = MMA ? mma_smem_elems(K, p.S, p.ba, sizeof(T), sizeof(C)) : 0;
  const MmaSmem<C, T> ms(smem);  // used only when MMA
  RimSeqBwdSmem<C> sm(smem + mma_el, p.S, M, K, H, GH, n_in, nk, rim_seq_bwd_dgf_width(p), n_c,
                      ck, cv, p.lstm, MMA);
  const int S_l = int(p.S), bh = int(p.bh), bq = int(p.bq), bg = int(p.bg), bk = int(p.bk);
  const int bo = int(p.bo), bh2 = int(p.bh2), bx = int(p.bx);
  static_assert(!MMA || SMAX <= kMmaM, "the tensor-core tile has 8 rows");
  if constexpr (MMA) mma_clear(ex, ms, K, S_l, int(p.ba));
  // Row r = s*K + k of the tile at step t in a (T, B, K, width) tensor.
  auto at = [&](const void* base, int64_t t, int64_t r, int64_t width) {
    return static_cast<const C*>(base) + ((t * B + b0) * K + r) * width;
  };
  auto hist = [&](void* base, int64_t t, int64_t r, int64_t width) {
    return static_cast<C*>(base) + ((t * B + b0) * K + r) * width;
  };
  // Row r's mask at the step being swept (staged in sm.act by the previous phase that ends a step).
  auto active = [&](int64_t r) { return sm.act[r] != C(0); };
  auto stage_masks = [&](int64_t t, int i) {
    sm.act[i] = p.masks[(t * B + b0) * K + i] ? C(1) : C(0);
  };
  // Dropout keep-decisions, the forward's stream.
  auto keep_a = [&](int64_t t, int64_t r, int64_t n, int64_t m) {
    const uint64_t idx = static_cast<uint64_t>(((((t * B + b0) * K + r) * n_in + n) * M + m));
    return drop_in > 0.f ? (dropout_keep(p.seed, 0, idx, drop_in) ? C(1) / keep_in : C(0)) : C(1);
  };
  auto keep_b = [&](int64_t t, int64_t r, int64_t n, int64_t j) {
    const uint64_t idx = static_cast<uint64_t>(((((t * B + b0) * K + r) * n_c + n) * K + j));
    return drop_c > 0.f ? (dropout_keep(p.seed, 1, idx, drop_c) ? C(1) / keep_c : C(0)) : C(1);
  };
  // The forward's read xa[n, d] = sum_m a~_m x_{m,n}[d] of row r (sample s) at step t, recomputed
  // from the saved probabilities (the step's, a_t below; zero on inactive rows); xt: the step's
  // input term source.
  auto xa_of = [&](int64_t t, const C* a_t, const C* xt, int s, int r, int n, int d) {
    C xacc = C(0);
    if (!active(r)) return xacc;
    const C* a = a_t + r * NM + n * M;
    for (int64_t m = 0; m < M; ++m)
      xacc += a[m] * keep_a(t, r, n, m) * xt[(s * M + m) * xrow + n * xhead + d];
    return xacc;
  };

  const int64_t T_ = p.T_;
  ex.parallel_for(S * KH + S * K, [&](int i) {
    if (i >= S * KH) return stage_masks(T_ - 1, i - S * KH);
    C v = p.g_hn != nullptr ? static_cast<const C*>(p.g_hn)[b0 * KH + i] : C(0);
    if (g_out != nullptr) v += g_out[((T_ - 1) * B + b0) * KH + i];
    sm.dh[i] = v;
    sm.dc[i] = p.lstm && p.g_cn != nullptr ? static_cast<const C*>(p.g_cn)[b0 * KH + i] : C(0);
  });

  for (int64_t t = T_ - 1; t >= 0; --t) {
    ex.step();
    const C* kt = keys + (t * B + b0) * M * nk;
    const C* xt = xsrc + (t * B + b0) * M * xrow;
    // The step's saved input queries and probabilities (row r at r * nk, r * NM) and keys: staged
    // in shared memory on CUDA cores (d o below), read from global memory on tensor cores.
    const C* q_t = MMA ? at(p.sv_q, t, 0, nk) : sm.sq;
    const C* a_t = MMA ? at(p.sv_a, t, 0, NM) : sm.sa;
    const C* k_t = MMA ? kt : sm.skx;
    // 5 backward. d o = dh' comm_output[k]^T on active rows (weight-stationary: item (k, e),
    // all the tile's samples); dh' kept for d comm_output.
    if constexpr (MMA) {
      mma_pack<C>(ex, K, S, S_l, bh, ms.aop, [&](int s, int k, int j) {
        return j < H && active(s * K + k) ? sm.dh[(s * K + k) * H + j] : C(0);
      });
      mma_rows(ex, ms, K, S, S_l, p.wb_out, bh, bo, cv, [&](int s, int k, int e, C v) {
        sm.dout[(s * K + k) * cv + e] = v;  // zero on inactive rows (their operand rows are)
      });
    }
    // The mechanisms some sample runs at step t (its masks, staged at the end of step t + 1): the
    // weight products whose rows are zero elsewhere order their items these first and read no
    // weights for the others (rim_seq_fwd.cuh). Computed where each such phase starts, so that
    // it is live in that phase only (the 512-thread kernel sits at its register limit).
    // Items past d o's (threads it leaves idle: paper layer 192 items on 512) stage what the
    // phases after it read many times, kStageRun elements an item (stage_run): the step's saved
    // Q|K|V and communication probabilities (one item per (row, head) reading them from global
    // memory was a chain of ~K (dcv + dc) dependent L2 round trips; a block copy of its own, as
    // before, took ~3 300 cycles a step in the 27b phase clocks), and its saved input queries,
    // input probabilities and keys (the input attention's backward waited on ~7 400 cycles of
    // dependent L2 round trips for them); these loads then wait under d o's chain of weight
    // loads. Then dh' for d comm_output, one element an item (a phase of its own before).
    const int n_do = K * g_cv, n_sq = S * K * nk, n_sa = S * K * NM, n_kx = S * M * nk;
    const int n_qkv = S * K * C3, n_bp = S * K * n_c * K;
    const int u_sq = stage_runs(n_sq), u_sa = stage_runs(n_sa), u_kx = stage_runs(n_kx);
    const int u_qkv = stage_runs(n_qkv), n_stage = u_sq + u_sa + u_kx + u_qkv + stage_runs(n_bp);
    const RunMechs run_o = run_mechs(sm.act, S, K, K);
    if constexpr (!MMA) ex.parallel_for(n_do + n_stage + S * KH, [&](int i) {
      if (i >= n_do + n_stage) {
        const int x = i - n_do - n_stage;
        hist(p.h_dhp, t, x / H, H)[x % H] = active(x / H) ? sm.dh[x] : C(0);
        return;
      }
      if (i >= n_do) {
        int x = i - n_do;
        if (x < u_sq) return stage_run(sm.sq, at(p.sv_q, t, 0, nk), n_sq, x);
        x -= u_sq;
        if (x < u_sa) return stage_run(sm.sa, at(p.sv_a, t, 0, NM), n_sa, x);
        x -= u_sa;
        if (x < u_kx) return stage_run(sm.skx, kt, n_kx, x);
        x -= u_kx;
        if (x < u_qkv) return stage_run(sm.qkv, at(p.sv_qkv, t, 0, C3), n_qkv, x);
        return stage_run(sm.bp, at(p.sv_bp, t, 0, n_c * K), n_bp, x - u_qkv);
      }
      const ColumnGroup cg = column_group<NC>(i, g_cv, cv);
      const RunMechs& run = run_o;
      const int k = run.ordered(cg.outer), e0 = cg.c0, nc = cg.nc;
      C acc[NC][SMAX];
      columns_fill(acc, C(0));
      if (cg.outer < run.count) columns_dot(acc, S, H, p.c_output_t + int64_t(k) * H * cv + e0, cv, nc,
                  [&](int s, int64_t j) { return sm.dh[(s * K + k) * H + j]; }, EveryRow{});
      RIMS_UNROLL
      for (int s = 0; s < SMAX; ++s) {
        if (s >= S) break;
        const bool on = active(s * K + k);
        RIMS_UNROLL
        for (int c = 0; c < NC; ++c) {
          if (c >= nc) break;
          sm.dout[(s * K + k) * cv + e0 + c] = on ? acc[c][s] : C(0);
        }
      }
    });
    if constexpr (MMA) {
      ex.parallel_for(S * KH, [&](int i) {
        hist(p.h_dhp, t, i / H, H)[i % H] = active(i / H) ? sm.dh[i] : C(0);
      });
      // 4 backward: the staging above, as block copies.
      ex.copy(sm.qkv, at(p.sv_qkv, t, 0, C3), int64_t(S) * K * C3,  // row (s, j) at (s*K + j)*C3
              sm.bp, at(p.sv_bp, t, 0, n_c * K), int64_t(S) * K * n_c * K);
    }
    // Parts 1 and 2, one warp per (row, head) of an active mechanism: d b~_j = d o . v_j through
    // the dropout, the lanes splitting each dcv-long dot over consecutive elements (one thread per
    // (row, head, j) waited on dcv dependent loads, every row's d o and every key's v of a head
    // at one bank: ~4 300 cycles a step in the 27b phase clocks, and 2 100 more for the softmax
    // in its own phase); then through the softmax to the scaled d scores with the lanes
    // splitting j (softmax_bwd's loops; on the host one lane: exactly them). Zero on inactive
    // rows.
    ex.warp_for(S * K * n_c, [&](int i, int, int lane, int lanes) {
      const int r = i / n_c, n = i % n_c, s = r / K;
      C* ds = sm.dsc + (r * n_c + n) * K;
      if (!active(r)) {
        for (int j = lane; j < K; j += lanes) ds[j] = C(0);
        return;
      }
      const C* don = sm.dout + r * cv + n * dcv;
      for (int j = 0; j < K; ++j) {
        const C dot = warp_dot(don, sm.qkv + (s * K + j) * C3 + 2 * ck + n * dcv, dcv, lane, lanes);
        if (lane == 0) ds[j] = dot * keep_b(t, r, n, j);
      }
      ex.syncwarp();  // lane 0's d b~, read by every lane
      const C* y = sm.bp + (r * n_c + n) * K;
      C dot = C(0);
      for (int j = lane; j < K; j += lanes) dot += y[j] * ds[j];
      dot = warp_sum(dot);
      for (int j = lane; j < K; j += lanes) {
        ds[j] = y[j] * (ds[j] - dot);
        ds[j] *= scale_c;
      }
    });
    // Part 3, per (row, column of Q|K|V): dQ of the row's own queries (zero on inactive rows),
    // dK_j and dV_j of mechanism j summed over the querying mechanisms k; kept and saved.
    ex.parallel_for(S * K * C3, [&](int i) {
      const int r = i / C3, col = i % C3, s = r / K, j = r % K;
      C acc = C(0);
      if (col < ck) {  // d query[n, e] = sum_j d score[n, j] k_j[n, e]
        const int n = col / dc;
        if (active(r))
          for (int jj = 0; jj < K; ++jj)
            acc += sm.dsc[(r * n_c + n) * K + jj] * sm.qkv[(s * K + jj) * C3 + ck + col];
      } else if (col < 2 * ck) {  // d key_j[n, e] = sum_k d score[k, n, j] q_k[n, e]
        const int c1 = col - ck, n = c1 / dc;
        for (int k = 0; k < K; ++k)
          acc += sm.dsc[((s * K + k) * n_c + n) * K + j] * sm.qkv[(s * K + k) * C3 + c1];
      } else {         // d value_j[n, e] = sum_k b~[k, n, j] d o_k[n, e]
        const int c2 = col - 2 * ck, n = c2 / dcv;
        for (int k = 0; k < K; ++k) {
          const int rk = s * K + k;
          if (!active(rk)) continue;
          const C b = sm.bp[(rk * n_c + n) * K + j] * keep_b(t, rk, n, j);
          acc += b * sm.dout[rk * cv + c2];
        }
      }
      sm.dqkv[r * C3 + col] = acc;
      hist(p.h_dqkv, t, r, C3)[col] = acc;
    });
    // dh~ = dh' (residual and copy alike) + d(Q|K|V) [comm_query|comm_key|comm_value]^T, the
    // K|V part cut for inactive mechanisms under block_inactive_grad.
    if constexpr (MMA) {
      mma_pack<C>(ex, K, S, S_l, bq, ms.aop, [&](int s, int k, int c) {
        const int r = s * K + k;
        const bool kv = active(r) || !p.block_inactive_grad;
        return c < ck || (c < C3 && kv) ? sm.dqkv[r * C3 + c] : C(0);
      });
      mma_rows(ex, ms, K, S, S_l, p.wb_qkv, bq, bh2, H, [&](int s, int k, int j, C v) {
        const int i = (s * K + k) * H + j;
        sm.dht[i] = sm.dh[i] + v;
      });
    }
    // Split in three (kQkvParts): item (k, part, NC columns) sums the rows of d Q, of d K or of
    // d V alone, into sm.dht, part[0] or part[1]; the cell phase adds dh' and the three. One item
    // summing all 2ck + cv rows was a chain of (2ck + cv) / 16 dependent L2 round trips on K * H / 4
    // threads (paper layer: 24 on 150 of 512; 29% of the backward's step, benchmarks/README.md).
    // A mechanism no sample runs reads no weights for its d Q rows (zero), nor under
    // block_inactive_grad for its d K | d V rows (cut).
    const RunMechs run_qkv = run_mechs(sm.act, S, K, K);
    if constexpr (!MMA) ex.parallel_for(K * kQkvParts * g_h, [&](int i) {
      // Few values live across the product: the 512-thread kernel sits at its register limit.
      const int q = i / (kQkvParts * g_h), part = (i / g_h) % kQkvParts;
      const int j0 = (i % g_h) * NC, nc = min_int(NC, H - j0);
      const int k = run_qkv.ordered(q), lo = part == 0 ? 0 : part == 1 ? ck : 2 * ck;
      C acc[NC][SMAX];
      columns_fill(acc, C(0));
      // A mechanism no sample runs: its d Q rows are zero, and under block_inactive_grad its
      // d K | d V rows are cut too; nothing to read.
      if (q < run_qkv.count || (part > 0 && !p.block_inactive_grad)) {
        bool use[SMAX];  // d Q rows: zero on inactive rows, read as they are
        RIMS_UNROLL
        for (int s = 0; s < SMAX; ++s)
          use[s] = s < S && (part == 0 || active(s * K + k) || !p.block_inactive_grad);
        const C* rows = sm.dqkv + k * C3 + lo;
        columns_dot(acc, S, part == 2 ? cv : ck, p.c_qkv_t + (int64_t(k) * C3 + lo) * H + j0, H,
                    nc, [&](int s, int64_t c) { return rows[s * K * C3 + c]; },
                    [&](int s, int64_t) { return use[s]; });
      }
      C* dst = (part == 0 ? sm.dht : part == 1 ? sm.part[0] : sm.part[1]) + k * H + j0;
      RIMS_UNROLL
      for (int s = 0; s < SMAX; ++s) {
        if (s >= S) break;
        RIMS_UNROLL
        for (int c = 0; c < NC; ++c) {
          if (c >= nc) break;
          dst[s * KH + c] = acc[c][s];
        }
      }
    });
    // 3 backward: the masked cell. Inactive rows pass dh~ and dc through unchanged.
    ex.parallel_for(S * KH, [&](int i) {
      const int r = i / H, j = i % H;
      C* dg = sm.dg + r * GW;
      // dh~ = dh' + the split product's parts (the tensor-core epilogue summed it already).
      const C dht = MMA ? sm.dht[i] : sm.dh[i] + ((sm.dht[i] + sm.part[0][i]) + sm.part[1][i]);
      if (!active(r)) {
        sm.dhp[i] = dht;  // direct part of dh_{t-1}
        for (int64_t q = 0; q < GW / H; ++q) dg[q * H + j] = C(0);
        return;
      }
      const C* g = at(p.sv_g, t, r, GW);
      if (p.lstm) {
        const C cprev = at(p.sv_c, t, r, H)[j];
        lstm_pointwise_bwd(dht, sm.dc[i], g[j], g[H + j], g[2 * H + j], g[3 * H + j],
                           cprev, dg[j], dg[H + j], dg[2 * H + j], dg[3 * H + j], sm.dc[i]);
        sm.dhp[i] = C(0);
      } else {
        const C hprev = at(p.sv_h, t, r, H)[j];
        const C* gh = g + GH;
        C* dgh = dg + GH;
        gru_pointwise_bwd(dht, g[j], g[H + j], g[2 * H + j], gh[j], gh[H + j],
                          gh[2 * H + j], hprev, dg[j], dg[H + j], dg[2 * H + j], dgh[j],
                          dgh[H + j], dgh[2 * H + j], sm.dhp[i]);
      }
    });
    ex.parallel_for(S * K * GW, [&](int i) { hist(p.h_dg, t, i / GW, GW)[i % GW] = sm.dg[i]; });
    // Input term backward: d xa_n = d gi F[k, n]^T (weight-stationary: item (k, n, d)) and
    // xa_n itself (for d F), active rows; d gi: LSTM all of d gates, GRU its first half.
    if constexpr (MMA) {
      mma_pack<C>(ex, K, S, S_l, bg, ms.aop, [&](int s, int k, int g) {
        const int r = s * K + k;
        return g < GH && active(r) ? sm.dg[r * GW + g] : C(0);
      });
      mma_rows(ex, ms, K, S, S_l, p.wb_x, bg, bx, XW, [&](int s, int k, int col, C v) {
        const int r = s * K + k, n = col / Dx, d = col % Dx;
        sm.dgf[r * XW + col] = active(r) ? v : C(0);
        hist(p.h_xa, t, r, XW)[col] = xa_of(t, a_t, xt, s, r, n, d);
      });
    }
    // Hoisted input term: d a~_{n,m} = d gi . x_m F[k, n] (before the dropout's scale, as the
    // F path's d xa . x_m), one warp per (row, head, element), into sm.dsi; a~ keep -> h_ak.
    if (xwp != nullptr) ex.warp_for(S * K * NM, [&](int i, int, int lane, int lanes) {
      const int r = i / NM, j = i % NM, s = r / K, k = r % K, n = j / M, m = j % M;
      const bool on = active(r);
      C dot = C(0);
      if (on) {
        const C* dgi = sm.dg + r * GW;
        const C* xr = xwp + ((((t * B + b0 + s) * M + m) * K + k) * n_in + n) * GH;
        C a0 = C(0), a1 = C(0), a2 = C(0), a3 = C(0);  // four loads in flight per lane
        int g = lane;
        for (; g + 3 * lanes < GH; g += 4 * lanes) {
          a0 += dgi[g] * xr[g];
          a1 += dgi[g + lanes] * xr[g + lanes];
          a2 += dgi[g + 2 * lanes] * xr[g + 2 * lanes];
          a3 += dgi[g + 3 * lanes] * xr[g + 3 * lanes];
        }
        for (; g < GH; g += lanes) a0 += dgi[g] * xr[g];
        dot = warp_sum((a0 + a1) + (a2 + a3));
      }
      if (lane == 0) {
        sm.dsi[r * NM + j] = dot;
        hist(p.h_ak, t, r, NM)[j] = on ? a_t[r * NM + j] * keep_a(t, r, n, m) : C(0);
      }
    });
    // Groups of NC columns within one input head n.
    if constexpr (!MMA) if (xwp == nullptr) ex.parallel_for(K * n_in * g_dx, [&](int i) {
      const ColumnGroup cg = column_group<NC>(i, g_dx, Dx);  // outer = k * n_in + n
      const int k = cg.outer / n_in, n = cg.outer % n_in, d0 = cg.c0, nc = cg.nc;
      C acc[NC][SMAX];
      columns_fill(acc, C(0));
      columns_dot(acc, S, GH, wx_t + (int64_t(k) * n_in + n) * GH * Dx + d0, Dx, nc,
                  [&](int s, int64_t g) { return sm.dg[(s * K + k) * GW + g]; }, EveryRow{});
      RIMS_UNROLL
      for (int s = 0; s < SMAX; ++s) {
        if (s >= S) break;
        const int r = s * K + k;
        const bool on = active(r);
        RIMS_UNROLL
        for (int c = 0; c < NC; ++c) {
          if (c >= nc) break;
          const int d = d0 + c, col = n * Dx + d;
          sm.dgf[r * XW + col] = on ? acc[c][s] : C(0);
          hist(p.h_xa, t, r, XW)[col] = xa_of(t, a_t, xt, s, r, n, d);
        }
      }
    });
    // 1 backward: d a~_m = d xa_n . x_{m,n}, through the dropout and the null softmax, per (row,
    // head); then dq per (row, column) below.
    ex.parallel_for(S * K * n_in, [&](int i) {
      const int r = i / n_in, n = i % n_in, s = r / K;
      C* ds = sm.dsi + (r * n_in + n) * M;
      if (!active(r)) {
        for (int64_t m = 0; m < M; ++m) ds[m] = C(0);
        return;
      }
      for (int64_t m = 0; m < M; ++m) {
        C dot = C(0);
        if (xwp != nullptr) {
          dot = ds[m];  // the hoisted term's phase above
        } else {
          const C* dxa = sm.dgf + r * XW + n * Dx;
          const C* xm = xt + (s * M + m) * xrow + n * xhead;
          for (int64_t d = 0; d < Dx; ++d) dot += dxa[d] * xm[d];
        }
        ds[m] = dot * keep_a(t, r, n, m);
      }
      softmax_bwd(a_t + r * NM + n * M, ds, M, ds);
      for (int64_t m = 0; m < M; ++m) ds[m] *= scale_in;
    });
    // dq[n, e] = sum_m d score_m k_m[n, e] (zero on inactive rows), kept and saved.
    ex.parallel_for(S * K * nk, [&](int i) {
      const int r = i / nk, e = i % nk, n = e / dk, s = r / K;
      C acc = C(0);
      if (active(r)) {
        const C* ds = sm.dsi + (r * n_in + n) * M;
        for (int m = 0; m < M; ++m) acc += ds[m] * k_t[(s * M + m) * nk + e];
      }
      sm.dq[i] = acc;
      hist(p.h_dq, t, r, nk)[e] = acc;
    });
    // This step's input gradients: d keys (sum over mechanisms of d score q) and d x (sum over
    // mechanisms of a~ d xa; folded: all heads add to the same x_m).
    ex.parallel_for(S * M * nk, [&](int i) {
      const int s = i / (M * nk), m = (i / nk) % M, e = i % nk, n = e / dk;
      C acc = C(0);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = s * K + k;
        acc += sm.dsi[(r * n_in + n) * M + m] * q_t[r * nk + e];
      }
      static_cast<C*>(p.d_keys)[((t * B + b0) * M) * nk + i] = acc;
    });
    if (xwp == nullptr) ex.parallel_for(S * M * xrow, [&](int i) {  // hoisted: after the sweep
      const int s = i / (M * xrow), m = (i / xrow) % M, col = i % xrow;
      const int n_lo = xhead > 0 ? col / Dx : 0, n_hi = xhead > 0 ? n_lo + 1 : n_in;
      const int d = xhead > 0 ? col % Dx : col;
      C acc = C(0);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = s * K + k;
        if (!active(r)) continue;
        for (int64_t n = n_lo; n < n_hi; ++n)
          acc += a_t[r * NM + n * M + m] * keep_a(t, r, n, m) *
                 sm.dgf[r * XW + n * Dx + d];
      }
      static_cast<C*>(p.d_xsrc)[((t * B + b0) * M) * xrow + i] = acc;
    });
    // dh_{t-1} = direct + d gh weight_hh[k]^T (active) + dq input_query[k]^T (+ d out[t-1]),
    // weight-stationary: item (k, j). dq is zero on inactive rows, d gh is not read there.
    if constexpr (MMA) {
      const int off = p.lstm ? 0 : GH;
      mma_pack<C>(ex, K, S, S_l, bg + bk, ms.aop, [&](int s, int k, int c) {
        const int r = s * K + k;
        if (!active(r)) return C(0);
        if (c < bg) return c < GH ? sm.dg[r * GW + off + c] : C(0);
        return c - bg < nk ? sm.dq[r * nk + (c - bg)] : C(0);
      });
      mma_rows(ex, ms, K, S, S_l, p.wb_h, bg + bk, bh2, H, [&](int s, int k, int j, C v) {
        const int i = (s * K + k) * H + j;
        C d = sm.dhp[i] + v;
        if (t > 0 && g_out != nullptr) d += g_out[((t - 1) * B + b0 + s) * KH + k * H + j];
        sm.dhp[i] = d;
      });
    }
    // Split in kDhParts parts as dh~ above (paper layer: 134, 133, 133 rows of weight_hh and 64 of
    // input_query, 9 batches instead of one chain of 29): part 0 adds its rows to the direct part
    // in sm.dhp, the others sum theirs into part[]; the next phase adds them (and d out[t-1]).
    // Items (k, part, NC columns), the mechanisms some sample runs first; the others' rows are
    // zero (d gh not read, dq zero): no weights read, their parts zero.
    const RunMechs run_dh = run_mechs(sm.act, S, K, K);
    static_assert(kDhParts == 4, "dh_{t-1}'s destinations below name four parts");
    if constexpr (!MMA) ex.parallel_for(K * kDhParts * g_h, [&](int i) {
      const int q = i / (kDhParts * g_h), part = (i / g_h) % kDhParts;
      const int j0 = (i % g_h) * NC, nc = min_int(NC, H - j0);
      const int k = run_dh.ordered(q);
      C acc[NC][SMAX];
      RIMS_UNROLL
      for (int s = 0; s < SMAX; ++s) {
        RIMS_UNROLL
        for (int c = 0; c < NC; ++c)
          acc[c][s] = part == 0 && s < S && c < nc ? sm.dhp[(s * K + k) * H + j0 + c] : C(0);
      }
      if (q < run_dh.count) {
        bool on[SMAX];
        RIMS_UNROLL
        for (int s = 0; s < SMAX; ++s) on[s] = s < S && active(s * K + k);
        // Parts 0 .. kDhParts - 2: weight_hh's rows in equal runs (d gh: GRU's second half of
        // d gates); the last: input_query's (dq).
        const auto on_row = [&](int s, int64_t) { return on[s]; };
        if (part < kDhParts - 1) {
          const int len = (GH + kDhParts - 2) / (kDhParts - 1), lo = min_int(GH, part * len);
          const C* dg = sm.dg + k * GW + (p.lstm ? 0 : GH) + lo;
          columns_dot(acc, S, min_int(GH, lo + len) - lo,
                      p.w_hh_t + (int64_t(k) * GH + lo) * H + j0, H, nc,
                      [&](int s, int64_t g) { return dg[s * K * GW + g]; }, on_row);
        } else {
          const C* dq = sm.dq + k * nk;
          columns_dot(acc, S, nk, p.w_query_t + int64_t(k) * nk * H + j0, H, nc,
                      [&](int s, int64_t e) { return dq[s * K * nk + e]; }, on_row);
        }
      }
      C* dst = (part == 0   ? sm.dhp
                : part == 1 ? sm.part[0]
                : part == 2 ? sm.part[1]
                            : sm.part[2]) + k * H + j0;
      RIMS_UNROLL
      for (int s = 0; s < SMAX; ++s) {
        if (s >= S) break;
        RIMS_UNROLL
        for (int c = 0; c < NC; ++c) {
          if (c >= nc) break;
          dst[s * KH + c] = acc[c][s];
        }
      }
    });
    ex.parallel_for(S * KH + (t > 0 ? S * K : 0), [&](int i) {
      if (i >= S * KH) return stage_masks(t - 1, i - S * KH);
      if constexpr (MMA) {
        sm.dh[i] = sm.dhp[i];
      } else {
        C d = sm.dhp[i];
        RIMS_UNROLL
        for (int q = 0; q < kDhParts - 1; ++q) d += sm.part[q][i];
        if (t > 0 && g_out != nullptr) d += g_out[((t - 1) * B + b0) * KH + i];
        sm.dh[i] = d;
      }
    });
  }
  ex.steps_done();
  ex.parallel_for(S * KH, [&](int i) {
    static_cast<C*>(p.d_h0)[b0 * KH + i] = sm.dh[i];
    if (p.lstm) static_cast<C*>(p.d_c0)[b0 * KH + i] = sm.dc[i];
  });
}

}  // namespace rims
