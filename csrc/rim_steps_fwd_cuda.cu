// CUDA implementation of rims_fast::rim_steps_fwd (rim_steps_fwd.h): the driver's four phases per
// step as kernels on the current stream (rim_steps_cuda.cuh), between its ATen (cuBLAS) GEMMs.
// Registered for the CUDA key in rim_steps_fwd.cpp.
#include "rim_steps_cuda.cuh"
#include "rim_steps_fwd.h"

namespace rims {
using namespace steps_cuda;
namespace {

template <typename C, typename T>
struct SelectPhase {
  RimStepParams<T> p;
  int64_t t;
  __device__ void operator()(const seq_cuda::DeviceExec& ex, int64_t b, unsigned char* smem) const {
    rim_step_select<C>(ex, p, t, b, reinterpret_cast<C*>(smem));
  }
};
template <typename C, typename T>
struct CellPhase {
  RimStepParams<T> p;
  int64_t t;
  __device__ void operator()(int64_t i) const { rim_step_cell<C>(p, t, i); }
};
template <typename C, typename T>
struct CommPhase {
  RimStepParams<T> p;
  int64_t t;
  __device__ void operator()(const seq_cuda::DeviceExec& ex, int64_t b, unsigned char*) const {
    rim_step_comm<C>(ex, p, t, b);
  }
};
template <typename C, typename T>
struct ResidualPhase {
  RimStepParams<T> p;
  int64_t t;
  __device__ void operator()(int64_t i) const { rim_step_residual<C>(p, t, i); }
};

struct StepCudaDev {
  cudaStream_t stream;

  template <typename C, typename T>
  void select(const RimStepParams<T>& p, int64_t t) const {
    for_samples(SelectPhase<C, T>{p, t}, p.s.B,
                static_cast<size_t>(rim_step_select_smem_elems(p.s, sizeof(C))) * sizeof(C),
                stream);
  }
  template <typename C, typename T>
  void cell(const RimStepParams<T>& p, int64_t t) const {
    for_items(CellPhase<C, T>{p, t}, p.s.B * p.s.K * p.s.H, stream);
  }
  template <typename C, typename T>
  void comm(const RimStepParams<T>& p, int64_t t) const {
    for_samples(CommPhase<C, T>{p, t}, p.s.B, 0, stream);
  }
  template <typename C, typename T>
  void residual(const RimStepParams<T>& p, int64_t t) const {
    for_items(ResidualPhase<C, T>{p, t}, p.s.B * p.s.K * p.s.H, stream);
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
                                 /*resident=*/0, /*xw=*/0);
  const StepCudaDev dev{c10::cuda::getCurrentCUDAStream(h0.get_device()).stream()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h0.scalar_type(), "rim_steps_fwd_cuda",
                                  [&] {
    using T = typename seq_cuda::CudaType<scalar_t>::type;
    using C = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    rim_steps_run<C, T>(c, dev);
  });
  return c.res;
}

}  // namespace rims
