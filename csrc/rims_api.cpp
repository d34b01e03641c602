// Op schemas, argument checks and CPU registration of rims_fast's C++ ops, plus the tiny Python
// module rims_fast._C (build_info, and _set_phase_clock for tools/phase_clocks.py). CUDA
// implementations register themselves in masked_cell.cu.
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include "masked_cell.h"
#include "rim_seq_fwd.h"  // seq_phase_clock

namespace rims {

namespace {

// One tensor against the reference: dtype, device, then exact shape. `expected` always views a
// named std::array of the caller (never a braced temporary), so it outlives every use here,
// including the error message built by a failing TORCH_CHECK.
void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                const at::Tensor& ref, c10::IntArrayRef expected) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "rims_fast::", op, ": ", name,
              " must have dtype ", ref.scalar_type(), " like ", ref_name, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "rims_fast::", op, ": ", name, " is on ", t.device(),
              " but ", ref_name, " is on ", ref.device());
  TORCH_CHECK(t.sizes().equals(expected), "rims_fast::", op, ": ", name, " must have shape ",
              expected, ", got shape ", t.sizes());
}

}  // namespace

int64_t check_masked_cell_args(const char* op, int64_t num_gates, NamedTensors gates,
                               NamedTensors states, const at::Tensor& mask) {
  TORCH_CHECK(gates.size() > 0, "rims_fast::", op, ": no gate tensor given");
  const char* const ref_name = gates.begin()->first;
  const at::Tensor& ref = *gates.begin()->second;
  for (const auto& entry : gates)
    TORCH_CHECK(entry.second->defined(), "rims_fast::", op, ": ", entry.first, " is undefined");
  for (const auto& entry : states)
    TORCH_CHECK(entry.second->defined(), "rims_fast::", op, ": ", entry.first, " is undefined");
  TORCH_CHECK(mask.defined(), "rims_fast::", op, ": mask is undefined");

  const at::ScalarType dtype = ref.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "rims_fast::", op, ": ", ref_name,
              " must be float32 or float64 (no other dtype is supported), got ", dtype);
  TORCH_CHECK(ref.dim() == 3, "rims_fast::", op, ": ", ref_name, " must have dim 3 (B, K, ",
              num_gates, "*H), got shape ", ref.sizes());
  const int64_t B = ref.size(0), K = ref.size(1), GH = ref.size(2);
  TORCH_CHECK(GH % num_gates == 0, "rims_fast::", op, ": the last dim of ", ref_name,
              " must be ", num_gates, "*H, got shape ", ref.sizes());
  const int64_t H = GH / num_gates;

  // Expected shapes as named locals: every IntArrayRef below views one of these.
  const std::array<int64_t, 3> gate_shape{B, K, GH};
  const std::array<int64_t, 3> state_shape{B, K, H};
  const std::array<int64_t, 2> mask_shape{B, K};
  for (const auto& entry : gates)
    check_like(op, entry.first, *entry.second, ref_name, ref, gate_shape);
  for (const auto& entry : states)
    check_like(op, entry.first, *entry.second, ref_name, ref, state_shape);
  TORCH_CHECK(mask.scalar_type() == at::kBool, "rims_fast::", op,
              ": mask must have dtype bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.device() == ref.device(), "rims_fast::", op, ": mask is on ", mask.device(),
              " but ", ref_name, " is on ", ref.device());
  const c10::IntArrayRef mask_expected(mask_shape);
  TORCH_CHECK(mask.sizes().equals(mask_expected), "rims_fast::", op, ": mask must have shape ",
              mask_expected, ", got shape ", mask.sizes());
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

// Debug: route the persistent CUDA kernels' phase timing into `buf` (a contiguous int64 CUDA
// tensor of at least 2 * kPhaseSlots counters: the forward's, then the backward's), or stop
// (None). The caller keeps buf alive while it is set and reads it after synchronising. Launches
// on other devices are not timed; a CUDA graph captured while it is set keeps the address.
void set_phase_clock(const std::optional<at::Tensor>& buf) {
  if (!buf.has_value()) {
    rims::seq_phase_clock(0) = rims::seq_phase_clock(1) = nullptr;
    return;
  }
  const at::Tensor& b = *buf;
  TORCH_CHECK(b.is_cuda() && b.scalar_type() == at::kLong && b.is_contiguous() &&
                  b.numel() >= 2 * rims::kPhaseSlots,
              "_set_phase_clock: needs a contiguous int64 CUDA tensor of at least ",
              2 * rims::kPhaseSlots, " elements, got ", b.scalar_type(), " on ", b.device(),
              " with ", b.numel());
  auto* p = reinterpret_cast<unsigned long long*>(b.data_ptr<int64_t>());
  rims::seq_phase_clock_device() = b.get_device();
  rims::seq_phase_clock(0) = p;
  rims::seq_phase_clock(1) = p + rims::kPhaseSlots;
}

// Test hook (tests/test_host_item_order.py): the order of a phase's items in the host runs of the
// CUDA ops' tile functions (kernels/host_exec.h). Returns the previous order.
int set_host_item_order(int mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2,
              "_set_host_item_order: mode must be 0 (in order), 1 (reversed) or 2 (permuted), got ",
              mode);
  const int old = rims::host_item_order().load();
  rims::set_host_item_order(mode);
  return old;
}

// Test hook (tests/test_host_lanes.py): lanes per warp item in the host runs of the CUDA ops'
// tile functions, 1 or 32 (kernels/host_exec.h). Returns the previous value.
int set_host_warp_lanes(int lanes) {
  TORCH_CHECK(lanes == 1 || lanes == rims::kHostWarpLanes,
              "_set_host_warp_lanes: lanes must be 1 or ", rims::kHostWarpLanes, ", got ", lanes);
  return rims::host_warp_lanes().exchange(lanes);
}

// Test hook: the item order one phase of n items runs in under the current order (the indices as
// HostExec visits them), so that a test can see that the order is applied.
std::vector<int> host_item_order_probe(int n) {
  TORCH_CHECK(n >= 0, "_host_item_order_probe: n must be >= 0, got ", n);
  std::vector<int> seen;
  rims::HostExec{}.parallel_for(n, [&](int i) { seen.push_back(i); });
  return seen;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rims_fast compiled ops (registered under torch.ops.rims_fast)";
  m.def("build_info", &build_info,
        "Versions this extension was built with: torch, cuda (None for a CPU-only build), "
        "cuda_arch_list, nvcc, compiler.");
  m.def("_set_phase_clock", &set_phase_clock, pybind11::arg("buf"),
        "Debug (tools/phase_clocks.py): per-phase clock64() cycles of the persistent CUDA "
        "kernels' launches are added into buf (int64 CUDA, 2 x 64 counters: forward, backward; "
        "slot 63 of each counts block-steps; launches on buf's device only, CUDA-core kernels "
        "only; a graph captured meanwhile keeps the address); None stops.");
  m.def("_set_host_item_order", &set_host_item_order, pybind11::arg("mode"),
        "Test hook: order of each phase's items when the CUDA ops' kernels run on the host "
        "(CPU tensors): 0 in order, 1 reversed, 2 a permutation that changes every phase. "
        "A race-free kernel gives the same bits in all three. Returns the previous mode.");
  m.def("_set_host_warp_lanes", &set_host_warp_lanes, pybind11::arg("lanes"),
        "Test hook: lanes per warp item when the CUDA ops' kernels run on the host: 1 (one call "
        "per item) or 32 (one host thread per lane, reductions combined as the device's "
        "shuffles). Returns the previous value.");
  m.def("_host_item_order_probe", &host_item_order_probe, pybind11::arg("n"),
        "Test hook: the indices one host phase of n items visits, in order, under the current "
        "_set_host_item_order mode.");
}
