// Torch-facing declarations of the masked cell op, shared by rims_api.cpp (schemas, CPU
// registration), masked_cell_cpu.cpp and masked_cell.cu.
#pragma once

#include <initializer_list>
#include <tuple>
#include <utility>

#include <ATen/ATen.h>

namespace rims {

// Outputs are always fresh row-major tensors, whatever the inputs' strides (the fake impls in
// rims_fast/masked_cell.py promise exactly this).
inline at::Tensor fresh(const at::Tensor& like) { return at::empty(like.sizes(), like.options()); }

using NamedTensors = std::initializer_list<std::pair<const char*, const at::Tensor*>>;

// Argument checks shared by the CPU and CUDA implementations (defined in rims_api.cpp).
// `gates` are (B, K, G*H) tensors, `states` (B, K, H) ones, mask is (B, K) bool; all float
// tensors share one dtype (float32 or float64) and the device of the first gate tensor.
// Returns H.
int64_t check_masked_cell_args(const char* op, int64_t num_gates, NamedTensors gates,
                               NamedTensors states, const at::Tensor& mask);

std::tuple<at::Tensor, at::Tensor> masked_lstm_cell_fwd_cpu(
    const at::Tensor& gates, const at::Tensor& h, const at::Tensor& c, const at::Tensor& mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_lstm_cell_bwd_cpu(
    const at::Tensor& grad_h_new, const at::Tensor& grad_c_new, const at::Tensor& gates,
    const at::Tensor& c, const at::Tensor& mask);
at::Tensor masked_gru_cell_fwd_cpu(const at::Tensor& gi, const at::Tensor& gh,
                                   const at::Tensor& h, const at::Tensor& mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_gru_cell_bwd_cpu(
    const at::Tensor& grad_h_new, const at::Tensor& gi, const at::Tensor& gh,
    const at::Tensor& h, const at::Tensor& mask);

#ifdef RIMS_FAST_WITH_CUDA
// Compile-time facts of the CUDA translation unit, for build_info() (masked_cell.cu).
int cuda_runtime_version_built();  // CUDART_VERSION, e.g. 13000
const char* cuda_arch_list_built();  // nvcc's __CUDA_ARCH_LIST__, e.g. "800,900"
const char* nvcc_version_built();
#endif

}  // namespace rims
