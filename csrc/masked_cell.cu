// CUDA implementation of the masked LSTM / GRU cell ops: one thread per (row, j) element running
// the shared element functions of kernels/masked_cell.cuh. Registered for the CUDA dispatch key
// here; schemas and argument checks live in rims_api.cpp.
#include <algorithm>

#include <ATen/Dispatch.h>
// c10's stream API rather than ATen/cuda/CUDAContext.h, which needs cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "kernels/masked_cell.cuh"
#include "masked_cell.h"

namespace rims {
namespace {

constexpr int kThreads = 256;

// Grid-stride loop over rows * H elements: consecutive threads touch consecutive j of a row,
// so loads and stores are coalesced. Memory bound: no shared memory, no tiling.
template <typename Params, void (*Element)(const Params&, int64_t, int64_t)>
__global__ void __launch_bounds__(kThreads) masked_cell_kernel(const Params p) {
  const int64_t total = p.rows * p.hidden;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += step) {
    Element(p, idx / p.hidden, idx % p.hidden);
  }
}

template <typename Params, void (*Element)(const Params&, int64_t, int64_t)>
void launch(const Params& p) {
  const int64_t total = p.rows * p.hidden;
  if (total == 0) return;
  // Enough blocks to fill any current GPU; the grid-stride loop covers the rest.
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 16);
  masked_cell_kernel<Params, Element>
      <<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> masked_lstm_cell_fwd_cuda(
    const at::Tensor& gates_, const at::Tensor& h_, const at::Tensor& c_, const at::Tensor& mask_) {
  const int64_t H = check_masked_cell_args("masked_lstm_cell_fwd", 4, {{"gates", &gates_}},
                                           {{"h", &h_}, {"c", &c_}}, mask_);
  const c10::cuda::OptionalCUDAGuard guard(gates_.device());
  const auto gates = gates_.contiguous(), h = h_.contiguous(), c = c_.contiguous();
  const auto mask = mask_.contiguous();
  auto h_new = fresh(h), c_new = fresh(c);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "masked_lstm_cell_fwd_cuda", [&] {
    using P = MaskedLstmFwdParams<scalar_t>;
    P p{gates.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
        c.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
        h_new.mutable_data_ptr<scalar_t>(), c_new.mutable_data_ptr<scalar_t>(),
        mask.numel(), H, 4 * H, H};
    launch<P, masked_lstm_fwd_element<scalar_t>>(p);
  });
  return {h_new, c_new};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_lstm_cell_bwd_cuda(
    const at::Tensor& grad_h_new_, const at::Tensor& grad_c_new_, const at::Tensor& gates_,
    const at::Tensor& c_, const at::Tensor& mask_) {
  const int64_t H = check_masked_cell_args(
      "masked_lstm_cell_bwd", 4, {{"gates", &gates_}},
      {{"grad_h_new", &grad_h_new_}, {"grad_c_new", &grad_c_new_}, {"c", &c_}}, mask_);
  const c10::cuda::OptionalCUDAGuard guard(gates_.device());
  const auto gh = grad_h_new_.contiguous(), gc = grad_c_new_.contiguous();
  const auto gates = gates_.contiguous(), c = c_.contiguous(), mask = mask_.contiguous();
  auto grad_gates = fresh(gates), grad_h = fresh(c), grad_c = fresh(c);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "masked_lstm_cell_bwd_cuda", [&] {
    using P = MaskedLstmBwdParams<scalar_t>;
    P p{gh.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
        gates.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(),
        mask.const_data_ptr<bool>(), grad_gates.mutable_data_ptr<scalar_t>(),
        grad_h.mutable_data_ptr<scalar_t>(), grad_c.mutable_data_ptr<scalar_t>(),
        mask.numel(), H, 4 * H, H};
    launch<P, masked_lstm_bwd_element<scalar_t>>(p);
  });
  return {grad_gates, grad_h, grad_c};
}

at::Tensor masked_gru_cell_fwd_cuda(const at::Tensor& gi_, const at::Tensor& gh_,
                                    const at::Tensor& h_, const at::Tensor& mask_) {
  const int64_t H = check_masked_cell_args("masked_gru_cell_fwd", 3, {{"gi", &gi_}, {"gh", &gh_}},
                                           {{"h", &h_}}, mask_);
  const c10::cuda::OptionalCUDAGuard guard(gi_.device());
  const auto gi = gi_.contiguous(), gh = gh_.contiguous(), h = h_.contiguous();
  const auto mask = mask_.contiguous();
  auto h_new = fresh(h);
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "masked_gru_cell_fwd_cuda", [&] {
    using P = MaskedGruFwdParams<scalar_t>;
    P p{gi.const_data_ptr<scalar_t>(), gh.const_data_ptr<scalar_t>(),
        h.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
        h_new.mutable_data_ptr<scalar_t>(), mask.numel(), H, 3 * H, H};
    launch<P, masked_gru_fwd_element<scalar_t>>(p);
  });
  return h_new;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_gru_cell_bwd_cuda(
    const at::Tensor& grad_h_new_, const at::Tensor& gi_, const at::Tensor& gh_,
    const at::Tensor& h_, const at::Tensor& mask_) {
  const int64_t H = check_masked_cell_args("masked_gru_cell_bwd", 3, {{"gi", &gi_}, {"gh", &gh_}},
                                           {{"grad_h_new", &grad_h_new_}, {"h", &h_}}, mask_);
  const c10::cuda::OptionalCUDAGuard guard(gi_.device());
  const auto g = grad_h_new_.contiguous(), gi = gi_.contiguous(), gh = gh_.contiguous();
  const auto h = h_.contiguous(), mask = mask_.contiguous();
  auto grad_gi = fresh(gi), grad_gh = fresh(gh), grad_h = fresh(h);
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "masked_gru_cell_bwd_cuda", [&] {
    using P = MaskedGruBwdParams<scalar_t>;
    P p{g.const_data_ptr<scalar_t>(), gi.const_data_ptr<scalar_t>(),
        gh.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
        mask.const_data_ptr<bool>(), grad_gi.mutable_data_ptr<scalar_t>(),
        grad_gh.mutable_data_ptr<scalar_t>(), grad_h.mutable_data_ptr<scalar_t>(),
        mask.numel(), H, 3 * H, H};
    launch<P, masked_gru_bwd_element<scalar_t>>(p);
  });
  return {grad_gi, grad_gh, grad_h};
}

#define RIMS_STR_(...) #__VA_ARGS__  // variadic: __CUDA_ARCH_LIST__ holds commas
#define RIMS_STR(...) RIMS_STR_(__VA_ARGS__)

}  // namespace

int cuda_runtime_version_built() { return CUDART_VERSION; }

const char* cuda_arch_list_built() {
#ifdef __CUDA_ARCH_LIST__
  return RIMS_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

const char* nvcc_version_built() {
  return RIMS_STR(__CUDACC_VER_MAJOR__) "." RIMS_STR(__CUDACC_VER_MINOR__) "." RIMS_STR(
      __CUDACC_VER_BUILD__);
}

}  // namespace rims

TORCH_LIBRARY_IMPL(rims_fast, CUDA, m) {
  m.impl("masked_lstm_cell_fwd", &rims::masked_lstm_cell_fwd_cuda);
  m.impl("masked_lstm_cell_bwd", &rims::masked_lstm_cell_bwd_cuda);
  m.impl("masked_gru_cell_fwd", &rims::masked_gru_cell_fwd_cuda);
  m.impl("masked_gru_cell_bwd", &rims::masked_gru_cell_bwd_cuda);
}
