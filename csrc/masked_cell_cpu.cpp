// CPU implementation of the masked LSTM / GRU cell ops: the shared pointwise element functions
// of kernels/masked_cell.cuh, looped over rows with at::parallel_for.
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "kernels/masked_cell.cuh"
#include "masked_cell.h"

namespace rims {
namespace {

template <typename Params, typename Element>
void for_each_element(const Params& p, Element element) {
  // About 32K elements per task: small H still gets parallelism over rows.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.hidden));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      for (int64_t j = 0; j < p.hidden; ++j) element(p, row, j);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_lstm_cell_fwd_cpu(
    const at::Tensor& gates_, const at::Tensor& h_, const at::Tensor& c_, const at::Tensor& mask_) {
  const int64_t H = check_masked_cell_args("masked_lstm_cell_fwd", 4, {{"gates", &gates_}},
                                           {{"h", &h_}, {"c", &c_}}, mask_);
  const auto gates = gates_.contiguous(), h = h_.contiguous(), c = c_.contiguous();
  const auto mask = mask_.contiguous();
  auto h_new = fresh(h), c_new = fresh(c);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "masked_lstm_cell_fwd_cpu", [&] {
    MaskedLstmFwdParams<scalar_t> p{gates.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                                    c.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
                                    h_new.mutable_data_ptr<scalar_t>(),
                                    c_new.mutable_data_ptr<scalar_t>(),
                                    mask.numel(), H, 4 * H, H};
    for_each_element(p, masked_lstm_fwd_element<scalar_t>);
  });
  return {h_new, c_new};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_lstm_cell_bwd_cpu(
    const at::Tensor& grad_h_new_, const at::Tensor& grad_c_new_, const at::Tensor& gates_,
    const at::Tensor& c_, const at::Tensor& mask_) {
  const int64_t H = check_masked_cell_args(
      "masked_lstm_cell_bwd", 4, {{"gates", &gates_}},
      {{"grad_h_new", &grad_h_new_}, {"grad_c_new", &grad_c_new_}, {"c", &c_}}, mask_);
  const auto gh = grad_h_new_.contiguous(), gc = grad_c_new_.contiguous();
  const auto gates = gates_.contiguous(), c = c_.contiguous(), mask = mask_.contiguous();
  auto grad_gates = fresh(gates), grad_h = fresh(c), grad_c = fresh(c);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "masked_lstm_cell_bwd_cpu", [&] {
    MaskedLstmBwdParams<scalar_t> p{gh.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                                    gates.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(),
                                    mask.const_data_ptr<bool>(),
                                    grad_gates.mutable_data_ptr<scalar_t>(),
                                    grad_h.mutable_data_ptr<scalar_t>(),
                                    grad_c.mutable_data_ptr<scalar_t>(),
                                    mask.numel(), H, 4 * H, H};
    for_each_element(p, masked_lstm_bwd_element<scalar_t>);
  });
  return {grad_gates, grad_h, grad_c};
}

at::Tensor masked_gru_cell_fwd_cpu(const at::Tensor& gi_, const at::Tensor& gh_,
                                   const at::Tensor& h_, const at::Tensor& mask_) {
  const int64_t H = check_masked_cell_args("masked_gru_cell_fwd", 3, {{"gi", &gi_}, {"gh", &gh_}},
                                           {{"h", &h_}}, mask_);
  const auto gi = gi_.contiguous(), gh = gh_.contiguous(), h = h_.contiguous();
  const auto mask = mask_.contiguous();
  auto h_new = fresh(h);
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "masked_gru_cell_fwd_cpu", [&] {
    MaskedGruFwdParams<scalar_t> p{gi.const_data_ptr<scalar_t>(), gh.const_data_ptr<scalar_t>(),
                                   h.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
                                   h_new.mutable_data_ptr<scalar_t>(), mask.numel(), H, 3 * H, H};
    for_each_element(p, masked_gru_fwd_element<scalar_t>);
  });
  return h_new;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_gru_cell_bwd_cpu(
    const at::Tensor& grad_h_new_, const at::Tensor& gi_, const at::Tensor& gh_,
    const at::Tensor& h_, const at::Tensor& mask_) {
  const int64_t H = check_masked_cell_args("masked_gru_cell_bwd", 3, {{"gi", &gi_}, {"gh", &gh_}},
                                           {{"grad_h_new", &grad_h_new_}, {"h", &h_}}, mask_);
  const auto g = grad_h_new_.contiguous(), gi = gi_.contiguous(), gh = gh_.contiguous();
  const auto h = h_.contiguous(), mask = mask_.contiguous();
  auto grad_gi = fresh(gi), grad_gh = fresh(gh), grad_h = fresh(h);
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "masked_gru_cell_bwd_cpu", [&] {
    MaskedGruBwdParams<scalar_t> p{g.const_data_ptr<scalar_t>(), gi.const_data_ptr<scalar_t>(),
                                   gh.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                                   mask.const_data_ptr<bool>(),
                                   grad_gi.mutable_data_ptr<scalar_t>(),
                                   grad_gh.mutable_data_ptr<scalar_t>(),
                                   grad_h.mutable_data_ptr<scalar_t>(), mask.numel(), H, 3 * H, H};
    for_each_element(p, masked_gru_bwd_element<scalar_t>);
  });
  return {grad_gi, grad_gh, grad_h};
}

}  // namespace rims
