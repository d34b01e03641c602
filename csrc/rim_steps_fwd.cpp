// rims_fast::rim_steps_fwd — the stepped forward (rim_steps_fwd.h, kernels/rim_step_fwd.cuh):
// the schema, and the CPU implementation, which runs the same driver with the phases as host
// loops. Like rim_seq_fwd's, it exists so that CI checks the arithmetic without a GPU; it is
// not a fast path (backend="cpu" is).
#include "rim_steps_fwd.h"

#include <torch/library.h>

#include <vector>

#include "steps_host.h"

namespace rims {
namespace {

// The phases of one step on the host: items one by one (every barrier holds trivially), in
// host_item_order(); each sample's shared memory starts as NaN and is guarded (host_exec.h).
struct StepHostDev {
  template <typename T>
  StepFusion fusion(const RimSeqDims& d) const {
    return use_fused(d);
  }
  template <typename C, typename T>
  void select(const RimStepParams<T>& p, int64_t t) const {
    const int64_t n = rim_step_select_smem_elems(p.s, sizeof(C));
    run_host_samples<C>("rim_step_select", t, p.s.B, n, [&](int64_t b, C* smem) {
      rim_step_select<C>(HostExec{}, p, t, b, smem);
    });
  }
  template <typename C, typename T>
  void cell(const RimStepParams<T>& p, int64_t t) const {
    host_grid_for(p.s.B * p.s.K * p.s.H, [&](int64_t i) { rim_step_cell<C>(p, t, i); });
  }
  // The fused kernels' blocks (step_mma.cuh's grid).
  template <typename C, typename T, class F>
  static void fused_blocks(const char* name, const StepMmaGrid& g, int64_t t, const F& f) {
    run_host_samples<C>(name, t, g.blocks(sizeof(T)), g.smem_elems(sizeof(C), sizeof(T)), f);
  }
  template <typename C, typename T>
  void gates_cell(const RimStepParams<T>& p, int64_t t) const {
    fused_blocks<C, T>("rim_step_gates_cell", rim_step_gates_grid(p.s), t,
                       [&](int64_t blk, C* smem) {
      rim_step_gates_cell<C>(HostExec{}, p, t, blk, smem);
    });
  }
  template <typename C, typename T>
  void output_residual(const RimStepParams<T>& p, int64_t t) const {
    fused_blocks<C, T>("rim_step_output_residual", rim_step_output_grid(p.s), t,
                       [&](int64_t blk, C* smem) {
      rim_step_output_residual<C>(HostExec{}, p, t, blk, smem);
    });
  }
  template <typename C, typename T>
  void comm(const RimStepParams<T>& p, int64_t t) const {
    const int64_t n = rim_step_comm_smem_elems(p.s, sizeof(C));
    run_host_samples<C>("rim_step_comm", t, p.s.B, n, [&](int64_t b, C* smem) {
      rim_step_comm<C>(HostExec{}, p, t, b, smem);
    });
  }
  template <typename C, typename T>
  void residual(const RimStepParams<T>& p, int64_t t) const {
    host_grid_for(p.s.B * p.s.K * p.s.H, [&](int64_t i) { rim_step_residual<C>(p, t, i); });
  }
};

SeqFwdResult rim_steps_fwd_cpu(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, bool save) {
  SeqFwdCall c = seq_fwd_prepare(keys, xsrc, w_x, h0, c0, input_query, weight_hh, bias_ih,
                                 bias_hh, comm_query, comm_key, comm_value, comm_output, top_k,
                                 input_heads, comm_heads, per_head, input_dropout, comm_dropout,
                                 seed, /*tile=*/1, save, /*mma=*/false, /*cluster=*/0,
                                 /*resident=*/0, /*xw=*/0);
  const auto st = h0.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "rims_fast::rim_steps_fwd: the CPU "
              "implementation (the phases as host loops, for tests) takes float32 and float64, "
              "got ", st);
  AT_DISPATCH_FLOATING_TYPES(st, "rim_steps_fwd_cpu", [&] {
    rim_steps_run<scalar_t, scalar_t>(c, StepHostDev{});
  });
  return c.res;
}

}  // namespace
}  // namespace rims

TORCH_LIBRARY_FRAGMENT(rims_fast, m) {
  m.def("rim_steps_fwd(Tensor keys, Tensor xsrc, Tensor w_x, Tensor h0, Tensor? c0,"
        " Tensor input_query, Tensor weight_hh, Tensor bias_ih, Tensor bias_hh,"
        " Tensor comm_query, Tensor comm_key, Tensor comm_value, Tensor comm_output, int top_k,"
        " int input_heads, int comm_heads, bool per_head, float input_dropout,"
        " float comm_dropout, int seed, bool save) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(rims_fast, CPU, m) { m.impl("rim_steps_fwd", &rims::rim_steps_fwd_cpu); }

#ifdef RIMS_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(rims_fast, CUDA, m) { m.impl("rim_steps_fwd", &rims::rim_steps_fwd_cuda); }
#endif
