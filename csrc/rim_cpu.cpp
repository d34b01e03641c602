// The C++ sequence driver (backend="cpu"): one RIM layer over a whole sequence in one call, with
// a hand-written backward through time. SPEC.md is the contract; rims_fast/reference.py the
// oracle; rims_fast/rim_cpu.py registers the fake impls and the autograd formula.
//
// Layout. Every per-step tensor is (T, B, K, X): the K mechanisms of one sample are adjacent, and
// mechanism k of all samples is one strided matrix with leading dimension K*X, which BLAS takes
// as is. Matrix products are raw-pointer BLAS calls (sgemm_/dgemm_, see gemm_rm): no Tensor
// dispatch, views or allocations inside the time loop.
//
// Threads. This extension is built without -fopenmp, so at::parallel_for (header-inline) would
// run serially here: jobs go to a Team of at::get_num_threads() threads (torch's OpenMP team via
// libgomp's GOMP_parallel when loaded, else threads of its own), BLAS single-threaded inside.
//
// Input. The ops take the input elements already projected: keys (T, B, M, n_in d_k) and values
// (T, B, M, n_in d_v), computed by the caller. Head n of mechanism k reads
// xa_n = sum_m a~_{n,m} v_{m,n} and multiplies weight_ih[k]_n, so u_k weight_ih[k] =
// sum_n xa_n weight_ih[k]_n. rims_fast/rim_cpu.py folds the input term when M*D <= d_v (the
// reference's rule): the values are then the elements x_m themselves, one copy per head, and
// weight_ih the fold input_value_n weight_ih[k]_n (the sums are the reference's, reassociated).
// A BRIM layer calls the ops once per layer-step with its sources' keys and values.
//
// Forward. Samples are independent for the whole sequence, so the forward is ONE parallel loop
// over batch tiles (one per thread), each running all T steps of its samples without a barrier.
// Per step and tile: the queries (K GEMMs), scores, null softmax, p and the rank rule, per
// mechanism the gate GEMMs of the ACTIVE rows [h_{t-1} | xa] against weight_hh[k] and weight_ih[k]
// in place (LSTM: two GEMMs into one sum; GRU: gi and gh stay apart), the cell pointwise,
// the Q|K|V GEMM, the attention, and the output projection of the active rows.
//
// Saved for backward (save=true), all in the compute dtype: out (it is the h history), the c
// history (LSTM), h~ (after the cell, before communication), the input queries, the undropped
// input probabilities a, the gate pre-activations (LSTM: i,f,g,o with both terms and biases; GRU:
// gi | gh), the communication Q|K|V, the undropped communication probabilities, the dropped read
// o. Recomputed in backward: the cell activations (from the pre-activations), the dropout masks
// (from the counter-based stream), the dropped probabilities, xa. With save=false only out, the
// masks, the final state and two steps of c are kept: per-step buffers are reused.
//
// Backward. A reverse sweep carries dh, dc; per step a per-sample phase (communication attention
// backward) and a per-mechanism phase (everything else) on the team. The per-mechanism task also
// accumulates mechanism k's weight and bias gradients of that step (small GEMMs on its active
// rows), so no (T, B, K, .) gradient history is kept but the d scores and dgi weight_ih[k]_n^T
// (for d values).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <new>
#include <thread>
#include <memory>
#include <unistd.h>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include "kernels/masked_cell.cuh"
#include "kernels/rim_numerics.h"
#include "rim_cpu_simd.h"

namespace rims {
namespace {

using at::Tensor;

struct Dims {
  int64_t T, B, M, K, H, G, GH, GW;  // GW: saved gate width (LSTM 4H, GRU gi|gh = 6H)
  int64_t n_in, dk, dv, nk, nv;
  int64_t n_c, dc, dcv, ck, cv, C3;  // C3 = 2*ck + cv: packed comm Q|K|V
  int64_t top_k;
  bool lstm;
  double p_in, p_c;
  uint64_t seed;
  bool drop_in() const { return p_in > 0.0; }
  bool drop_c() const { return p_c > 0.0; }
};

void check_tensor(const char* op, const char* name, const Tensor& t, at::ScalarType dtype,
                  const std::vector<int64_t>& shape_) {
  const at::IntArrayRef shape(shape_);
  TORCH_CHECK(t.scalar_type() == dtype, "rims_fast::", op, ": ", name, " has dtype ",
              t.scalar_type(), " but the input has dtype ", dtype);
  TORCH_CHECK(t.device().is_cpu(), "rims_fast::", op, ": ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.sizes() == shape, "rims_fast::", op, ": ", name, " must have shape ", shape,
              ", got shape ", t.sizes());
}

// The input's rank and dtype; T, B, M from its shape.
Dims check_input(const char* op, const char* name, const Tensor& x, const char* layout) {
  TORCH_CHECK(x.dim() == 4, "rims_fast::", op, ": ", name, " must have dim 4 ", layout,
              ", got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "rims_fast::", op, ": ", name,
              " must be float32 or float64 (rims_fast.rim_cpu converts half precision), got ",
              dtype);
  Dims d{};
  d.T = x.size(0), d.B = x.size(1), d.M = x.size(2);
  return d;
}

// Checks of everything but the keys and values (shared by both ops); fills the sizes.
// nk, nv: the input key and value widths.
void check_core(const char* op, Dims& d, at::ScalarType dtype, int64_t nk, int64_t nv,
                const Tensor& h0, const std::optional<Tensor>& c0, const Tensor& input_query,
                const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& bias_ih,
                const Tensor& bias_hh, const Tensor& comm_query, const Tensor& comm_key,
                const Tensor& comm_value, const Tensor& comm_output, int64_t top_k,
                int64_t input_heads, int64_t comm_heads, double input_dropout,
                double comm_dropout, int64_t seed) {
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
  d.nk = nk, d.nv = nv;
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
    check_tensor(op, name, t, dtype, shape);
  };
  check("h0", h0, {d.B, K, H});
  if (d.lstm) check("c0", *c0, {d.B, K, H});
  check("input_query", input_query, {K, H, d.nk});
  check("weight_ih", weight_ih, {K, d.nv, d.GH});
  check("weight_hh", weight_hh, {K, H, d.GH});
  check("bias_ih", bias_ih, {K, d.GH});
  check("bias_hh", bias_hh, {K, d.GH});
  check("comm_query", comm_query, {K, H, d.ck});
  check("comm_key", comm_key, {K, H, d.ck});
  check("comm_value", comm_value, {K, H, d.cv});
  check("comm_output", comm_output, {K, d.cv, H});
}

// rim_cpu_kv_fwd/bwd: the input elements' keys (T, B, M, n_in d_k) and values (T, B, M, n_in d_v)
// are given (computed by the caller, e.g. a BRIM layer's per-step sources).
Dims check_kv_args(const char* op, const Tensor& keys, const Tensor& values, const Tensor& h0,
                   const std::optional<Tensor>& c0, const Tensor& input_query,
                   const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& bias_ih,
                   const Tensor& bias_hh, const Tensor& comm_query, const Tensor& comm_key,
                   const Tensor& comm_value, const Tensor& comm_output, int64_t top_k,
                   int64_t input_heads, int64_t comm_heads, double input_dropout,
                   double comm_dropout, int64_t seed) {
  Dims d = check_input(op, "keys", keys, "(T, B, M, n_in*d_k)");
  const auto dtype = keys.scalar_type();
  TORCH_CHECK(input_query.dim() == 3 && weight_ih.dim() == 3, "rims_fast::", op,
              ": input_query must be (K, H, n_in*d_k) and weight_ih (K, n_in*d_v, G*H)");
  check_core(op, d, dtype, input_query.size(-1), weight_ih.size(1), h0, c0, input_query,
             weight_ih, weight_hh, bias_ih, bias_hh, comm_query, comm_key, comm_value,
             comm_output, top_k, input_heads, comm_heads, input_dropout, comm_dropout, seed);
  check_tensor(op, "keys", keys, dtype, {d.T, d.B, d.M, d.nk});
  check_tensor(op, "values", values, dtype, {d.T, d.B, d.M, d.nv});
  return d;
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


template <size_t... I>
auto to_tuple_impl(const std::vector<Tensor>& v, std::index_sequence<I...>) {
  return std::make_tuple(v[I]...);
}
template <size_t N>
auto to_tuple(const std::vector<Tensor>& v) {
  return to_tuple_impl(v, std::make_index_sequence<N>{});
}


uint64_t in_index(const Dims& d, int64_t t, int64_t b, int64_t k, int64_t n, int64_t m) {
  return static_cast<uint64_t>((((t * d.B + b) * d.K + k) * d.n_in + n) * d.M + m);
}
uint64_t comm_index(const Dims& d, int64_t t, int64_t b, int64_t k, int64_t n, int64_t j) {
  return static_cast<uint64_t>((((t * d.B + b) * d.K + k) * d.n_c + n) * d.K + j);
}

// ---- Threads. at::parallel_for is header-inline and this extension is built without -fopenmp,
// so here it would run serially. A Team runs a job on at::get_num_threads() threads (the caller
// is thread 0): on torch's OpenMP team through libgomp's GOMP_parallel when that runtime is
// loaded, else on threads of its own (they spin briefly between jobs, then sleep). BLAS runs
// single-threaded inside a job (OpenMP nesting; MKL's thread-local setting on own threads).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
// libgomp's entry points (the ABI of `#pragma omp parallel`), found when torch's OpenMP runtime
// is loaded: then a job runs on torch's own OpenMP team (the threads ATen and BLAS use, which
// otherwise keep spinning after their last region and would compete with separate threads).
extern "C" {
void GOMP_parallel(void (*)(void*), void*, unsigned, unsigned) __attribute__((weak));
int omp_get_thread_num(void) __attribute__((weak));
int omp_get_num_threads(void) __attribute__((weak));
}
inline bool have_gomp() {
  return GOMP_parallel != nullptr && omp_get_thread_num != nullptr &&
         omp_get_num_threads != nullptr;
}

class Team {
 public:
  explicit Team(int64_t nthreads) : P_(std::max<int64_t>(1, nthreads)), omp_(have_gomp()) {
    if (!omp_)
      for (int64_t i = 1; i < P_; ++i) th_.emplace_back([this, i] { work(i); });
  }
  ~Team() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : th_) t.join();
  }
  int64_t size() const { return P_; }
  Team(const Team&) = delete;
  Team& operator=(const Team&) = delete;

  // f(begin, end) over contiguous chunks of [0, n), one per thread, each of >= grain items (one
  // chunk if n < 2*grain). Returns when all are done; rethrows the first exception.
  template <typename F>
  void run(int64_t n, int64_t grain, const F& f) {
    if (n <= 0) return;
    const int64_t p = std::min<int64_t>(P_, std::max<int64_t>(1, n / std::max<int64_t>(1, grain)));
    if (p == 1) {
      f(int64_t(0), n);
      return;
    }
    n_ = n, chunk_ = (n + p - 1) / p, p_ = p;
    ctx_ = &f;
    fn_ = [](const void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); };
    err_ = nullptr;
    tls_ = at::ThreadLocalState();  // the caller's dispatch keys, grad mode: for ATen calls in jobs
    if (omp_) {  // BLAS is sequential inside an OpenMP region
      GOMP_parallel(&Team::omp_body, this, static_cast<unsigned>(p), 0u);
      if (err_) std::rethrow_exception(err_);
      return;
    }
    pending_.store(p - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    const int prev = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
    chunk(0);
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(prev);
    while (pending_.load() != 0) pause();
    if (err_) std::rethrow_exception(err_);
  }

 private:
  static void pause() {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
  void chunk(int64_t tid) {
    const int64_t b = tid * chunk_, e = std::min(n_, b + chunk_);
    if (b >= e) return;
    try {
      fn_(ctx_, b, e);
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu_);
      if (!err_) err_ = std::current_exception();
    }
  }
  // Chunk c on OpenMP thread c mod (team size): correct for any team size (1 when nested).
  static void omp_body(void* arg) {
    Team* self = static_cast<Team*>(arg);
    const int64_t tid = omp_get_thread_num(), nt = std::max(1, omp_get_num_threads());
    if (tid == 0) {
      for (int64_t c = 0; c < self->p_; c += nt) self->chunk(c);
    } else {
      at::ThreadLocalStateGuard guard(self->tls_);
      for (int64_t c = tid; c < self->p_; c += nt) self->chunk(c);
    }
  }
  void work(int64_t tid) {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(1);
    uint64_t seen = 0;
    for (;;) {
      for (int i = 0; i < 4000 && gen_.load() == seen; ++i) pause();
      if (gen_.load() == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_.load() != seen; });
      }
      seen = gen_.load();
      if (stop_) return;
      if (tid < p_) {
        at::ThreadLocalStateGuard guard(tls_);
        chunk(tid);
        pending_.fetch_sub(1);
      }
    }
  }

  const int64_t P_;
  const bool omp_;
  std::vector<std::thread> th_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int64_t> pending_{0};
  bool stop_ = false;
  int64_t n_ = 0, chunk_ = 1, p_ = 1;
  const void* ctx_ = nullptr;
  void (*fn_)(const void*, int64_t, int64_t) = nullptr;
  std::exception_ptr err_;
  at::ThreadLocalState tls_;
};

// The process's team, reused across calls (starting threads, and BLAS's per-thread setup in a
// new thread, cost milliseconds per call); held for the whole op call. A call that finds it busy
// (an op running on another thread) makes its own; after fork() the child makes a new one.
class TeamLease {
 public:
  TeamLease() {
    const int64_t P = std::max<int64_t>(1, at::get_num_threads());
    static std::mutex mu;
    static Team* shared = nullptr;
    static pid_t owner = 0;
    std::unique_lock<std::mutex> lk(mu, std::try_to_lock);
    if (!lk.owns_lock()) {
      own_ = std::make_unique<Team>(P);
      team_ = own_.get();
      return;
    }
    if (shared == nullptr || shared->size() != P || owner != getpid()) {
      if (shared != nullptr && owner == getpid()) delete shared;  // a forked child leaks it
      shared = new Team(P);
      owner = getpid();
    }
    team_ = shared;
    lk_ = std::move(lk);
  }
  Team& operator*() { return *team_; }

 private:
  std::unique_lock<std::mutex> lk_;
  std::unique_ptr<Team> own_;
  Team* team_ = nullptr;
};

// ---- Raw-pointer GEMM for the per-tile forward: row-major C = A B (+ beta C), leading dims
// given. BLAS's Fortran sgemm_/dgemm_ (exported by libtorch_cpu with MKL or OpenBLAS) when the
// loader found them (weak symbols), else ATen on from_blob views. Sizes are passed as int64
// values: read as LP64 int or as ILP64 int64, both see the same value (little-endian, < 2^31).
extern "C" {
void sgemm_(const char*, const char*, const int64_t*, const int64_t*, const int64_t*,
            const float*, const float*, const int64_t*, const float*, const int64_t*,
            const float*, float*, const int64_t*) __attribute__((weak));
void dgemm_(const char*, const char*, const int64_t*, const int64_t*, const int64_t*,
            const double*, const double*, const int64_t*, const double*, const int64_t*,
            const double*, double*, const int64_t*) __attribute__((weak));
}

// MKL's GEMMs may round differently when an operand sits at another 64-byte alignment (its
// results are alignment-independent only under MKL_CBWR). A sequence split into calls must equal
// one call exactly (SPEC "Dtypes"; RIMCell steps vs RIM), so the forward keeps every GEMM operand
// at the same alignment whatever T and t: per-step strides of the buffers its GEMMs read or write
// are padded to 64 bytes (pad64) and the tiles' scratch is 64-byte aligned (AlignedVec).
inline int64_t pad64(int64_t n, int64_t elem_bytes) {
  const int64_t q = 64 / elem_bytes;
  return (n + q - 1) / q * q;
}

template <typename S>
struct Aligned64 {
  using value_type = S;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  S* allocate(size_t n) {
    return static_cast<S*>(::operator new(n * sizeof(S), std::align_val_t(64)));
  }
  void deallocate(S* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <class U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
template <typename S>
using AlignedVec = std::vector<S, Aligned64<S>>;

// (rows, stride) buffer -> its first n columns as a contiguous tensor of `shape`.
inline Tensor unpad(const Tensor& buf, int64_t n, at::IntArrayRef shape) {
  return (buf.size(1) == n ? buf : buf.narrow(1, 0, n).contiguous()).view(shape);
}

// transB: Bm is stored (n, k) row-major and C = A Bm^T; transA: A is stored (k, m), C = A^T Bm.
template <typename S>
void gemm_rm(int64_t m, int64_t n, int64_t k, const S* A, int64_t lda, const S* Bm, int64_t ldb,
             S beta, S* C, int64_t ldc, bool transB = false, bool transA = false) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // C = beta C
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) C[i * ldc + j] = beta == S(0) ? S(0) : beta * C[i * ldc + j];
    return;
  }
  const S one = S(1);
  const char* tb = transB ? "T" : "N";
  const char* ta = transA ? "T" : "N";
  // Column-major view: C^T (n x m) = op(B)^T (n x k) A^T (k x m).
  if constexpr (std::is_same_v<S, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(tb, ta, &n, &m, &k, &one, Bm, &ldb, A, &lda, &beta, C, &ldc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(tb, ta, &n, &m, &k, &one, Bm, &ldb, A, &lda, &beta, C, &ldc);
      return;
    }
  }
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<S>::value);
  const Tensor a = transA ? at::from_blob(const_cast<S*>(A), {k, m}, {lda, 1}, opt).t()
                          : at::from_blob(const_cast<S*>(A), {m, k}, {lda, 1}, opt);
  const Tensor b = transB ? at::from_blob(const_cast<S*>(Bm), {n, k}, {ldb, 1}, opt).t()
                          : at::from_blob(const_cast<S*>(Bm), {k, n}, {ldb, 1}, opt);
  Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opt);
  if (beta == S(0))
    at::mm_out(c, a, b);
  else
    c.mul_(beta).addmm_(a, b);
}

// ================================= forward =================================
// Threads. Samples are independent for the whole sequence, so the forward is ONE parallel loop
// over batch tiles (one tile per thread): each task runs all T steps of its samples with
// single-threaded BLAS calls on raw pointers (no barrier, no Tensor dispatch, no allocation per
// step). Per step and tile: the queries (K GEMMs), scores, null softmax, p and the rank rule, per
// mechanism the gate GEMMs of its ACTIVE rows [h_{t-1} | xa] (cnt, H + n_in*d_v) against
// weight_hh[k] and weight_ih[k] in place (nothing packed or folded per call: a BRIM calls this
// once per layer-step; LSTM: two GEMMs into one sum, GRU: gi and gh stay apart), the cell
// pointwise, the Q|K|V GEMM, the attention, and the output projection of the active rows.
// `x` is the values (T, B, M, n_in d_v), `keys` the keys; head n's xa_n = sum_m a~ v_{m,n}
// multiplies weight_ih[k]_n. No multi-threaded ATen op runs before the tiles (an OpenMP team
// left spinning would compete with them).
template <typename S>
std::vector<Tensor> forward_impl(const Dims& d, const Tensor& x, const Tensor& keys,
                                 const Tensor& h0, const Tensor& c0, const Tensor& Wq,
                                 const Tensor& Wih, const Tensor& Whh, const Tensor& bih,
                                 const Tensor& bhh, const Tensor& Cq, const Tensor& Ck,
                                 const Tensor& Cv, const Tensor& Wco, bool save) {
  const int64_t T = d.T, B = d.B, M = d.M, K = d.K, H = d.H, GH = d.GH, GW = d.GW;
  const int64_t n_in = d.n_in, dk = d.dk, nk = d.nk, n_c = d.n_c, dc = d.dc, dcv = d.dcv;
  const int64_t ck = d.ck, cv = d.cv, C3 = d.C3;
  // Head n reads v_{m,n}: width dv, at offset n dv of a value row of nv.
  const int64_t Dx = d.dv, xrow = d.nv, xhead = d.dv;
  const int64_t XW = H + n_in * Dx;  // width of a gathered [h | xa] row
  const auto opt = x.options();
  const S scale_in = S(1.0 / std::sqrt(double(dk)));
  const S scale_c = S(1.0 / std::sqrt(double(dc)));
  const S keep_in = S(1.0 - d.p_in), keep_c = S(1.0 - d.p_c);

  TeamLease lease;
  Team& team = *lease;
  // Packed communication weights, built per mechanism in parallel:
  // Wc[k] = [comm_query[k] | comm_key[k] | comm_value[k]] (H, C3).
  Tensor Wc = at::empty({K, H, C3}, opt);
  {
    const S* cqp = Cq.const_data_ptr<S>();
    const S* ckp = Ck.const_data_ptr<S>();
    const S* cvp = Cv.const_data_ptr<S>();
    S* wc = Wc.mutable_data_ptr<S>();
    team.run(K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        for (int64_t h = 0; h < H; ++h) {
          S* dst = wc + (k * H + h) * C3;
          std::copy_n(cqp + (k * H + h) * ck, ck, dst);
          std::copy_n(ckp + (k * H + h) * ck, ck, dst + ck);
          std::copy_n(cvp + (k * H + h) * cv, cv, dst + 2 * ck);
        }
      }
    });
  }

  const int64_t Ts = save ? T : 1;                        // per-step buffers: all, or one reused
  const int64_t Tc = save ? T : std::min<int64_t>(T, 2);  // c history: all, or ping-pong
  // Per-step strides (pad64: GEMM operands at one alignment for every t).
  const int64_t eb = static_cast<int64_t>(sizeof(S)), BKH = B * K * H;
  const int64_t so = pad64(BKH, eb), sq = pad64(B * K * nk, eb), sc3 = pad64(B * K * C3, eb);
  Tensor out = at::empty({T, so}, opt);
  Tensor masks = at::empty({T, B, K}, opt.dtype(at::kBool));
  Tensor cs = d.lstm ? at::empty({Tc, B, K, H}, opt) : at::empty({0}, opt);
  Tensor htil = at::empty({Ts, so}, opt);
  Tensor q = at::empty({Ts, sq}, opt);
  Tensor a = at::empty({Ts, B, K, n_in, M}, opt);
  Tensor gates = at::empty({Ts, B, K, GW}, opt);
  Tensor qkv = at::empty({Ts, sc3}, opt);
  Tensor bprob = at::empty({Ts, B, K, n_c, K}, opt);
  Tensor o = at::empty({Ts, B, K, cv}, opt);

  const S* x_p = x.const_data_ptr<S>();
  const S* h0_p = h0.const_data_ptr<S>();
  const S* c0_p = d.lstm ? c0.const_data_ptr<S>() : nullptr;
  const S* keys_p = keys.const_data_ptr<S>();
  const S* whh_p = Whh.const_data_ptr<S>();
  const S* wih_p = Wih.const_data_ptr<S>();
  const S* wq_p = Wq.const_data_ptr<S>();
  const S* wc_p = Wc.const_data_ptr<S>();
  const S* wco_p = Wco.const_data_ptr<S>();
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

  auto tile = [&](int64_t b0, int64_t b1) {
    const int64_t Bt = b1 - b0;
    // Gathered active rows per mechanism (compact (K, Bt, .)), reused every step.
    AlignedVec<S> hx(K * Bt * XW), gg(K * Bt * (d.lstm ? GH : 2 * GH)), og(K * Bt * cv),
        rc(K * Bt * H), hq(Bt * K * H);
    std::vector<S> s(std::max(M, n_c * K)), p(K);
    std::vector<int64_t> cnt(K), idx(K * Bt), pos(Bt * K);
    const int64_t GG = d.lstm ? GH : 2 * GH;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t ts = save ? t : 0;
      const S* hp = t == 0 ? h0_p : out_p + (t - 1) * so;
      const S* cp = !d.lstm ? nullptr : t == 0 ? c0_p : cs_p + ((t - 1) % Tc) * BKH;
      S* cn = d.lstm ? cs_p + (t % Tc) * BKH : nullptr;
      S* qt = q_p + ts * sq;
      S* at_ = a_p + ts * B * K * n_in * M;
      S* gt = gates_p + ts * B * K * GW;
      S* ht = htil_p + ts * so;
      S* qkvt = qkv_p + ts * sc3;
      S* bpt = bp_p + ts * B * K * n_c * K;
      S* ot = o_p + ts * B * K * cv;
      S* outt = out_p + t * so;
      bool* mt = mask_p + t * B * K;
      const S* kt = keys_p + t * B * M * nk;
      const S* xt = x_p + t * B * M * xrow;

      // 1. Queries of every mechanism (its state decides p, active or not); the keys are given.
      // The queries' A operand from an aligned copy: h0 is the caller's tensor at t = 0.
      std::copy_n(hp + b0 * K * H, Bt * K * H, hq.data());
      for (int64_t k = 0; k < K; ++k)
        gemm_rm<S>(Bt, nk, H, hq.data() + k * H, K * H, wq_p + k * H * nk, nk, S(0),
                   qt + (b0 * K + k) * nk, K * nk);
      // 1-2. Scores, null softmax, p and the rank rule, per sample.
      std::fill(cnt.begin(), cnt.end(), 0);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t k = 0; k < K; ++k) {
          S psum = S(0);
          for (int64_t n = 0; n < n_in; ++n) {
            const S* qv = qt + (b * K + k) * nk + n * dk;
            for (int64_t m = 0; m < M; ++m)
              s[m] = dot_n(qv, kt + (b * M + m) * nk + n * dk, dk) * scale_in;
            psum += null_softmax(s.data(), M, at_ + ((b * K + k) * n_in + n) * M);
          }
          p[k] = psum / S(n_in);
        }
        const int64_t bl = b - b0;
        for (int64_t k = 0; k < K; ++k) {
          const bool act = competition_active(p.data(), K, k, d.top_k);
          mt[b * K + k] = act;
          if (act) {
            pos[bl * K + k] = cnt[k];
            idx[k * Bt + cnt[k]++] = bl;
          } else {
            pos[bl * K + k] = -1;
          }
        }
      }

      // 3. Per mechanism: gather [h_{t-1} | xa] of the active rows, one gate GEMM (LSTM; GRU
      // two), cell pointwise (inactive rows copy), then 4.'s Q|K|V GEMM of all its rows.
      for (int64_t k = 0; k < K; ++k) {
        const int64_t nact = cnt[k];
        S* hxk = hx.data() + k * Bt * XW;
        for (int64_t r = 0; r < nact; ++r) {
          const int64_t b = b0 + idx[k * Bt + r];
          S* dst = hxk + r * XW;
          std::copy_n(hp + (b * K + k) * H, H, dst);
          for (int64_t n = 0; n < n_in; ++n) {
            S* xa = dst + H + n * Dx;
            std::fill_n(xa, Dx, S(0));
            for (int64_t m = 0; m < M; ++m) {
              S w = at_[((b * K + k) * n_in + n) * M + m];
              if (d.drop_in())
                w = dropout_keep(d.seed, 0, in_index(d, t, b, k, n, m), float(d.p_in))
                        ? w / keep_in : S(0);
              axpy_n(w, xt + (b * M + m) * xrow + n * xhead, xa, Dx);
            }
          }
        }
        S* ggk = gg.data() + k * Bt * GG;
        // weight_hh[k] and the input rows' weight_ih[k], in place.
        const S* wh = whh_p + k * H * GH;
        const S* wx = wih_p + k * d.nv * GH;
        if (d.lstm) {
          gemm_rm<S>(nact, GH, H, hxk, XW, wh, GH, S(0), ggk, GH);
          gemm_rm<S>(nact, GH, XW - H, hxk + H, XW, wx, GH, S(1), ggk, GH);
        } else {  // gi | gh
          gemm_rm<S>(nact, GH, XW - H, hxk + H, XW, wx, GH, S(0), ggk, 2 * GH);
          gemm_rm<S>(nact, GH, H, hxk, XW, wh, GH, S(0), ggk + GH, 2 * GH);
        }
        const S* bi = bih_p + k * GH;
        const S* bh = bhh_p + k * GH;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t row = b * K + k, r = pos[(b - b0) * K + k];
          S* g = gt + row * GW;
          if (r < 0) {
            std::copy_n(hp + row * H, H, ht + row * H);
            if (d.lstm) std::copy_n(cp + row * H, H, cn + row * H);
            std::fill_n(g, GW, S(0));
            continue;
          }
          const S* src = ggk + r * GG;
          if (d.lstm) {
            for (int64_t j = 0; j < GH; ++j) g[j] = src[j] + (bi[j] + bh[j]);
            lstm_row_fwd(g, cp + row * H, ht + row * H, cn + row * H, H);
          } else {
            S* gh = g + GH;
            for (int64_t j = 0; j < GH; ++j) {
              g[j] = src[j] + bi[j];
              gh[j] = src[GH + j] + bh[j];
            }
            for (int64_t j = 0; j < H; ++j)
              ht[row * H + j] = gru_pointwise_fwd(g[j], g[H + j], g[2 * H + j], gh[j], gh[H + j],
                                                  gh[2 * H + j], hp[row * H + j]);
          }
        }
        gemm_rm<S>(Bt, C3, H, ht + (b0 * K + k) * H, K * H, wc_p + k * H * C3, C3, S(0),
                   qkvt + (b0 * K + k) * C3, K * C3);
      }

      // 4. Communication attention of the active mechanisms, per sample.
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t k = 0; k < K; ++k) {
          const int64_t row = b * K + k, r = pos[(b - b0) * K + k];
          S* orow = ot + row * cv;
          S* brow = bpt + row * n_c * K;
          std::fill_n(orow, cv, S(0));
          if (r < 0) {
            std::fill_n(brow, n_c * K, S(0));
            continue;
          }
          // Scores of all heads, max-shifted per head, one vector exp, normalised per head.
          for (int64_t n = 0; n < n_c; ++n) {
            const S* qc = qkvt + row * C3 + n * dc;
            S* sn = s.data() + n * K;
            for (int64_t j = 0; j < K; ++j)
              sn[j] = dot_n(qc, qkvt + (b * K + j) * C3 + ck + n * dc, dc) * scale_c;
            S mu = sn[0];
            for (int64_t j = 1; j < K; ++j) mu = sn[j] > mu ? sn[j] : mu;
            for (int64_t j = 0; j < K; ++j) sn[j] -= mu;
          }
          exp_inplace(s.data(), n_c * K);
          for (int64_t n = 0; n < n_c; ++n) {
            const S* sn = s.data() + n * K;
            S sum = S(0);
            for (int64_t j = 0; j < K; ++j) sum += sn[j];
            S* y = brow + n * K;
            for (int64_t j = 0; j < K; ++j) y[j] = sn[j] / sum;
            S* on = orow + n * dcv;
            for (int64_t j = 0; j < K; ++j) {
              S w = y[j];
              if (d.drop_c())
                w = dropout_keep(d.seed, 1, comm_index(d, t, b, k, n, j), float(d.p_c))
                        ? w / keep_c : S(0);
              axpy_n(w, qkvt + (b * K + j) * C3 + 2 * ck + n * dcv, on, dcv);
            }
          }
          std::copy_n(orow, cv, og.data() + (k * Bt + r) * cv);
        }

      // 5. h' = h~ + o comm_output on the active rows; inactive rows copy h~.
      for (int64_t k = 0; k < K; ++k) {
        S* rck = rc.data() + k * Bt * H;
        gemm_rm<S>(cnt[k], H, cv, og.data() + k * Bt * cv, cv, wco_p + k * cv * H, H, S(0), rck, H);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t row = b * K + k, r = pos[(b - b0) * K + k];
          const S* src = ht + row * H;
          S* dst = outt + row * H;
          if (r < 0) {
            std::copy_n(src, H, dst);
          } else {
            const S* add = rck + r * H;
            for (int64_t j = 0; j < H; ++j) dst[j] = src[j] + add[j];
          }
        }
      }
    }
  };
  // One tile per thread (tiles of at least 8 samples): no barrier inside the sequence.
  team.run(B, 8, tile);

  Tensor h_n = out[T - 1].narrow(0, 0, BKH).clone().view({B, K, H});
  Tensor c_n = d.lstm ? cs[(T - 1) % Tc].clone() : at::empty({0}, opt);
  Tensor none = at::empty({0}, opt);
  const Tensor out_v = unpad(out, BKH, {T, B, K * H});
  if (!save)
    return {out_v, h_n, c_n, masks, none, none, none, none, none, none, none, none};
  return {out_v, h_n, c_n, masks, cs, unpad(htil, BKH, {T, B, K, H}),
          unpad(q, B * K * nk, {T, B, K, nk}), a, gates, unpad(qkv, B * K * C3, {T, B, K, C3}),
          bprob, o};
}

// Pre-projected input: keys (T, B, M, n_in d_k) and values (T, B, M, n_in d_v) given. Returns
// out, h_n, c_n (empty for GRU), masks, then what the backward needs (empty with save=false).
auto rim_cpu_kv_fwd(const Tensor& keys_, const Tensor& values_, const Tensor& h0_,
                    const std::optional<Tensor>& c0_, const Tensor& input_query,
                    const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& bias_ih,
                    const Tensor& bias_hh, const Tensor& comm_query, const Tensor& comm_key,
                    const Tensor& comm_value, const Tensor& comm_output, int64_t top_k,
                    int64_t input_heads, int64_t comm_heads, double input_dropout,
                    double comm_dropout, int64_t seed, bool /*block_inactive_grad*/, bool save) {
  const Dims d = check_kv_args("rim_cpu_kv_fwd", keys_, values_, h0_, c0_, input_query,
                               weight_ih, weight_hh, bias_ih, bias_hh, comm_query, comm_key,
                               comm_value, comm_output, top_k, input_heads, comm_heads,
                               input_dropout, comm_dropout, seed);
  const Tensor h0 = h0_.contiguous(), c0 = d.lstm ? c0_->contiguous() : Tensor();
  std::vector<Tensor> res;
  AT_DISPATCH_FLOATING_TYPES(keys_.scalar_type(), "rim_cpu_kv_fwd", [&] {
    res = forward_impl<scalar_t>(d, values_.contiguous(), keys_.contiguous(), h0, c0,
                                 input_query.contiguous(), weight_ih.contiguous(),
                                 weight_hh.contiguous(), bias_ih.contiguous(),
                                 bias_hh.contiguous(), comm_query.contiguous(),
                                 comm_key.contiguous(), comm_value.contiguous(),
                                 comm_output.contiguous(), save);
  });
  return to_tuple<12>(res);
}

// ================================= backward =================================
// Barriers per step: 2 team phases, per sample (communication attention backward) and per
// mechanism (everything else, including the head of step t-1 and the mechanism's weight
// gradients of the step). Afterwards: d keys and d values. `x` is the values.
template <typename S>
std::vector<Tensor> backward_impl(const Dims& d, bool block, const Tensor& grad_out,
                                  const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x,
                                  const Tensor& h0, const Tensor& c0, const Tensor& Wq,
                                  const Tensor& Wih, const Tensor& Whh, const Tensor& Wc,
                                  const Tensor& Wco, const Tensor& out, const Tensor& masks,
                                  const Tensor& cs, const Tensor& htil, const Tensor& q,
                                  const Tensor& a, const Tensor& gates, const Tensor& qkv,
                                  const Tensor& bprob, const Tensor& o, const Tensor& keys,
                                  bool factors) {
  const int64_t T = d.T, B = d.B, M = d.M, K = d.K, H = d.H, GH = d.GH, GW = d.GW;
  const int64_t n_in = d.n_in, dk = d.dk, nk = d.nk, n_c = d.n_c, dc = d.dc, dcv = d.dcv;
  const int64_t ck = d.ck, cv = d.cv, C3 = d.C3;
  // Head n reads v_{m,n}: width dv, at offset n dv of a value row of nv.
  const int64_t Dx = d.dv, xrow = d.nv, xhead = d.dv;
  // Head n of mechanism k multiplies weight_ih[k]_n (Dx, GH) at wih_p + k fk + n fn, row stride
  // fr (weight_ih is (K, n_in, d_v, GH)). Its gradient g_Wih has the same layout.
  const int64_t fk = d.nv * GH, fn = d.dv * GH, fr = GH;
  const auto opt = x.options();
  const S scale_in = S(1.0 / std::sqrt(double(dk)));
  const S scale_c = S(1.0 / std::sqrt(double(dc)));
  const S keep_in = S(1.0 - d.p_in), keep_c = S(1.0 - d.p_c);
  const int64_t BKH = B * K * H;
  TeamLease lease;
  Team& team = *lease;
  auto par_over = [&](int64_t n, const auto& f) {
    team.run(n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) f(i);
    });
  };

  // Per-step gradients (one step, reused: the weight gradients are accumulated step by step,
  // each mechanism's by the task that owns it) and the d scores (all steps, for dKEY).
  Tensor dQ = at::empty({B, K, nk}, opt);
  Tensor dS = at::empty({T, B, K, n_in, M}, opt);  // d scores of the input attention
  Tensor dG = at::empty({B, K, GW}, opt);          // LSTM d(i,f,g,o); GRU d(gi) | d(gh)
  Tensor dQKV = at::empty({B, K, C3}, opt);
  Tensor g_Wq = at::zeros({K, H, nk}, opt), g_Whh = at::zeros({K, H, GH}, opt);
  Tensor g_Wc = at::zeros({K, H, C3}, opt), g_Wco = at::zeros({K, cv, H}, opt);
  Tensor g_Wih = at::zeros({K, d.nv, GH}, opt);
  S* gWq_w = g_Wq.mutable_data_ptr<S>();
  S* gWhh_w = g_Whh.mutable_data_ptr<S>();
  S* gWc_w = g_Wc.mutable_data_ptr<S>();
  S* gWco_w = g_Wco.mutable_data_ptr<S>();
  S* gWih_w = g_Wih.mutable_data_ptr<S>();
  // Gathered active rows per mechanism: h_{t-1}, xa = sum_m a~ v_m, the read o.
  Tensor hgb = at::empty({K, B, H}, opt), xag = at::empty({K, B, n_in * Dx}, opt);
  Tensor ogb = at::empty({K, B, cv}, opt);
  S* hgb_w = hgb.mutable_data_ptr<S>();
  S* xag_w = xag.mutable_data_ptr<S>();
  S* ogb_w = ogb.mutable_data_ptr<S>();
  // Carried state gradients and per-step workspaces.
  Tensor dh = grad_h_n.defined() ? grad_h_n.clone() : at::zeros({B, K, H}, opt);
  if (grad_out.defined()) dh.add_(grad_out[T - 1]);
  Tensor dcar = d.lstm ? (grad_c_n.defined() ? grad_c_n.clone() : at::zeros({B, K, H}, opt))
                       : Tensor();
  Tensor dh_next = at::empty({B, K, H}, opt), tmp = at::empty({B, K, H}, opt);
  Tensor dhg = at::empty({K, B, H}, opt), doc = at::empty({K, B, cv}, opt);
  Tensor dgg = at::empty({K, B, GH}, opt), dhc = at::empty({K, B, H}, opt);
  Tensor dgi = at::empty({K, B, GH}, opt), dgfg = at::empty({K, B, n_in * Dx}, opt);
  Tensor dgf = at::empty({T, B, K, n_in, Dx}, opt);  // dgi weight_ih[k]_n^T, 0 on inactive rows
  S* dgi_w = dgi.mutable_data_ptr<S>();
  S* dgfg_w = dgfg.mutable_data_ptr<S>();
  S* dgf_w = dgf.mutable_data_ptr<S>();
  Tensor gbias = at::zeros({K, GW}, opt);
  S* gb_w = gbias.mutable_data_ptr<S>();
  ActiveRows rows(B, K), rows_prev(B, K);
  // factors: the factors of g_Wih = sum over rows of xa^T dgi, per row (T, B, K, n_in*Dx) and
  // (T, B, K, GH), zero on inactive rows, so that a caller that folded weight_ih can form its
  // weights' gradients from them when a call has few rows (rim_cpu.py).
  Tensor xa_h = factors ? at::zeros({T, B, K, n_in * Dx}, opt) : at::empty({0}, opt);
  Tensor dgi_h = factors ? at::zeros({T, B, K, GH}, opt) : at::empty({0}, opt);
  S* xah_w = xa_h.mutable_data_ptr<S>();
  S* dgih_w = dgi_h.mutable_data_ptr<S>();

  const bool* mask_p = masks.const_data_ptr<bool>();
  const S* cs_p = d.lstm ? cs.const_data_ptr<S>() : nullptr;
  const S* out_p = out.const_data_ptr<S>();
  const S* q_p = q.const_data_ptr<S>();
  const S* a_p = a.const_data_ptr<S>();
  const S* gates_p = gates.const_data_ptr<S>();
  const S* qkv_p = qkv.const_data_ptr<S>();
  const S* bp_p = bprob.const_data_ptr<S>();
  const S* keys_p = keys.const_data_ptr<S>();
  const S* wih_p = Wih.const_data_ptr<S>();
  const S* xin_p = x.const_data_ptr<S>();
  S* dQ_p = dQ.mutable_data_ptr<S>();
  S* dS_p = dS.mutable_data_ptr<S>();
  S* dG_p = dG.mutable_data_ptr<S>();
  S* dQKV_p = dQKV.mutable_data_ptr<S>();
  const S* o_p = o.const_data_ptr<S>();
  const S* htil_p = htil.const_data_ptr<S>();
  S* dh_p = dh.mutable_data_ptr<S>();
  S* dc_p = d.lstm ? dcar.mutable_data_ptr<S>() : nullptr;
  S* dhn_p = dh_next.mutable_data_ptr<S>();
  S* dhg_p = dhg.mutable_data_ptr<S>();
  const S* doc_p = doc.const_data_ptr<S>();
  S* dgg_p = dgg.mutable_data_ptr<S>();
  const S* dhc_p = dhc.const_data_ptr<S>();
  const S* tmp_p = tmp.const_data_ptr<S>();
  const S* go_p = grad_out.defined() ? grad_out.const_data_ptr<S>() : nullptr;
  const S* wq_p = Wq.const_data_ptr<S>();
  const S* whh_p = Whh.const_data_ptr<S>();
  const S* wc_p = Wc.const_data_ptr<S>();
  const S* wco_p = Wco.const_data_ptr<S>();
  S* doc_w = doc.mutable_data_ptr<S>();
  S* tmp_w = tmp.mutable_data_ptr<S>();
  S* dhc_w = dhc.mutable_data_ptr<S>();

  // Head of step t for mechanism k (5. backward): dh' of its active rows -> d o = dh' Wco^T.
  // Also g_Wco[k] += o^T dh' over those rows.
  auto head = [&](int64_t t, int64_t k, const ActiveRows& rw) {
    const S* ot = o_p + t * B * K * cv;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = b * K + k, r = rw.pos[row];
      if (r >= 0) {
        std::copy_n(dh_p + row * H, H, dhg_p + (k * B + r) * H);
        std::copy_n(ot + row * cv, cv, ogb_w + (k * B + r) * cv);
      }
    }
    const int64_t n = rw.cnt[k];
    gemm_rm<S>(n, cv, H, dhg_p + k * B * H, H, wco_p + k * cv * H, H, S(0), doc_w + k * B * cv, cv,
               true);
    gemm_rm<S>(cv, H, n, ogb_w + k * B * cv, cv, dhg_p + k * B * H, H, S(1), gWco_w + k * cv * H,
               H, false, true);
  };

  rows.build(mask_p + (T - 1) * B * K, B, K);
  par_over(K, [&](int64_t k) { head(T - 1, k, rows); });
  for (int64_t t = T - 1; t >= 0; --t) {
    const S* hp = t == 0 ? h0.const_data_ptr<S>() : out_p + (t - 1) * BKH;
    const S* cp = !d.lstm ? nullptr : t == 0 ? c0.const_data_ptr<S>() : cs_p + (t - 1) * BKH;

    // 4. Communication attention backward -> d(Q|K|V) of this step, per sample.
    const S* qkvt = qkv_p + t * B * K * C3;
    const S* bpt = bp_p + t * B * K * n_c * K;
    S* dqkvt = dQKV_p;
    team.run(B, 1, [&](int64_t b0, int64_t b1) {
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
              S dot = dot_n(dov, vc, dcv);
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
    const S* gt = gates_p + t * B * K * GW;
    S* dgt = dG_p;
    const S* at_ = a_p + t * B * K * n_in * M;
    const S* kt = keys_p + t * B * M * nk;
    S* dqt = dQ_p;
    S* dst_ = dS_p + t * B * K * n_in * M;
    const S* go = (t > 0 && go_p != nullptr) ? go_p + (t - 1) * BKH : nullptr;
    team.run(K, 1, [&](int64_t k0, int64_t k1) {
      std::vector<S> dht(H), da(M);
      for (int64_t k = k0; k < k1; ++k) {
        gemm_rm<S>(B, H, C3, dQKV_p + k * C3, K * C3, wc_p + k * H * C3, C3, S(0),
                   tmp_w + k * H, K * H, true);
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
          std::copy_n(dg, GH, dgi_w + (k * B + r) * GH);
          S* gbk = gb_w + k * GW;  // bias gradients: sum of the active rows' dg (LSTM: one
          for (int64_t j = 0; j < GW; ++j) gbk[j] += dg[j];  // for both; GRU: d(gi) | d(gh))
        }
        // gi = sum_n xa_n weight_ih[k]_n + bias, xa_n = sum_m a~ v_{m,n}: dgf_n = dgi
        // weight_ih[k]_n^T (active rows, one GEMM per head), d a~ = dgf_n . v_{m,n}; through
        // dropout; null softmax bwd.
        const int64_t cnt = rows.cnt[k];
        const int64_t nD = n_in * Dx;
        for (int64_t n = 0; n < n_in; ++n)
          gemm_rm<S>(cnt, Dx, GH, dgi_w + k * B * GH, GH, wih_p + k * fk + n * fn, fr, S(0),
                     dgfg_w + k * B * nD + n * Dx, nD, true);
        for (int64_t b = 0; b < B; ++b) {
          const int64_t row = b * K + k, r = rows.pos[row];
          S* dgfr = dgf_w + (t * B * K + row) * nD;
          if (r < 0) {
            std::fill_n(dgfr, nD, S(0));
            continue;
          }
          std::copy_n(dgfg_w + (k * B + r) * nD, nD, dgfr);
          std::copy_n(hp + row * H, H, hgb_w + (k * B + r) * H);
          S* xar = xag_w + (k * B + r) * nD;  // xa_n = sum_m a~ v_{m,n}
          std::fill_n(xar, nD, S(0));
          for (int64_t n = 0; n < n_in; ++n)
            for (int64_t m = 0; m < M; ++m) {
              S w = at_[(row * n_in + n) * M + m];
              if (d.drop_in())
                w = dropout_keep(d.seed, 0, in_index(d, t, b, k, n, m), float(d.p_in))
                        ? w / keep_in : S(0);
              const S* xr = xin_p + ((t * B + b) * M + m) * xrow + n * xhead;
              for (int64_t i = 0; i < Dx; ++i) xar[n * Dx + i] += w * xr[i];
            }
          if (factors) {
            std::copy_n(xar, nD, xah_w + (t * B * K + row) * nD);
            std::copy_n(dgi_w + (k * B + r) * GH, GH, dgih_w + (t * B * K + row) * GH);
          }
          S* dqr = dqt + row * nk;
          S* dsr = dst_ + row * n_in * M;
          for (int64_t n = 0; n < n_in; ++n) {
            for (int64_t m = 0; m < M; ++m) {
              S dot = dot_n(dgfr + n * Dx, xin_p + ((t * B + b) * M + m) * xrow + n * xhead, Dx);
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
        gemm_rm<S>(cnt, H, GH, dgg_p + k * B * GH, GH, whh_p + k * H * GH, GH, S(0),
                   dhc_w + k * B * H, H, true);
        gemm_rm<S>(B, H, nk, dQ_p + k * nk, K * nk, wq_p + k * H * nk, nk, S(1),
                   dhn_p + k * H, K * H, true);
        // Weight gradients of this step and mechanism (the task owns k: no race):
        // g_Wq += h_{t-1}^T dq, g_Whh += h_{t-1}^T dgh, g_Wih[k]_n += xa_n^T dgi (active rows),
        // g_Wc += h~^T d(Q|K|V) (all rows).
        gemm_rm<S>(H, nk, B, hp + k * H, K * H, dQ_p + k * nk, K * nk, S(1), gWq_w + k * H * nk, nk,
                   false, true);
        gemm_rm<S>(H, GH, cnt, hgb_w + k * B * H, H, dgg_p + k * B * GH, GH, S(1),
                   gWhh_w + k * H * GH, GH, false, true);
        for (int64_t n = 0; n < n_in; ++n)
          gemm_rm<S>(Dx, GH, cnt, xag_w + k * B * nD + n * Dx, nD, dgi_w + k * B * GH, GH, S(1),
                     gWih_w + k * fk + n * fn, fr, false, true);
        gemm_rm<S>(H, C3, B, htil_p + t * BKH + k * H, K * H, dQKV_p + k * C3, K * C3, S(1),
                   gWc_w + k * H * C3, C3, false, true);
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

  // The weight gradients were accumulated in the sweep; what is left: dKEY, dx (d values).
  const int64_t TB = T * B;
  Tensor ad = a.clone();  // a~: the dropped input probabilities
  if (d.drop_in()) {
    S* ad_p = ad.mutable_data_ptr<S>();
    const int64_t per_t = B * K * n_in * M;
    par_over(T, [&](int64_t t) {
      for (int64_t i = 0; i < per_t; ++i) {
        S& v = ad_p[t * per_t + i];
        v = dropout_keep(d.seed, 0, static_cast<uint64_t>(t * per_t + i), float(d.p_in))
                ? v / keep_in : S(0);
      }
    });
  }
  // dKEY from the d scores.
  Tensor dKEY = at::empty({T, B, M, nk}, opt);
  {
    S* dkey_p = dKEY.mutable_data_ptr<S>();
    par_over(T * B, [&](int64_t tb) {
      S* dkr = dkey_p + tb * M * nk;
      std::fill_n(dkr, M * nk, S(0));
      for (int64_t k = 0; k < K; ++k)
        for (int64_t n = 0; n < n_in; ++n) {
          const S* ds = dS_p + ((tb * K + k) * n_in + n) * M;
          const S* qv = q_p + (tb * K + k) * nk + n * dk;
          for (int64_t m = 0; m < M; ++m) {
            const S g = ds[m] * scale_in;
            S* dkv = dkr + m * nk + n * dk;
            for (int64_t i = 0; i < dk; ++i) dkv[i] += g * qv[i];
          }
        }
    });
  }
  Tensor g_bih = gbias.narrow(1, 0, GH).contiguous();
  Tensor g_bhh = d.lstm ? g_bih.clone() : gbias.narrow(1, GH, GH).contiguous();
  Tensor dx = at::zeros({T, B, M, d.nv}, opt);
  {  // dx_{m, n} = sum_k a~[k,n,m] dgf[k,n]
    const S* ad_p = ad.const_data_ptr<S>();
    const S* dgf_p = dgf.const_data_ptr<S>();
    S* dx_p = dx.mutable_data_ptr<S>();
    par_over(TB, [&](int64_t tb) {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t n = 0; n < n_in; ++n) {
          const S* w = ad_p + ((tb * K + k) * n_in + n) * M;
          const S* src = dgf_p + ((tb * K + k) * n_in + n) * Dx;
          for (int64_t m = 0; m < M; ++m) {
            S* dst = dx_p + (tb * M + m) * xrow + n * xhead;
            for (int64_t i = 0; i < Dx; ++i) dst[i] += w[m] * src[i];
          }
        }
    });
  }
  const Tensor dh0 = dh;  // after the t = 0 step: d h_0 (no grad_out is added there)
  Tensor dc0 = d.lstm ? dcar : at::empty({0}, opt);
  auto parts = g_Wc.split({ck, ck, cv}, -1);
  return {dKEY, dx, dh0, dc0, g_Wq, g_Wih, g_Whh, g_bih, g_bhh, parts[0].contiguous(),
          parts[1].contiguous(), parts[2].contiguous(), g_Wco, xa_h, dgi_h};
}

// What the backward op prepares: the check that the forward saved its activations, the
// incoming gradients (contiguous, grad_out as (T, B, K, H); undefined = zero) and the packed
// communication weights [comm_query | comm_key | comm_value].
struct BwdInputs {
  Tensor out, h_n, c_n, Wc;
};

BwdInputs bwd_inputs(const char* op, const Dims& d, const Tensor& htil,
                     const std::optional<Tensor>& grad_out, const std::optional<Tensor>& grad_h_n,
                     const std::optional<Tensor>& grad_c_n, const Tensor& comm_query,
                     const Tensor& comm_key, const Tensor& comm_value) {
  TORCH_CHECK(htil.dim() == 4 && htil.size(0) == d.T, "rims_fast::", op,
              ": the forward ran with save=False, so nothing was saved for backward");
  auto opt_grad = [](const std::optional<Tensor>& g) {
    return g.has_value() && g->defined() ? g->contiguous() : Tensor();
  };
  BwdInputs r;
  r.out = opt_grad(grad_out);
  if (r.out.defined()) r.out = r.out.view({d.T, d.B, d.K, d.H});
  r.h_n = opt_grad(grad_h_n);
  r.c_n = d.lstm ? opt_grad(grad_c_n) : Tensor();
  r.Wc = at::cat({comm_query, comm_key, comm_value}, -1).contiguous();
  return r;
}

// Gradients of rim_cpu_kv_fwd: (d keys, d values, d h0, d c0, then d of its 9 weights), and with
// `factors` the per-row factors of d weight_ih (xa and d gi; empty otherwise).
auto rim_cpu_kv_bwd(
    const std::optional<Tensor>& grad_out_, const std::optional<Tensor>& grad_h_n_,
    const std::optional<Tensor>& grad_c_n_, const Tensor& keys_, const Tensor& values_,
    const Tensor& h0_, const std::optional<Tensor>& c0_, const Tensor& input_query,
    const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& bias_ih,
    const Tensor& bias_hh, const Tensor& comm_query, const Tensor& comm_key,
    const Tensor& comm_value, const Tensor& comm_output, const Tensor& out, const Tensor& masks,
    const Tensor& cs, const Tensor& htil, const Tensor& q, const Tensor& a, const Tensor& gates,
    const Tensor& qkv, const Tensor& bprob, const Tensor& o, int64_t top_k, int64_t input_heads,
    int64_t comm_heads, double input_dropout, double comm_dropout, int64_t seed,
    bool block_inactive_grad, bool factors) {
  const Dims d = check_kv_args("rim_cpu_kv_bwd", keys_, values_, h0_, c0_, input_query,
                               weight_ih, weight_hh, bias_ih, bias_hh, comm_query, comm_key,
                               comm_value, comm_output, top_k, input_heads, comm_heads,
                               input_dropout, comm_dropout, seed);
  const BwdInputs g = bwd_inputs("rim_cpu_kv_bwd", d, htil, grad_out_, grad_h_n_, grad_c_n_,
                                 comm_query, comm_key, comm_value);
  std::vector<Tensor> res;
  AT_DISPATCH_FLOATING_TYPES(keys_.scalar_type(), "rim_cpu_kv_bwd", [&] {
    res = backward_impl<scalar_t>(
        d, block_inactive_grad, g.out, g.h_n, g.c_n, values_.contiguous(),
        h0_.contiguous(), d.lstm ? c0_->contiguous() : Tensor(), input_query.contiguous(),
        weight_ih.contiguous(), weight_hh.contiguous(), g.Wc,
        comm_output.contiguous(), out.contiguous(), masks.contiguous(), cs.contiguous(),
        htil.contiguous(), q.contiguous(), a.contiguous(), gates.contiguous(), qkv.contiguous(),
        bprob.contiguous(), o.contiguous(), keys_.contiguous(), factors);
  });
  return to_tuple<15>(res);
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
  m.def("rim_cpu_kv_fwd(Tensor keys, Tensor values, Tensor h0, Tensor? c0, Tensor input_query,"
        " Tensor weight_ih, Tensor weight_hh, Tensor bias_ih, Tensor bias_hh, Tensor comm_query,"
        " Tensor comm_key, Tensor comm_value, Tensor comm_output, int top_k, int input_heads,"
        " int comm_heads, float input_dropout, float comm_dropout, int seed,"
        " bool block_inactive_grad, bool save) -> (Tensor out, Tensor h_n, Tensor c_n,"
        " Tensor masks, Tensor cs, Tensor htil, Tensor q, Tensor a, Tensor gates, Tensor qkv,"
        " Tensor bprob, Tensor o)");
  m.def("rim_cpu_kv_bwd(Tensor? grad_out, Tensor? grad_h_n, Tensor? grad_c_n, Tensor keys,"
        " Tensor values, Tensor h0, Tensor? c0, Tensor input_query, Tensor weight_ih,"
        " Tensor weight_hh, Tensor bias_ih, Tensor bias_hh, Tensor comm_query, Tensor comm_key,"
        " Tensor comm_value, Tensor comm_output, Tensor out, Tensor masks, Tensor cs, Tensor htil,"
        " Tensor q, Tensor a, Tensor gates, Tensor qkv, Tensor bprob, Tensor o, int top_k,"
        " int input_heads, int comm_heads, float input_dropout, float comm_dropout, int seed,"
        " bool block_inactive_grad, bool factors=False) -> (Tensor grad_keys, Tensor grad_values,"
        " Tensor grad_h0, Tensor grad_c0, Tensor grad_input_query, Tensor grad_weight_ih,"
        " Tensor grad_weight_hh, Tensor grad_bias_ih, Tensor grad_bias_hh, Tensor grad_comm_query,"
        " Tensor grad_comm_key, Tensor grad_comm_value, Tensor grad_comm_output, Tensor xa,"
        " Tensor dgi)");
  m.def("rim_cpu_dropout_masks(int seed, int T, int B, int K, int input_heads, int M,"
        " int comm_heads, float input_dropout, float comm_dropout) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rims_fast, CPU, m) {
  m.impl("rim_cpu_kv_fwd", &rims::rim_cpu_kv_fwd);
  m.impl("rim_cpu_kv_bwd", &rims::rim_cpu_kv_bwd);
}

// No tensor inputs: registered for every backend, so it needs no dispatch key.
TORCH_LIBRARY_IMPL(rims_fast, CompositeExplicitAutograd, m) {
  m.impl("rim_cpu_dropout_masks", &rims::rim_cpu_dropout_masks);
}
