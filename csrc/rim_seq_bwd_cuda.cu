// CUDA launcher of rims_fast::rim_seq_bwd: one thread block per tile of S samples runs the
// reverse-time sweep of the whole sequence (csrc/kernels/rim_seq_bwd.cuh). Registered for the
// CUDA key in rim_seq_fwd.cpp.
#include "rim_seq_cuda.cuh"

namespace rims {
using namespace seq_cuda;
namespace {

// SMAX, THREADS: the largest tile and the block size (the wide tile-1 kernel: 1,
// kSeqWideThreads; rim_seq_cuda.cuh).
template <typename C, typename T, bool MMA, int SMAX = kSeqTileMax, int THREADS = kSeqThreads>
__global__ void __launch_bounds__(THREADS) rim_seq_bwd_kernel(const RimSeqBwdParams<T> p) {
  // The tensor-core scratch holds one staging tile per warp of kSeqThreads (MmaSmem, kSeqWarps):
  // a wider block would write past it.
  static_assert(!MMA || THREADS == kSeqThreads, "tensor-core kernels run kSeqThreads threads");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  rim_seq_bwd_tile<SMAX, C, MMA>(DeviceExecT<!MMA>{p.phase_clock}, p, static_cast<int64_t>(blockIdx.x),
                                        reinterpret_cast<C*>(smem_raw));
}

template <typename C, typename T>
void launch_bwd(const SeqBwdCall& c, int64_t smem, int dev) {
  if constexpr (sizeof(T) == 2) {
    if (c.d.mma) {
      launch(rim_seq_bwd_kernel<C, T, true>, seq_bwd_params<T>(c), smem, dev);
      return;
    }
  }
  if (use_wide(c.d)) {
    launch(rim_seq_bwd_kernel<C, T, false, 1, kSeqWideThreads>, seq_bwd_params<T>(c), smem, dev,
           kSeqWideThreads);
    return;
  }
  launch(rim_seq_bwd_kernel<C, T, false>, seq_bwd_params<T>(c), smem, dev);
}

}  // namespace

SeqBwdResult rim_seq_bwd_cuda(
    const std::optional<at::Tensor>& g_out, const std::optional<at::Tensor>& g_hn,
    const std::optional<at::Tensor>& g_cn, const at::Tensor& keys, const at::Tensor& xsrc,
    const at::Tensor& w_x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& input_query, const at::Tensor& weight_hh, const at::Tensor& bias_ih,
    const at::Tensor& bias_hh, const at::Tensor& comm_query, const at::Tensor& comm_key,
    const at::Tensor& comm_value, const at::Tensor& comm_output, const at::Tensor& masks,
    at::TensorList saved, int64_t top_k, int64_t input_heads, int64_t comm_heads, bool per_head,
    double input_dropout, double comm_dropout, int64_t seed, bool block_inactive_grad,
    int64_t tile, bool mma, int64_t xw) {
  const c10::cuda::CUDAGuard guard(h0.device());
  check_mma_dtype(mma, h0);
  SeqBwdCall c = seq_bwd_prepare(g_out, g_hn, g_cn, keys, xsrc, w_x, h0, c0, input_query,
                                 weight_hh, bias_ih, bias_hh, comm_query, comm_key, comm_value,
                                 comm_output, masks, saved, top_k, input_heads, comm_heads,
                                 per_head, input_dropout, comm_dropout, seed,
                                 block_inactive_grad, tile, mma, xw);
  const int dev = h0.get_device();
  check_mma_device(mma, dev);
  RimSeqDims& d = c.d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h0.scalar_type(), "rim_seq_bwd_cuda",
                                  [&] {
    using T = typename CudaType<scalar_t>::type;
    using C = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int64_t cb = sizeof(C), tb = sizeof(T);
    auto bytes = [&](int64_t s) {
      return (rim_seq_bwd_smem_elems(s, d.M, d.K, d.H, d.GH, d.n_in, d.nk,
                                     rim_seq_bwd_dgf_width(d), d.n_c, d.ck,
                                     d.cv, d.lstm, d.mma) +
              (d.mma ? mma_smem_elems(d.K, s, c.ba, tb, cb) : 0)) * cb;
    };
    if (tile == 0) d.S = spread_tile(d.S, d.B, dev);
    d.S = fit_tile<C>(d.S, dev, bytes, d.mma);
    launch_bwd<C, T>(c, bytes(d.S), dev);
  });
  if (d.xw_hoisted) seq_bwd_input_term(c);
  return c.res;
}

}  // namespace rims
