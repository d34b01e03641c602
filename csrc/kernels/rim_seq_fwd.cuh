// Torch-free persistent whole-sequence RIM forward (SPEC.md steps 1-5 for all T steps, one call).
//
// One thread block owns a tile of S samples for the whole sequence: samples never interact, so a
// tile needs no grid-wide synchronisation, and its carried state (h, c in the compute type) lives
// in shared memory from step 0 to T-1. Each step is ten phases (CUDA cores; nine with the
// input term hoisted and no input dropout) separated by block barriers; each phase is a parallel
// loop over independent items (threads, or warps: warp_reduce.cuh), so the same code runs
//   - on the GPU (DeviceExec: items strided over the block's threads, __syncthreads after), and
//   - on the host (HostExec, host_exec.h: items one by one, in a selectable order), which is how
//     CI checks this kernel's arithmetic against the reference without a GPU (and its phases for
//     races: tests/test_host_item_order.py; rims_fast::rim_seq_fwd's CPU implementation).
// Weight-stationary phases (gates, communication projections, output) give each item one
// (mechanism, column) pair and loop over the tile's samples inside, so every weight element is
// read once per tile and step (from L2 once the first tile touched it).
//
// Input term: as the C++ driver (csrc/rim_cpu.cpp), head n of mechanism k reads xa_n =
// sum_m a~_{k,n,m} x_{m,n} and multiplies F[k, n] (Dx, G*H): folded (x_{m,n} = x_m, F = the fold
// input_value_n weight_ih[k]_n) or pre-projected (x_{m,n} = v_{m,n}, F = weight_ih[k]_n).
// Dropout uses the driver's counter-based stream (same seed -> same keep-masks as backend="cpu").
//
// Numerics: every product accumulates in the compute type C (float, or double for float64);
// operands are the storage type T converted up (no rounding of activations to T, as the driver).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "column_dot.cuh"
#include "host_exec.h"
#include "masked_cell.cuh"
#include "mma_rows.cuh"
#include "rim_numerics.h"
#include "storage_types.cuh"
#include "warp_reduce.cuh"

namespace rims {

// Sizes and options of one call (SPEC names; Dx, xrow, xhead: the input term's source, above).
struct RimSeqDims {
  int64_t T_, B, M, K, H, GH, n_in, dk, nk, Dx, xrow, xhead, n_c, dc, dcv, ck, cv, top_k;
  int64_t S;              // samples per tile (<= the kernel's SMAX)
  bool lstm;
  // Tensor-core products (mma_rows.cuh; the forward's sizes here, the backward's in its params).
  // Operand widths (multiples of 16): mk of the gates ([xa | h]: XW padded to mxw, then H
  // padded), mh = H padded (Q|K|V), mv = cv padded (output); ma: the largest (the operand tile's
  // width). Product widths (multiples of 32): mn = GW, mq = 2ck + cv, mo = H, padded. Zero / false
  // on the CUDA-core path.
  bool mma;
  int64_t mk, mn, mxw, mh, mq, mv, mo, ma;
  // Thread-block cluster (the forward only): mechanisms per block of a tile's cluster, so a tile
  // is run by ceil(K / kpr) blocks; 0: one block per tile owns all K.
  int64_t kpr;
  // Cluster only: which of the block's own mechanisms' weights it copies into shared memory once
  // and reads from there every step (kRes* bits below; 0: all read from global memory / L2).
  int64_t resident;
  // The input term hoisted out of the recurrence (CUDA cores; the rows in RimSeqFwdParams::xw and
  // RimSeqBwdParams::xw): a step reads x_{m,n} F[k, n] of its own samples instead of F, which at
  // the paper layer was 40% of the weight bytes every tile read per step; the backward's sweep
  // reads no F either (rim_seq_bwd.cuh).
  bool xw_hoisted;
  double p_in, p_c;       // dropout probabilities (double: the keep scale 1/(1-p) as the driver's)
  uint64_t seed;
  // Debug timing of the device kernels' phases (kPhaseSlots counters; the CUDA launchers'
  // DeviceExec), nullptr: off. Host runs ignore it.
  unsigned long long* phase_clock;
};

// Counters of the phase timing per kernel: phases 0 .. kPhaseSlots - 2, then the steps timed.
constexpr int kPhaseSlots = 64;

template <typename T>
struct RimSeqFwdParams : RimSeqDims {
  // Inputs (contiguous). keys (T, B, M, nk) and xsrc (T, B, M, xrow) are in the compute type.
  const void* keys;
  const void* xsrc;
  const T* h0;            // (B, K, H)
  const T* c0;            // (B, K, H) or nullptr (GRU)
  const T* w_query;       // input_query (K, H, nk)
  const T* w_hh;          // (K, H, GH)
  const void* w_x;        // F (K, n_in, Dx, GH), compute type
  // With RimSeqDims::xw_hoisted: (T, B, M, K, n_in, GH), compute type, x_{m,n} F[k, n] (else
  // nullptr).
  const void* xw;
  const T* b_ih;          // (K, GH)
  const T* b_hh;          // (K, GH)
  // Tensor-core path only, zero-padded per mechanism, storage type: the gates' (mk, mn)
  // [F ; weight_hh] (GRU: F in columns 0..GH, weight_hh in GH..2GH, block-diagonal), (mh, mq)
  // [comm_query | comm_key | comm_value] and (mv, mo) comm_output, each stored transposed ((mn,
  // mk) ..., mma_rows.cuh).
  const T *w_mma, *w_mma_qkv, *w_mma_out;
  const T* c_query;       // (K, H, ck)
  const T* c_key;         // (K, H, ck)
  const T* c_value;       // (K, H, cv)
  const T* c_output;      // (K, cv, H)
  // Outputs.
  T* out;                 // (T, B, K*H)
  T* h_n;                 // (B, K, H)
  T* c_n;                 // (B, K, H) or nullptr (GRU)
  bool* masks;            // (T, B, K)
  // Saved for the backward (compute type; all null when nothing is saved): h_{t-1} and c_{t-1}
  // of every step, h~, the input queries, the undropped input probabilities, the gate
  // pre-activations, communication Q|K|V, the undropped communication probabilities and the
  // dropped read o (the gates, the communication queries, probabilities and read zero on
  // inactive rows: no one reads them there).
  void *sv_h, *sv_c, *sv_ht, *sv_q, *sv_a, *sv_g, *sv_qkv, *sv_bp, *sv_o;
};

// Rows of a tile's shared-memory arrays. Every block keeps its own mechanisms' rows (S, kst, .),
// kst = K without a cluster, kpr with one (the same in every block of a cluster, so that an array
// sits at the same offset in each); the two arrays other blocks push into, p and the
// communication K|V, hold all rows (S, K, .).
RIMS_HD int64_t rim_seq_own_stride(const RimSeqDims& d) { return d.kpr > 0 ? d.kpr : d.K; }

// Compute-type elements of a tile's arrays for S samples (the tensor-core scratch, mma_smem_elems,
// comes before them, resident weights after: rim_seq_fwd_smem_bytes). The tensor-core path runs
// the cell in the gate product's epilogue and keeps no gate array.
RIMS_HD int64_t rim_seq_smem_elems(const RimSeqDims& d, int64_t S) {
  const int64_t GW = d.mma ? 0 : d.lstm ? d.GH : 2 * d.GH;
  const int64_t own = d.H * (d.lstm ? 3 : 2)                    // h, (c), h~
                      + d.nk + d.n_in * d.M + 1                  // q, a, active
                      + (d.xw_hoisted ? 0 : d.n_in * d.Dx)  // xa (none when hoisted)
                      + GW + d.ck + d.n_c * d.K + d.cv;  // g, Q, b, o
  const int64_t all = 1 + d.ck + d.cv;                           // p, K | V
  return S * (rim_seq_own_stride(d) * own + d.K * all + d.M * d.nk);  // + the step's keys
}

// The tile's shared-memory arrays, carved from one buffer: own rows (S, kst, .) except p and kv
// (S, K, .); cq | kv is the communication Q | K | V of a row; kx: the step's keys of the tile's
// samples (S, M, nk), staged so that the scores read no global memory.
template <typename C>
struct RimSeqSmem {
  C *h, *c, *ht, *q, *a, *p, *act, *xa, *g, *cq, *kv, *bp, *o, *kx;
  RIMS_HD RimSeqSmem(C* base, const RimSeqDims& d, int64_t S) {
    const int64_t R = S * rim_seq_own_stride(d), RA = S * d.K;
    const int64_t GW = d.lstm ? d.GH : 2 * d.GH;
    C* cur = base;
    auto take = [&](int64_t n) { C* r = cur; cur += n; return r; };
    p = take(RA);
    kv = take(RA * (d.ck + d.cv));
    h = take(R * d.H);
    c = d.lstm ? take(R * d.H) : nullptr;
    ht = take(R * d.H);
    q = take(R * d.nk);
    a = take(R * d.n_in * d.M);
    act = take(R);
    xa = take(d.xw_hoisted ? 0 : R * d.n_in * d.Dx);  // unread with the input term hoisted
    g = d.mma ? nullptr : take(R * GW);
    cq = take(R * d.ck);
    bp = take(R * d.n_c * d.K);
    o = take(R * d.cv);
    kx = take(S * d.M * d.nk);
  }
};

// Weights a cluster block can keep in shared memory (RimSeqDims::resident bits), each for its own
// kpr mechanisms: every byte kept there is a byte a step no longer reads from L2, whichever
// weight it is (each is read once per step and tile), so the launcher fills the room left by the
// tile's arrays largest first (rim_seq_resident_fit).
enum RimSeqResident : int64_t {
  kResWhh = 1,       // weight_hh (H, G*H)
  kResWx = 2,        // the input term's F (n_in*Dx, G*H), compute type
  kResCQuery = 4,    // comm_query (H, ck)
  kResCKey = 8,      // comm_key (H, ck)
  kResCValue = 16,   // comm_value (H, cv)
  kResCOutput = 32,  // comm_output (cv, H)
  kResWQuery = 64,   // input_query (H, nk)
};
constexpr int kResKinds = 7;
constexpr int64_t kResAll = 127;

// Elements per mechanism of resident weight i (bit 1 << i).
RIMS_HD int64_t rim_seq_res_elems(const RimSeqDims& d, int i) {
  switch (i) {
    case 0: return d.H * d.GH;
    case 1: return d.n_in * d.Dx * d.GH;
    case 2: case 3: return d.H * d.ck;
    case 4: return d.H * d.cv;
    case 5: return d.cv * d.H;
    default: return d.H * d.nk;
  }
}

// Bytes per block of resident weight i for kpr mechanisms (tb, cb: the storage and compute types'
// sizes; F is in the compute type).
RIMS_HD int64_t rim_seq_res_bytes(const RimSeqDims& d, int i, int64_t tb, int64_t cb) {
  return d.kpr * rim_seq_res_elems(d, i) * (i == 1 ? cb : tb);
}

RIMS_HD int64_t rim_seq_align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// Bytes of a tile's shared memory for S samples: the tensor-core scratch, the arrays (cb = the
// compute type's size), then each resident weight of d.resident 16-byte aligned (tb = the storage
// type's size; F is in the compute type). off (if given): each weight's byte offset, -1 if not
// resident.
RIMS_HD int64_t rim_seq_fwd_smem_bytes(const RimSeqDims& d, int64_t S, int64_t tb,
                                              int64_t cb, int64_t* off = nullptr) {
  int64_t bytes = (rim_seq_smem_elems(d, S) +
                   (d.mma ? mma_smem_elems(d.K, S, d.ma, tb, cb) : 0)) * cb;
  for (int i = 0; i < kResKinds; ++i) {
    const bool on = d.kpr > 0 && (d.resident >> i) & 1;
    if (off) off[i] = on ? rim_seq_align16(bytes) : -1;
    if (on) bytes = rim_seq_align16(bytes) + rim_seq_res_bytes(d, i, tb, cb);
  }
  return bytes;
}

// The resident set for a cluster block with `budget` bytes of shared memory and d.S samples:
// weights tried largest first, each kept if it still fits (0 without a cluster).
inline int64_t rim_seq_resident_fit(RimSeqDims d, int64_t tb, int64_t cb, int64_t budget) {
  if (d.kpr == 0) return 0;
  int order[kResKinds];
  for (int i = 0; i < kResKinds; ++i) order[i] = i;
  std::stable_sort(order, order + kResKinds, [&](int a, int b) {
    return rim_seq_res_bytes(d, a, tb, cb) > rim_seq_res_bytes(d, b, tb, cb);
  });
  int64_t chosen = 0;
  for (int i : order) {
    if (i == 1 && d.xw_hoisted) continue;  // F is not read with the input term hoisted
    d.resident = chosen | (int64_t(1) << i);
    if (rim_seq_fwd_smem_bytes(d, d.S, tb, cb) <= budget) chosen = d.resident;
  }
  return chosen;
}


// The own mechanisms that at least one of the tile's samples runs this step. The phases whose
// results only active rows use (gates, output; communication Q when nothing is saved) enumerate
// their items over these mechanisms alone: a mechanism no sample runs has its weights read by no
// one (at tile 1 that is K - top_k of K), and the items left fill fewer rounds of the block's
// threads (paper layer, 512 threads: gates 400 items in one round instead of 600 in two; the
// persistent forward's weight phases wait on L2 round trips, benchmarks/README.md). Results are
// unchanged: the skipped items' values were computed and discarded. all: every own mechanism
// counts (more than 64 of them, or more than 64 rows to scan per thread), the mask unused.
struct RunMechs {
  uint64_t mask;
  int count;
  bool all;
  // The q-th own mechanism (ascending) that runs (on) or that no sample runs (!on); q < count,
  // respectively q < kn - count.
  RIMS_HD int nth(int q, bool on = true) const {
    if (all) return q;
    uint64_t m = on ? mask : ~mask;
    for (; q > 0; --q) m &= m - 1;  // drop the lowest q set bits
#if defined(__CUDA_ARCH__)
    return __ffsll(static_cast<long long>(m)) - 1;
#else
    return __builtin_ctzll(m);
#endif
  }
  // The q-th of all own mechanisms, those that run first: an item order that puts the items
  // which read weights before those which only write zeros.
  RIMS_HD int ordered(int q) const { return q < count ? nth(q) : nth(q - count, false); }
};

// RunMechs of the act rows (own row s * kst + k for own mechanism k < kn, sample s < S), read by
// every thread after the barrier that ends the rank rule (S * kn <= 64 shared-memory reads).
template <typename C>
RIMS_HD RunMechs run_mechs(const C* act, int S, int kn, int kst) {
  RunMechs r{0, kn, true};
  if (kn > 64 || S * kn > 64) return r;
  r.all = false;
  r.count = 0;
  for (int k = 0; k < kn; ++k) {
    bool on = false;
    for (int s = 0; s < S; ++s) on = on || act[s * kst + k] != C(0);
    if (on) {
      r.mask |= uint64_t(1) << k;
      ++r.count;
    }
  }
  return r;
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// The whole sequence for tile `tile` (samples tile*S .. min(B, tile*S + S) - 1). Exec provides
// parallel_for(n, f): f(i) for every int i in [0, n), then a barrier; warp_for(n, f):
// f(i, warp, lane, lanes) with one warp per item (f may be warp-collective: the attention's
// scores, the tensor-core products), then a barrier; and syncwarp() (see HostExec). C: compute
// type; SMAX: the largest S the accumulators hold.
// MMA: the three weight products of a step (gates 3b, Q|K|V 4a, output 5: 88% of its FLOPs at
// the paper layer; the input queries stay on CUDA cores) on tensor cores (mma_rows.cuh): operand
// rows packed in the storage type (the reference's operand rounding), one warp per (mechanism, 32
// columns), each product's epilogue fused (biases and saving; the residual). The scratch
// (mma_smem_elems) comes first in shared memory. Device: storage bf16/fp16 only (MmaTile8x32);
// host: any type (tests). S <= 8.
// CLUSTER: the tile is run by a cluster of blocks, block `rank` owning mechanisms
// rank*kpr .. rank*kpr + kpr - 1 (RimSeqDims::kpr): every phase runs only its own rows and
// (mechanism, column) items, so per-step work and weight traffic per block shrink K/kpr-fold.
// The two cross-mechanism reads (the rank rule needs every p; the communication every K|V) are
// served by pushes: the owner of a row stores its p and K|V into every block's copy as it computes
// them (remote stores, which do not wait for a reply, unlike remote loads), and a cluster barrier
// follows each of the two phases (publish below). Exec then also provides cluster_sync() and
// peer(ptr, rank): ptr's address in block rank's shared memory (ClusterHostExec; DSMEM on the
// device). A block's arrays hold only its own rows (S, kpr, .), except p and K|V (S, K, .); with
// RimSeqDims::resident it also copies its mechanisms' weights into shared memory at the start
// (rim_seq_fwd_smem_bytes) and reads them from there. Arithmetic and its order are the single
// block's, so the results are bit-identical.
template <int SMAX, typename C, bool MMA = false, bool CLUSTER = false, typename T, class Exec>
RIMS_HD void rim_seq_fwd_tile(const Exec& ex, const RimSeqFwdParams<T>& p, int64_t tile, C* smem,
                              int rank = 0) {
  // Tile-local sizes and item indices are 32-bit (a tile's S*K*width and a mechanism's weight
  // block stay far below 2^31; 64-bit division costs many instructions on a GPU); offsets into
  // (T, B, ...) tensors are 64-bit (every such expression starts from t, B or b0).
  const int64_t B = p.B;
  const int M = int(p.M), K = int(p.K), H = int(p.H), GH = int(p.GH), n_in = int(p.n_in);
  const int dk = int(p.dk), nk = int(p.nk), Dx = int(p.Dx), n_c = int(p.n_c), dc = int(p.dc);
  const int dcv = int(p.dcv), ck = int(p.ck), cv = int(p.cv);
  const int xrow = int(p.xrow), xhead = int(p.xhead);
  const int C3 = 2 * ck + cv, GW = p.lstm ? GH : 2 * GH, XW = n_in * Dx, NM = n_in * M;
  const int64_t b0 = tile * p.S;
  const int S = int((B - b0) < p.S ? (B - b0) : p.S);  // samples in this tile
  const C* keys = static_cast<const C*>(p.keys);
  const C* xsrc = static_cast<const C*>(p.xsrc);
  const C* wx = static_cast<const C*>(p.w_x);
  // The hoisted input term, or nullptr; never with MMA (seq_use_xw), so that the tensor-core
  // instantiations drop its phases at compile time (they sit at the register limit).
  const C* xwp = MMA ? nullptr : static_cast<const C*>(p.xw);
  const bool save = p.sv_h != nullptr;
  // Row r = s*K + k of the tile, step t, in a saved (T, B, K, width) history.
  auto sv = [&](void* base, int64_t t, int64_t r, int64_t width) {
    return static_cast<C*>(base) + ((t * B + b0) * K + r) * width;
  };
  const C scale_in = C(1) / sqrt(C(dk));
  const C scale_c = C(1) / sqrt(C(dc));
  const C keep_in = C(1.0 - p.p_in), keep_c = C(1.0 - p.p_c);
  const float drop_in = static_cast<float>(p.p_in), drop_c = static_cast<float>(p.p_c);
  const int64_t mma_el = MMA ? mma_smem_elems(K, p.S, p.ma, sizeof(T), sizeof(C)) : 0;
  const MmaSmem<C, T> ms(smem);  // used only when MMA
  static_assert(!MMA || SMAX <= kMmaM, "the tensor-core tile has 8 rows");
  static_assert(!(MMA && CLUSTER), "the cluster variant runs on CUDA cores");
  // MMA: the cell runs in the gate product's epilogue, no gate array.
  RimSeqSmem<C> sm(smem + mma_el, p, p.S);
  const int S_l = int(p.S), mk = int(p.mk), mn = int(p.mn), mxw = int(p.mxw), mh = int(p.mh);
  const int mq = int(p.mq), mv = int(p.mv), mo = int(p.mo), CKV = ck + cv;
  if constexpr (MMA) mma_clear(ex, ms, K, S_l, int(p.ma));
  // This block's mechanisms k0 .. k0 + kn - 1 (all K without a cluster). A tile row r = s*K + k
  // (the saved histories' and p's and kv's index) is own row L(s, k) = s*kpr + k - k0 of the other
  // arrays (r itself without a cluster); row(i): the tile row of the i-th own row, own(i) its own
  // row (i without a cluster). No division by K in them: the products' row accessors call L for
  // every (row, sample), and the compiler recomputed a division there per load instead of keeping
  // it (sm_90a SASS of the 256-thread cluster kernel: 128 divisions per 16-row batch).
  const int kpr = CLUSTER ? int(p.kpr) : K;
  const int k0 = CLUSTER ? rank * kpr : 0;
  const int kn = CLUSTER ? (K - k0 < kpr ? K - k0 : kpr) : K;
  auto row = [&](int i) { return CLUSTER ? (i / kn) * K + k0 + i % kn : i; };
  auto own = [&](int i) { return CLUSTER ? (i / kn) * kpr + i % kn : i; };
  auto L = [&](int s, int k) { return CLUSTER ? s * kpr + k - k0 : s * K + k; };
  // The CUDA-core products' items: NC adjacent columns each (column_dot.cuh); groups per
  // mechanism of the queries, gates, communication Q|K|V and output.
  constexpr int NC = kColumnsOf<C>;
  const int g_q = column_groups(nk, NC), g_g = column_groups(GH, NC);
  const int g_ck = column_groups(ck, NC), g_qkv = 2 * g_ck + column_groups(cv, NC);
  const int g_h = column_groups(H, NC);
#if !defined(__CUDA_ARCH__)
  // Host runs (the tests): the template must match the call's options, which select the layout.
  if (MMA != p.mma || CLUSTER != (p.kpr > 0))
    throw std::logic_error("rim_seq_fwd_tile: MMA / CLUSTER do not match p.mma / p.kpr");
#endif
  // Weights: global, or this block's resident copies (made below).
  int64_t off[kResKinds];
  rim_seq_fwd_smem_bytes(p, p.S, sizeof(T), sizeof(C), off);
  // Each returns mechanism k0's block (own mechanism k's is at + (k - k0) * its size).
  auto weights = [&](const auto* g, int i) {
    using W = std::remove_cv_t<std::remove_pointer_t<decltype(g)>>;
    const int64_t per = rim_seq_res_elems(p, i);
    const W* src = g + int64_t(k0) * per;
    if (!CLUSTER || off[i] < 0) return src;
#if !defined(__CUDA_ARCH__)
    if (off[i] % 16 != 0) throw std::logic_error("rim_seq_fwd_tile: resident slot not aligned");
#endif
    W* dst = reinterpret_cast<W*>(reinterpret_cast<char*>(smem) + off[i]);
    ex.copy(dst, src, kn * per);
    return static_cast<const W*>(dst);
  };
  const T* const w_hh = weights(p.w_hh, 0);
  const C* const w_x = weights(wx, 1);
  const T *const c_query = weights(p.c_query, 2), *const c_key = weights(p.c_key, 3);
  const T *const c_value = weights(p.c_value, 4), *const c_output = weights(p.c_output, 5);
  const T* const w_query = weights(p.w_query, 6);
  // Cluster: *slot (in this block's shared memory) = v in every other block too. A block reads
  // the pushed rows only after the cluster barrier that ends the phase, and a row is pushed again
  // (next step) only after the other of the step's two barriers, which every block reaches after
  // reading it: p is read in phase 2 and pushed in 1b, K|V read in 4b and pushed in 4a.
  const int ranks = CLUSTER ? (K + kpr - 1) / kpr : 1;
  auto push = [&](C* slot, C v) {
    if constexpr (CLUSTER)
      for (int q = 0; q < ranks; ++q)
        if (q != rank) *ex.peer(slot, q) = v;
  };
  auto publish = [&]() {
    if constexpr (CLUSTER) ex.cluster_sync();
  };

  // The initial state of the own rows, converted to the compute type.
  ex.parallel_for(S * kn * H, [&](int i) {
    const int r = row(i / H), j = i % H, x = own(i / H) * H + j;
    sm.h[x] = to_c(p.h0[(b0 * K + r) * H + j]);
    if (p.lstm) sm.c[x] = to_c(p.c0[(b0 * K + r) * H + j]);
  });
  publish();  // no block touches another's shared memory before every block has started

  for (int64_t t = 0; t < p.T_; ++t) {
    ex.step();
    const C* kt = keys + (t * B + b0) * M * nk;
    const C* xt = xsrc + (t * B + b0) * M * xrow;
    // 1a. Input queries q[s, k] = h[s, k] input_query[k], weight-stationary: item (k, NC
    // columns), all the tile's samples; items past those stage the step's keys (S, M, nk) in
    // shared memory, one element each: the scores' chains then read no global memory (each of
    // their S*K threads waited on ~dk/4 dependent L2 round trips).
    const int nq = kn * g_q;
    ex.parallel_for(nq + S * M * nk, [&](int i) {
      if (i >= nq) {
        sm.kx[i - nq] = kt[i - nq];
        return;
      }
      const ColumnGroup cg = column_group<NC>(i, g_q, nk);
      const int k = k0 + cg.outer, e0 = cg.c0, nc = cg.nc;
      C acc[NC][SMAX];
      columns_fill(acc, C(0));
      columns_dot(acc, S, H, w_query + (k - k0) * H * nk + e0, nk, nc,
                  [&](int s, int64_t j) { return sm.h[L(s, k) * H + j]; }, EveryRow{});
      RIMS_UNROLL
      for (int s = 0; s < SMAX; ++s) {
        if (s >= S) break;
        const int r = s * K + k;
        RIMS_UNROLL
        for (int c = 0; c < NC; ++c) {
          if (c >= nc) break;
          sm.q[L(s, k) * nk + e0 + c] = acc[c][s];
          if (save) sv(p.sv_q, t, r, nk)[e0 + c] = acc[c][s];
        }
      }
    });
    // 1b-2. Scores, null softmax per head (a in place of the scores), p = mean null probability:
    // one warp per row, whose lanes split each dk-long dot over consecutive elements (one thread
    // per row waited on dk dependent shared-memory loads per key, every row's q at one bank; the
    // 27b phase clocks: ~2 900 cycles a step at the paper layer). Lane 0 runs the null softmax.
    ex.warp_for(S * kn, [&](int i, int, int lane, int lanes) {
      const int r = row(i), s = r / K;
      C psum = C(0);
      for (int n = 0; n < n_in; ++n) {
        C* an = sm.a + (own(i) * n_in + n) * M;
        const C* qn = sm.q + own(i) * nk + n * dk;
        for (int m = 0; m < M; ++m) {
          const C dot = warp_dot(qn, sm.kx + (s * M + m) * nk + n * dk, dk, lane, lanes);
          if (lane == 0) an[m] = dot * scale_in;
        }
        if (lane != 0) continue;
        psum += null_softmax(an, M, an);
        if (save)
          for (int m = 0; m < M; ++m) sv(p.sv_a, t, r, n_in * M)[n * M + m] = an[m];
      }
      if (lane != 0) return;
      sm.p[r] = psum / C(n_in);
      push(sm.p + r, sm.p[r]);
    });
    publish();  // every p
    // 2. The rank rule per (sample, mechanism).
    ex.parallel_for(S * kn, [&](int i) {
      const int r = row(i), s = r / K, k = r % K;
      const bool on = competition_active(sm.p + s * K, K, k, p.top_k);
      sm.act[own(i)] = on ? C(1) : C(0);
      p.masks[(t * B + b0 + s) * K + k] = on;
    });
    // The mechanisms some sample runs (RunMechs), recomputed where each phase that uses them
    // starts, so that they are live in that phase only (the 512-thread kernels sit at their
    // register limit).
    const int kst = int(rim_seq_own_stride(p));
    // 3a, hoisted input term: only the input dropout, on a~ in place (the saved a is the
    // undropped one, saved above; nothing reads sm.a again this step).
    if (xwp != nullptr && drop_in > 0.f) ex.parallel_for(S * kn * NM, [&](int i) {
      const int r = row(i / NM), j = i % NM, l = own(i / NM);
      if (sm.act[l] == C(0)) return;
      const int s = r / K, k = r % K;
      const uint64_t idx = static_cast<uint64_t>(((t * B + b0 + s) * K + k) * NM + j);
      C& w = sm.a[l * NM + j];
      w = dropout_keep(p.seed, 0, idx, drop_in) ? w / keep_in : C(0);
    });
    // 3a. xa[s, k, n] = sum_m a~[s, k, n, m] x_{m, n} (active rows; dropout on a).
    if (xwp == nullptr) ex.parallel_for(S * kn * XW, [&](int i) {
      const int r = row(i / XW), col = i % XW, n = col / Dx, d = col % Dx, l = own(i / XW);
      if (sm.act[l] == C(0)) return;
      const int s = r / K, k = r % K;
      C acc = C(0);
      for (int64_t m = 0; m < M; ++m) {
        C w = sm.a[(l * n_in + n) * M + m];
        if (drop_in > 0.f) {
          const uint64_t idx = static_cast<uint64_t>(
              (((t * B + b0 + s) * K + k) * n_in + n) * M + m);
          w = dropout_keep(p.seed, 0, idx, drop_in) ? w / keep_in : C(0);
        }
        acc += w * xt[(s * M + m) * xrow + n * xhead + d];
      }
      sm.xa[l * XW + col] = acc;
    });
    // 3b. Gate pre-activations of the active rows, weight-stationary: item (k, column), all the
    // tile's samples, for the mechanisms some sample runs (RunMechs). LSTM: g = xa F + h W_hh +
    // b_ih + b_hh; GRU: gi = xa F + b_ih | gh = h W_hh + b_hh. Inactive rows' saved gates (zeros)
    // are written by the cell phase.
    const RunMechs run_g = run_mechs(sm.act, S, kn, kst);
    if constexpr (!MMA) ex.parallel_for(run_g.count * g_g, [&](int i) {
      const RunMechs& run = run_g;
      const ColumnGroup cg = column_group<NC>(i, g_g, GH);
      const int k = k0 + run.nth(cg.outer), c0 = cg.c0, nc = cg.nc;
      // Accumulators indexed by compile-time c, s (unrolled, guarded by nc, S): registers.
      C gi[NC][SMAX], gh[NC][SMAX];
      columns_fill(gi, C(0));
      columns_fill(gh, C(0));
      if (xwp != nullptr)
        hoisted_input_term(gi, S, NM, xwp + (t * B + b0) * M * K * n_in * GH + c0, nc,
                           [&](int s) { return sm.act[L(s, k)] != C(0); },
                           [&](int s, int j) { return sm.a[L(s, k) * NM + j]; },
                           [&](int s, int j) {  // row (s, m, k, n) of XW, j = n M + m
                             return ((int64_t(s) * M + j % M) * K + k) * n_in + j / M;
                           }, GH);
      else
        columns_dot(gi, S, XW, w_x + (k - k0) * XW * GH + c0, GH, nc,
                    [&](int s, int64_t j) { return sm.xa[L(s, k) * XW + j]; }, EveryRow{});
      columns_dot(gh, S, H, w_hh + (k - k0) * H * GH + c0, GH, nc,
                  [&](int s, int64_t j) { return sm.h[L(s, k) * H + j]; }, EveryRow{});
      RIMS_UNROLL
      for (int c = 0; c < NC; ++c) {
        if (c >= nc) break;
        const int col = c0 + c;
        const C bi = to_c(p.b_ih[k * GH + col]), bh = to_c(p.b_hh[k * GH + col]);
        RIMS_UNROLL
        for (int s = 0; s < SMAX; ++s) {
          const int r = s * K + k, l = L(s, k);
          if (s >= S) break;
          if (sm.act[l] == C(0)) continue;  // no gates
          if (p.lstm) {
            sm.g[l * GW + col] = gi[c][s] + gh[c][s] + (bi + bh);
          } else {
            sm.g[l * GW + col] = gi[c][s] + bi;
            sm.g[l * GW + GH + col] = gh[c][s] + bh;
          }
          if (save) {
            sv(p.sv_g, t, r, GW)[col] = sm.g[l * GW + col];
            if (!p.lstm) sv(p.sv_g, t, r, GW)[GH + col] = sm.g[l * GW + GH + col];
          }
        }
      }
    });
    if constexpr (MMA) {
      // 3b (tensor cores). Operand rows (k, s) = [xa | 0 | h | 0] of active rows, zero otherwise;
      // the epilogue adds the biases and saves, as the weight-stationary phase above.
      mma_pack<C>(ex, K, S, S_l, mk, ms.aop, [&](int s, int k, int j) {
        const int r = s * K + k;
        if (sm.act[r] == C(0)) return C(0);
        if (j < XW) return sm.xa[r * XW + j];
        return j >= mxw && j - mxw < H ? sm.h[r * H + (j - mxw)] : C(0);
      });
      // p.w_mma's columns are interleaved by hidden unit: U columns per unit, its gates at
      // slots q < NG (LSTM: U = 4, i f g o; GRU: U = 8, r z n of gi then of gh, 2 zero slots),
      // so a warp's tile holds 32 / U whole units and its lanes run the cell (3c) on them:
      // biases, saving, active rows step, inactive rows copy. No gate array.
      const int U = p.lstm ? 4 : 8, NG = p.lstm ? 4 : 6, units = kMmaN / U;
      mma_tiles(ex, ms, K, S_l, p.w_mma, mk, mn, [&](int k, int n0, const C* st, int lane,
                                                    int lanes) {
        for (int e = lane; e < kMmaM * units; e += lanes) {
          const int s = e / units, j = n0 / U + e % units;
          if (s >= S || j >= H) continue;
          const int r = s * K + k, i = r * H + j;
          const C* acc = st + s * kMmaN + U * (e % units);  // unit j's gate slots
          if (save) {
            sv(p.sv_h, t, r, H)[j] = sm.h[i];
            if (p.lstm) sv(p.sv_c, t, r, H)[j] = sm.c[i];
          }
          // Saved gates in their natural layout: gate q of unit j at q H + j (GRU: gh at GH).
          if (sm.act[r] == C(0)) {
            sm.ht[i] = sm.h[i];
            if (save) {
              sv(p.sv_ht, t, r, H)[j] = sm.ht[i];
              for (int q = 0; q < NG; ++q) sv(p.sv_g, t, r, GW)[q * H + j] = C(0);
            }
            continue;
          }
          C g[6];
          for (int q = 0; q < NG; ++q) {
            const int col = q * H + j;
            g[q] = acc[q] + (p.lstm ? to_c(p.b_ih[k * GH + col]) + to_c(p.b_hh[k * GH + col])
                             : to_c(q < 3 ? p.b_ih[k * GH + col] : p.b_hh[k * GH + col - GH]));
            if (save) sv(p.sv_g, t, r, GW)[col] = g[q];
          }
          if (p.lstm) {
            C hn, cn;
            lstm_pointwise_fwd(g[0], g[1], g[2], g[3], sm.c[i], hn, cn);
            sm.ht[i] = hn;
            sm.c[i] = cn;
          } else {
            sm.ht[i] = gru_pointwise_fwd(g[0], g[1], g[2], g[3], g[4], g[5], sm.h[i]);
          }
          if (save) sv(p.sv_ht, t, r, H)[j] = sm.ht[i];
        }
      });
    }
    // 3c. Masked cell: active rows step, inactive rows copy (bit-exact). (Fused into 3b's
    // epilogue on the tensor-core path.) The mechanisms some sample runs first, as in 4b below.
    const RunMechs run_c = run_mechs(sm.act, S, kn, kst);
    if constexpr (!MMA) ex.parallel_for(S * kn * H, [&](int il) {
      const int s = (il / H) % S, j = il % H, k = k0 + run_c.ordered(il / (S * H));
      const int r = s * K + k, i = L(s, k) * H + j;
      if (save) {
        sv(p.sv_h, t, r, H)[j] = sm.h[i];
        if (p.lstm) sv(p.sv_c, t, r, H)[j] = sm.c[i];
      }
      if (sm.act[L(s, k)] == C(0)) {
        sm.ht[i] = sm.h[i];
        if (save) {
          sv(p.sv_ht, t, r, H)[j] = sm.ht[i];
          // No gates; saved as zeros (outputs are fully defined): unit j of each of the GW / H
          // gate blocks (LSTM i f g o; GRU gi's r z n, then gh's).
          for (int q = 0; q < GW / H; ++q) sv(p.sv_g, t, r, GW)[q * H + j] = C(0);
        }
        return;
      }
      const C* g = sm.g + L(s, k) * GW;
      if (p.lstm) {
        C hn, cn;
        lstm_pointwise_fwd(g[j], g[H + j], g[2 * H + j], g[3 * H + j], sm.c[i], hn, cn);
        sm.ht[i] = hn;
        sm.c[i] = cn;
      } else {
        const C* gh = g + GH;
        sm.ht[i] = gru_pointwise_fwd(g[j], g[H + j], g[2 * H + j], gh[j], gh[H + j],
                                     gh[2 * H + j], sm.h[i]);
      }
      if (save) sv(p.sv_ht, t, r, H)[j] = sm.ht[i];
    });
    // 4a. Communication Q | K | V of every mechanism from h~ (inactive mechanisms' K|V are read
    // too).
    if constexpr (MMA) {
      mma_pack<C>(ex, K, S, S_l, mh, ms.aop, [&](int s, int k, int j) {
        return j < H ? sm.ht[(s * K + k) * H + j] : C(0);
      });
      mma_rows(ex, ms, K, S, S_l, p.w_mma_qkv, mh, mq, C3, [&](int s, int k, int col, C v) {
        const int r = s * K + k;
        if (col < ck)
          sm.cq[r * ck + col] = v;
        else
          sm.kv[r * CKV + col - ck] = v;
        if (save) sv(p.sv_qkv, t, r, C3)[col] = v;
      });
    }
    // Weight-stationary on CUDA cores: item (k, column), all the tile's samples.
    // Groups: g_ck of comm_query's columns, g_ck of comm_key's, then g_cv of comm_value's. The Q
    // items come first and only for the mechanisms some sample runs: the attention reads active
    // rows' queries alone, and inactive rows' saved Q are zeros (written by the softmax below).
    const RunMechs run_q = run_mechs(sm.act, S, kn, kst);
    const int q_items = run_q.count * g_ck, kv_groups = g_qkv - g_ck;
    if constexpr (!MMA) ex.parallel_for(q_items + kn * kv_groups, [&](int i) {
      const RunMechs& run = run_q;
      const bool qi = i < q_items;
      const int ikv = i - q_items;
      const int k = k0 + (qi ? run.nth(i / g_ck) : ikv / kv_groups);
      const int g = qi ? i % g_ck : ikv % kv_groups + g_ck;
      const int which = g < g_ck ? 0 : g < 2 * g_ck ? 1 : 2;  // Q, K, V
      const int c0 = (g - which * g_ck) * NC;                   // in that weight
      const int width = which < 2 ? ck : cv, nc = min_int(NC, width - c0);
      const T* w = which == 0 ? c_query + (k - k0) * H * ck
                   : which == 1 ? c_key + (k - k0) * H * ck : c_value + (k - k0) * H * cv;
      C acc[NC][SMAX];
      columns_fill(acc, C(0));
      columns_dot(acc, S, H, w + c0, width, nc,
                  [&](int s, int64_t j) { return sm.ht[L(s, k) * H + j]; }, EveryRow{});
      RIMS_UNROLL
      for (int c = 0; c < NC; ++c) {
        if (c >= nc) break;
        const int col = which * ck + c0 + c;  // in Q | K | V
        RIMS_UNROLL
        for (int s = 0; s < SMAX; ++s) {
          if (s >= S) break;
          const int r = s * K + k;
          if (save && (col >= ck || sm.act[L(s, k)] != C(0))) sv(p.sv_qkv, t, r, C3)[col] = acc[c][s];
          if (col < ck) {
            sm.cq[L(s, k) * ck + col] = acc[c][s];
          } else {  // K | V: every block reads them
            sm.kv[r * CKV + col - ck] = acc[c][s];
            push(sm.kv + r * CKV + col - ck, acc[c][s]);
          }
        }
      }
    });
    publish();  // every mechanism's K | V
    // 4b. Multi-head attention of the active mechanisms over all K: the read o (dropout on b).
    // Items of the mechanisms some sample runs first (RunMechs::ordered): at tile 1 the active
    // rows' items then fill the first round of the block's warps or threads, and the rest only
    // write zeros. Scores and softmax per (row, head), one warp each: the lanes split each
    // dc-long dot over consecutive elements (one thread per (row, head, j) waited on dc dependent
    // loads, the K rows' keys of a head at one bank: ~6 500 cycles a step in the 27b phase clocks,
    // scores and softmax), then the softmax over the K keys with the lanes splitting j (on the
    // host one lane: softmax()'s loops exactly). Saved undropped; then the dropout's scale in
    // place (nothing reads the undropped weights after this phase).
    const int nK = n_c * K;
    const RunMechs run_b = run_mechs(sm.act, S, kn, kst);
    ex.warp_for(S * kn * n_c, [&](int i, int, int lane, int lanes) {
      const int s = (i / n_c) % S, n = i % n_c, k = k0 + run_b.ordered(i / (S * n_c));
      const int r = s * K + k, l = L(s, k);
      C* y = sm.bp + (l * n_c + n) * K;
      if (sm.act[l] == C(0)) {  // saved as zeros: head n's probabilities and Q columns
        if (save) {
          for (int j = lane; j < K; j += lanes) sv(p.sv_bp, t, r, nK)[n * K + j] = C(0);
          for (int e = lane; e < dc; e += lanes) sv(p.sv_qkv, t, r, C3)[n * dc + e] = C(0);
        }
        return;
      }
      const C* qn = sm.cq + l * ck + n * dc;
      for (int j = 0; j < K; ++j) {
        const C dot = warp_dot(qn, sm.kv + (s * K + j) * CKV + n * dc, dc, lane, lanes);
        if (lane == 0) y[j] = dot * scale_c;
      }
      warp_softmax(ex, y, K, lane, lanes, [&](int j) {
        if (save) sv(p.sv_bp, t, r, nK)[n * K + j] = y[j];
        if (drop_c > 0.f) {
          const uint64_t idx = static_cast<uint64_t>(
              (((t * B + b0 + s) * K + k) * n_c + n) * K + j);
          y[j] = dropout_keep(p.seed, 1, idx, drop_c) ? y[j] / keep_c : C(0);
        }
      });
    });
    // the read per (row, column): o[e] = sum_j b~_j v_j[e] in a register, zero on inactive rows.
    const RunMechs run_r = run_mechs(sm.act, S, kn, kst);
    ex.parallel_for(S * kn * cv, [&](int i) {
      const int s = (i / cv) % S, e = i % cv, n = e / dcv, k = k0 + run_r.ordered(i / (S * cv));
      const int r = s * K + k, l = L(s, k);
      C acc = C(0);
      if (sm.act[l] != C(0)) {
        const C* y = sm.bp + (l * n_c + n) * K;
        for (int j = 0; j < K; ++j) acc += y[j] * sm.kv[(s * K + j) * CKV + ck + e];
      }
      sm.o[l * cv + e] = acc;
      if (save) sv(p.sv_o, t, r, cv)[e] = acc;
    });
    // 5. h' = h~ + o comm_output[k] for active rows, h~ for the rest; out[t] in the storage type.
    if constexpr (MMA) {
      mma_pack<C>(ex, K, S, S_l, mv, ms.aop, [&](int s, int k, int e) {
        return e < cv ? sm.o[(s * K + k) * cv + e] : C(0);
      });
      mma_rows(ex, ms, K, S, S_l, p.w_mma_out, mv, mo, H, [&](int s, int k, int j, C v) {
        const int r = s * K + k;
        const C hv = sm.act[r] != C(0) ? sm.ht[r * H + j] + v : sm.ht[r * H + j];
        sm.h[r * H + j] = hv;
        from_c(hv, p.out + ((t * B + b0 + s) * K + k) * H + j);
      });
    }
    // Items: (k, NC columns) of the mechanisms some sample runs, then one per (row, unit) of the
    // others' rows, which copy h~.
    const RunMechs run_o = run_mechs(sm.act, S, kn, kst);
    const int o_items = run_o.count * g_h;
    if constexpr (!MMA) ex.parallel_for(o_items + (kn - run_o.count) * S * H, [&](int i) {
      const RunMechs& run = run_o;
      if (i >= o_items) {
        const int x = i - o_items, j = x % H, s = (x / H) % S;
        const int k = k0 + run.nth(x / (H * S), false), l = L(s, k);
        sm.h[l * H + j] = sm.ht[l * H + j];
        from_c(sm.h[l * H + j], p.out + ((t * B + b0 + s) * K + k) * H + j);
        return;
      }
      const ColumnGroup cg = column_group<NC>(i, g_h, H);
      const int k = k0 + run.nth(cg.outer), j0 = cg.c0, nc = cg.nc;
      C acc[NC][SMAX];
      columns_fill(acc, C(0));
      columns_dot(acc, S, cv, c_output + (k - k0) * cv * H + j0, H, nc,
                  [&](int s, int64_t e) { return sm.o[L(s, k) * cv + e]; }, EveryRow{});
      RIMS_UNROLL
      for (int s = 0; s < SMAX; ++s) {
        if (s >= S) break;
        const int l = L(s, k);
        RIMS_UNROLL
        for (int c = 0; c < NC; ++c) {
          if (c >= nc) break;
          const int j = j0 + c;
          const C v = sm.act[l] != C(0) ? sm.ht[l * H + j] + acc[c][s] : sm.ht[l * H + j];
          sm.h[l * H + j] = v;
          from_c(v, p.out + ((t * B + b0 + s) * K + k) * H + j);
        }
      }
    });
  }
  ex.steps_done();
  // Final state of the own rows in the storage type.
  ex.parallel_for(S * kn * H, [&](int i) {
    const int r = row(i / H), j = i % H, x = own(i / H) * H + j;
    from_c(sm.h[x], p.h_n + (b0 * K + r) * H + j);
    if (p.lstm) from_c(sm.c[x], p.c_n + (b0 * K + r) * H + j);
  });
  // Remote accesses all end before the last K|V barrier; this one keeps a block's shared memory
  // alive until every block is past it, whatever the compiler moves (cheap: once per call).
  if constexpr (CLUSTER) ex.cluster_sync();
}

}  // namespace rims
