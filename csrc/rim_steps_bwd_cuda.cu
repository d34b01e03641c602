// CUDA implementation of rims_fast::rim_steps_bwd (rim_steps_bwd.h): the driver's phases per step
// as kernels on the current stream (rim_steps_cuda.cuh), between its ATen (cuBLAS) GEMMs.
// Registered for the CUDA key in rim_steps_bwd.cpp.
#include "rim_steps_bwd.h"
#include "rim_steps_cuda.cuh"

namespace rims {
using namespace steps_cuda;
namespace {

template <typename C, typename T>
struct InitPhase {
  RimStepBwdParams<T> p;
  __device__ void operator()(int64_t i) const { rim_step_bwd_init<C>(p, i); }
};
template <typename C, typename T>
struct CommBwdPhase {
  RimStepBwdParams<T> p;
  int64_t t;
  __device__ void operator()(const seq_cuda::DeviceExec& ex, int64_t b, unsigned char* smem) const {
    rim_step_comm_bwd<C>(ex, p, t, b, reinterpret_cast<C*>(smem));
  }
};
template <typename C, typename T>
struct CellBwdPhase {
  RimStepBwdParams<T> p;
  int64_t t;
  __device__ void operator()(int64_t i) const { rim_step_cell_bwd<C>(p, t, i); }
};
template <typename C, typename T>
struct SelectBwdPhase {
  RimStepBwdParams<T> p;
  int64_t t;
  __device__ void operator()(const seq_cuda::DeviceExec& ex, int64_t b, unsigned char* smem) const {
    rim_step_select_bwd<C>(ex, p, t, b, reinterpret_cast<C*>(smem));
  }
};
template <typename C, typename T>
struct DhFinalPhase {
  RimStepBwdParams<T> p;
  int64_t t;
  __device__ void operator()(int64_t i) const { rim_step_dh_final<C>(p, t, i); }
};

struct StepBwdCudaDev {
  cudaStream_t stream;
  bool pdl;  // use_pdl

  template <typename C, typename T>
  void init(const RimStepBwdParams<T>& p) const {
    for_items(InitPhase<C, T>{p}, p.s.B * p.s.K * p.s.H, stream, pdl);
  }
  template <typename C, typename T>
  void comm_bwd(const RimStepBwdParams<T>& p, int64_t t) const {
    for_samples<kPhaseThreads>(CommBwdPhase<C, T>{p, t}, p.s.B,
                static_cast<size_t>(rim_step_comm_bwd_smem_elems(p.s, sizeof(C))) * sizeof(C),
                stream, pdl);
  }
  template <typename C, typename T>
  void cell_bwd(const RimStepBwdParams<T>& p, int64_t t) const {
    for_items(CellBwdPhase<C, T>{p, t}, p.s.B * p.s.K * p.s.H, stream, pdl);
  }
  template <typename C, typename T>
  void select_bwd(const RimStepBwdParams<T>& p, int64_t t) const {
    for_samples<kPhaseThreads>(SelectBwdPhase<C, T>{p, t}, p.s.B,
                static_cast<size_t>(rim_step_select_bwd_smem_elems(p.s, sizeof(C))) * sizeof(C),
                stream, pdl);
  }
  template <typename C, typename T>
  void dh_final(const RimStepBwdParams<T>& p, int64_t t) const {
    for_items(DhFinalPhase<C, T>{p, t}, p.s.B * p.s.K * p.s.H, stream, pdl);
  }
};

}  // namespace

SeqBwdResult rim_steps_bwd_cuda(
    const std::optional<at::Tensor>& g_out, const std::optional<at::Tensor>& g_hn,
    const std::optional<at::Tensor>& g_cn, const at::Tensor& keys, const at::Tensor& xsrc,
    const at::Tensor& w_x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& input_query, const at::Tensor& weight_hh, const at::Tensor& bias_ih,
    const at::Tensor& bias_hh, const at::Tensor& comm_query, const at::Tensor& comm_key,
    const at::Tensor& comm_value, const at::Tensor& comm_output, const at::Tensor& masks,
    at::TensorList saved, int64_t top_k, int64_t input_heads, int64_t comm_heads, bool per_head,
    double input_dropout, double comm_dropout, int64_t seed, bool block_inactive_grad) {
  const c10::cuda::CUDAGuard guard(h0.device());
  SeqBwdCall c = seq_bwd_prepare(g_out, g_hn, g_cn, keys, xsrc, w_x, h0, c0, input_query,
                                 weight_hh, bias_ih, bias_hh, comm_query, comm_key, comm_value,
                                 comm_output, masks, saved, top_k, input_heads, comm_heads,
                                 per_head, input_dropout, comm_dropout, seed, block_inactive_grad,
                                 /*tile=*/1, /*mma=*/false, /*xw=*/0);
  const StepBwdCudaDev dev{c10::cuda::getCurrentCUDAStream(h0.get_device()).stream(),
                           use_pdl(h0.get_device())};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h0.scalar_type(), "rim_steps_bwd_cuda",
                                  [&] {
    using T = typename seq_cuda::CudaType<scalar_t>::type;
    using C = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    rim_steps_bwd_run<C, T>(c, w_x, dev);
  });
  return c.res;
}

}  // namespace rims
