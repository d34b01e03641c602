// rims_fast::rim_seq_fwd: the persistent whole-sequence forward (csrc/kernels/rim_seq_fwd.cuh).
// Schema, argument checks and the CPU implementation (the kernel's tile function run on the host,
// for tests) are in rim_seq_fwd.cpp; the CUDA launcher in rim_seq_fwd_cuda.cu.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "kernels/rim_seq_fwd.cuh"

namespace rims {

// The largest tile (samples per thread block) the kernel's accumulators hold.
constexpr int kSeqTileMax = 8;

using SeqFwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks every argument (shapes, dtypes, devices) and returns the sizes; S is the tile chosen
// (the `tile` argument, or kSeqTileMax capped by B when it is 0).
RimSeqDims seq_fwd_check(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, int64_t tile);

#ifdef RIMS_FAST_WITH_CUDA
SeqFwdResult rim_seq_fwd_cuda(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, int64_t tile);
#endif

}  // namespace rims
