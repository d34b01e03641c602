// CUDA implementation of rims_fast::rim_steps_fwd (rim_steps_fwd.h): the driver's four phases per
// step as kernels on the current stream, between its ATen (cuBLAS) GEMMs. Registered for the
// CUDA key in rim_steps_fwd.cpp.
#include "rim_seq_cuda.cuh"
#include "rim_steps_fwd.h"

namespace rims {
using namespace seq_cuda;
namespace {

constexpr int kSelectThreads = 128;  // a block per sample: K scores, then K * XW input columns
constexpr int kItemThreads = 256;

template <typename C, typename T>
__global__ void __launch_bounds__(kSelectThreads)
    rim_step_select_kernel(const RimStepParams<T> p, int64_t t) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  rim_step_select<C>(DeviceExec{}, p, t, static_cast<int64_t>(blockIdx.x),
                     reinterpret_cast<C*>(smem_raw));
}

enum class StepPhase { kCell, kComm, kResidual };

// One thread per item, grid-stride (the grid is capped; items are independent).
template <StepPhase P, typename C, typename T>
__global__ void __launch_bounds__(kItemThreads)
    rim_step_items_kernel(const RimStepParams<T> p, int64_t t, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    if constexpr (P == StepPhase::kCell)
      rim_step_cell<C>(p, t, i);
    else if constexpr (P == StepPhase::kComm)
      rim_step_comm<C>(p, t, i);
    else
      rim_step_residual<C>(p, t, i);
  }
}

struct StepCudaDev {
  cudaStream_t stream;

  template <StepPhase P, typename C, typename T>
  void items(const RimStepParams<T>& p, int64_t t, int64_t n) const {
    const int64_t blocks = std::min<int64_t>((n + kItemThreads - 1) / kItemThreads, 65535);
    rim_step_items_kernel<P, C, T><<<static_cast<unsigned>(blocks), kItemThreads, 0, stream>>>(
        p, t, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename C, typename T>
  void select(const RimStepParams<T>& p, int64_t t) const {
    rim_step_select_kernel<C, T><<<static_cast<unsigned>(p.s.B), kSelectThreads,
                                   static_cast<size_t>(2 * p.s.K) * sizeof(C), stream>>>(p, t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename C, typename T>
  void cell(const RimStepParams<T>& p, int64_t t) const {
    items<StepPhase::kCell, C>(p, t, p.s.B * p.s.K * p.s.H);
  }
  template <typename C, typename T>
  void comm(const RimStepParams<T>& p, int64_t t) const {
    items<StepPhase::kComm, C>(p, t, p.s.B * p.s.K * p.s.n_c);
  }
  template <typename C, typename T>
  void residual(const RimStepParams<T>& p, int64_t t) const {
    items<StepPhase::kResidual, C>(p, t, p.s.B * p.s.K * p.s.H);
  }
};

}  // namespace

SeqFwdResult rim_steps_fwd_cuda(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, bool save) {
  const c10::cuda::CUDAGuard guard(h0.device());
  SeqFwdCall c = seq_fwd_prepare(keys, xsrc, w_x, h0, c0, input_query, weight_hh, bias_ih,
                                 bias_hh, comm_query, comm_key, comm_value, comm_output, top_k,
                                 input_heads, comm_heads, per_head, input_dropout, comm_dropout,
                                 seed, /*tile=*/1, save, /*mma=*/false, /*cluster=*/0,
                                 /*resident=*/0);
  const StepCudaDev dev{c10::cuda::getCurrentCUDAStream(h0.get_device()).stream()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h0.scalar_type(), "rim_steps_fwd_cuda",
                                  [&] {
    using T = typename CudaType<scalar_t>::type;
    using C = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    rim_steps_run<C, T>(c, dev);
  });
  return c.res;
}

}  // namespace rims
