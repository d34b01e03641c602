// rims_fast::rim_steps_bwd — the stepped backward (rim_steps_bwd.h, kernels/rim_step_bwd.cuh):
// the schema, and the CPU implementation, which runs the same driver with the phases as host
// loops (for tests, like rim_seq_bwd's).
#include "rim_steps_bwd.h"

#include <torch/library.h>

#include <vector>

#include "steps_host.h"

namespace rims {
namespace {

// As StepHostDev (rim_steps_fwd.cpp): host_item_order(), shared memory NaN and guarded per
// sample.
struct StepBwdHostDev {
  template <typename C, typename T>
  void init(const RimStepBwdParams<T>& p) const {
    host_grid_for(p.s.B * p.s.K * p.s.H, [&](int64_t i) { rim_step_bwd_init<C>(p, i); });
  }
  template <typename C, typename T>
  void comm_bwd(const RimStepBwdParams<T>& p, int64_t t) const {
    const int64_t n = rim_step_comm_bwd_smem_elems(p.s, sizeof(C));
    run_host_samples<C>("rim_step_comm_bwd", t, p.s.B, n, [&](int64_t b, C* smem) {
      rim_step_comm_bwd<C>(HostExec{}, p, t, b, smem);
    });
  }
  template <typename C, typename T>
  void cell_bwd(const RimStepBwdParams<T>& p, int64_t t) const {
    host_grid_for(p.s.B * p.s.K * p.s.H, [&](int64_t i) { rim_step_cell_bwd<C>(p, t, i); });
  }
  template <typename C, typename T>
  void select_bwd(const RimStepBwdParams<T>& p, int64_t t) const {
    const int64_t n = rim_step_select_bwd_smem_elems(p.s, sizeof(C));
    run_host_samples<C>("rim_step_select_bwd", t, p.s.B, n, [&](int64_t b, C* smem) {
      rim_step_select_bwd<C>(HostExec{}, p, t, b, smem);
    });
  }
  template <typename C, typename T>
  void dh_final(const RimStepBwdParams<T>& p, int64_t t) const {
    host_grid_for(p.s.B * p.s.K * p.s.H, [&](int64_t i) { rim_step_dh_final<C>(p, t, i); });
  }
};

SeqBwdResult rim_steps_bwd_cpu(
    const std::optional<at::Tensor>& g_out, const std::optional<at::Tensor>& g_hn,
    const std::optional<at::Tensor>& g_cn, const at::Tensor& keys, const at::Tensor& xsrc,
    const at::Tensor& w_x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& input_query, const at::Tensor& weight_hh, const at::Tensor& bias_ih,
    const at::Tensor& bias_hh, const at::Tensor& comm_query, const at::Tensor& comm_key,
    const at::Tensor& comm_value, const at::Tensor& comm_output, const at::Tensor& masks,
    at::TensorList saved, int64_t top_k, int64_t input_heads, int64_t comm_heads, bool per_head,
    double input_dropout, double comm_dropout, int64_t seed, bool block_inactive_grad) {
  SeqBwdCall c = seq_bwd_prepare(g_out, g_hn, g_cn, keys, xsrc, w_x, h0, c0, input_query,
                                 weight_hh, bias_ih, bias_hh, comm_query, comm_key, comm_value,
                                 comm_output, masks, saved, top_k, input_heads, comm_heads,
                                 per_head, input_dropout, comm_dropout, seed, block_inactive_grad,
                                 /*tile=*/1, /*mma=*/false, /*xw=*/0);
  const auto st = h0.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "rims_fast::rim_steps_bwd: the CPU "
              "implementation (the phases as host loops, for tests) takes float32 and float64, "
              "got ", st);
  AT_DISPATCH_FLOATING_TYPES(st, "rim_steps_bwd_cpu", [&] {
    rim_steps_bwd_run<scalar_t, scalar_t>(c, w_x, StepBwdHostDev{});
  });
  return c.res;
}

}  // namespace
}  // namespace rims

TORCH_LIBRARY_FRAGMENT(rims_fast, m) {
  m.def("rim_steps_bwd(Tensor? grad_out, Tensor? grad_h_n, Tensor? grad_c_n, Tensor keys,"
        " Tensor xsrc, Tensor w_x, Tensor h0, Tensor? c0, Tensor input_query, Tensor weight_hh,"
        " Tensor bias_ih, Tensor bias_hh, Tensor comm_query, Tensor comm_key, Tensor comm_value,"
        " Tensor comm_output, Tensor masks, Tensor[] saved, int top_k, int input_heads,"
        " int comm_heads, bool per_head, float input_dropout, float comm_dropout, int seed,"
        " bool block_inactive_grad) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(rims_fast, CPU, m) { m.impl("rim_steps_bwd", &rims::rim_steps_bwd_cpu); }

#ifdef RIMS_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(rims_fast, CUDA, m) { m.impl("rim_steps_bwd", &rims::rim_steps_bwd_cuda); }
#endif
