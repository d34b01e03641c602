// Op schemas, argument checks and CPU registration of rims_fast's C++ ops, plus the tiny Python
// module rims_fast._C (build_info). CUDA implementations register themselves in masked_cell.cu.
#include <string>

#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include "masked_cell.h"

namespace rims {

int64_t check_masked_cell_args(const char* op, int64_t num_gates, NamedTensors gates,
                               NamedTensors states, const at::Tensor& mask) {
  // Plain variables, not a structured binding: C++17 lambdas cannot capture those.
  const char* ref_name = gates.begin()->first;
  const at::Tensor* ref = gates.begin()->second;
  for (const auto& [name, t] : gates)
    TORCH_CHECK(t->defined(), "rims_fast::", op, ": ", name, " is undefined");
  for (const auto& [name, t] : states)
    TORCH_CHECK(t->defined(), "rims_fast::", op, ": ", name, " is undefined");
  TORCH_CHECK(mask.defined(), "rims_fast::", op, ": mask is undefined");

  const auto dtype = ref->scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "rims_fast::", op, ": ", ref_name,
              " must be float32 or float64 (no other dtype is supported), got ", dtype);
  TORCH_CHECK(ref->dim() == 3, "rims_fast::", op, ": ", ref_name, " must have dim 3 (B, K, ",
              num_gates, "*H), got shape ", ref->sizes());
  const int64_t B = ref->size(0), K = ref->size(1), GH = ref->size(2);
  TORCH_CHECK(GH % num_gates == 0, "rims_fast::", op, ": the last dim of ", ref_name,
              " must be ", num_gates, "*H, got shape ", ref->sizes());
  const int64_t H = GH / num_gates;

  auto check = [&](const char* name, const at::Tensor& t, at::IntArrayRef expected) {
    TORCH_CHECK(t.scalar_type() == dtype, "rims_fast::", op, ": ", name, " must have dtype ",
                dtype, " like ", ref_name, ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == ref->device(), "rims_fast::", op, ": ", name, " is on ",
                t.device(), " but ", ref_name, " is on ", ref->device());
    TORCH_CHECK(t.sizes() == expected, "rims_fast::", op, ": ", name, " must have shape ",
                expected, ", got shape ", t.sizes());
  };
  for (const auto& [name, t] : gates) check(name, *t, {B, K, GH});
  for (const auto& [name, t] : states) check(name, *t, {B, K, H});
  TORCH_CHECK(mask.scalar_type() == at::kBool, "rims_fast::", op,
              ": mask must have dtype bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.device() == ref->device(), "rims_fast::", op, ": mask is on ", mask.device(),
              " but ", ref_name, " is on ", ref->device());
  TORCH_CHECK(mask.sizes() == at::IntArrayRef({B, K}), "rims_fast::", op,
              ": mask must have shape ", at::IntArrayRef({B, K}), ", got shape ", mask.sizes());
  return H;
}

}  // namespace rims

TORCH_LIBRARY(rims_fast, m) {
  // Fake (meta) kernels and autograd formulas are registered from Python in this module.
  m.set_python_module("rims_fast.masked_cell");
  m.def("masked_lstm_cell_fwd(Tensor gates, Tensor h, Tensor c, Tensor mask)"
        " -> (Tensor h_new, Tensor c_new)");
  m.def("masked_lstm_cell_bwd(Tensor grad_h_new, Tensor grad_c_new, Tensor gates, Tensor c,"
        " Tensor mask) -> (Tensor grad_gates, Tensor grad_h, Tensor grad_c)");
  m.def("masked_gru_cell_fwd(Tensor gi, Tensor gh, Tensor h, Tensor mask) -> Tensor h_new");
  m.def("masked_gru_cell_bwd(Tensor grad_h_new, Tensor gi, Tensor gh, Tensor h, Tensor mask)"
        " -> (Tensor grad_gi, Tensor grad_gh, Tensor grad_h)");
}

TORCH_LIBRARY_IMPL(rims_fast, CPU, m) {
  m.impl("masked_lstm_cell_fwd", &rims::masked_lstm_cell_fwd_cpu);
  m.impl("masked_lstm_cell_bwd", &rims::masked_lstm_cell_bwd_cpu);
  m.impl("masked_gru_cell_fwd", &rims::masked_gru_cell_fwd_cpu);
  m.impl("masked_gru_cell_bwd", &rims::masked_gru_cell_bwd_cpu);
}

namespace {

// What this binary was compiled against, so a mismatch with the running torch can be named.
pybind11::dict build_info() {
  pybind11::dict d;
  d["torch"] = TORCH_VERSION;
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
#ifdef RIMS_FAST_WITH_CUDA
  const int v = rims::cuda_runtime_version_built();
  d["cuda"] = std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
  d["cuda_arch_list"] = rims::cuda_arch_list_built();
  d["nvcc"] = rims::nvcc_version_built();
#else
  d["cuda"] = pybind11::none();
  d["cuda_arch_list"] = pybind11::none();
  d["nvcc"] = pybind11::none();
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rims_fast compiled ops (registered under torch.ops.rims_fast)";
  m.def("build_info", &build_info,
        "Versions this extension was built with: torch, cuda (None for a CPU-only build), "
        "cuda_arch_list, nvcc, compiler.");
}
