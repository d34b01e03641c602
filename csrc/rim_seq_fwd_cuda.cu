// CUDA launcher of rims_fast::rim_seq_fwd: one thread block per tile of S samples runs the whole
// sequence (csrc/kernels/rim_seq_fwd.cuh), its state and per-step activations in shared memory;
// with cluster > 0 the call goes on in rim_seq_fwd_cluster_cuda.cu. Registered for the CUDA key
// in rim_seq_fwd.cpp; the argument checks and buffer allocation are shared with the CPU
// implementation there.
#include "rim_seq_cuda.cuh"

namespace rims {
using namespace seq_cuda;
namespace {

// MMA: the gate products on tensor cores (half/bfloat16 storage only; rim_seq_fwd_tile). SMAX,
// THREADS: the largest tile and the block size (the wide kernels: 1 or 2, kSeqWideThreads).
template <typename C, typename T, bool MMA, int SMAX = kSeqTileMax, int THREADS = kSeqThreads>
__global__ void __launch_bounds__(THREADS) rim_seq_fwd_kernel(const RimSeqFwdParams<T> p) {
  // The tensor-core scratch holds one staging tile per warp of kSeqThreads (MmaSmem, kSeqWarps):
  // a wider block would write past it.
  static_assert(!MMA || THREADS == kSeqThreads, "tensor-core kernels run kSeqThreads threads");
  // 128-byte aligned: the tensor-core tiles at the start need 256-bit alignment.
  extern __shared__ __align__(128) unsigned char smem_raw[];
  rim_seq_fwd_tile<SMAX, C, MMA>(DeviceExecT<!MMA>{p.phase_clock}, p, static_cast<int64_t>(blockIdx.x),
                                        reinterpret_cast<C*>(smem_raw));
}

// The forward kernel for the call: the tensor-core variant exists for half/bfloat16 storage only
// (a function template, so that `if constexpr` keeps it from being instantiated for the rest).
template <typename C, typename T>
void launch_fwd(const SeqFwdCall& c, int64_t smem, int dev) {
  if constexpr (sizeof(T) == 2) {
    if (c.d.mma) {
      launch(rim_seq_fwd_kernel<C, T, true>, seq_fwd_params<T>(c), smem, dev);
      return;
    }
  }
  if (use_wide(c.d, kSeqWideFwdTileMax)) {
    static_assert(kSeqWideFwdTileMax == 2, "one wide kernel per tile up to the maximum");
    launch(c.d.S == 2 ? rim_seq_fwd_kernel<C, T, false, 2, kSeqWideThreads>
                      : rim_seq_fwd_kernel<C, T, false, 1, kSeqWideThreads>,
           seq_fwd_params<T>(c), smem, dev, kSeqWideThreads);
    return;
  }
  launch(rim_seq_fwd_kernel<C, T, false>, seq_fwd_params<T>(c), smem, dev);
}

}  // namespace

SeqFwdResult rim_seq_fwd_cuda(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, int64_t tile,
    bool save, bool mma, int64_t cluster, int64_t resident, int64_t xw) {
  const c10::cuda::CUDAGuard guard(h0.device());
  check_mma_dtype(mma, h0);
  SeqFwdCall c = seq_fwd_prepare(keys, xsrc, w_x, h0, c0, input_query, weight_hh, bias_ih,
                                 bias_hh, comm_query, comm_key, comm_value, comm_output, top_k,
                                 input_heads, comm_heads, per_head, input_dropout, comm_dropout,
                                 seed, tile, save, mma, cluster, resident, xw);
  const int dev = h0.get_device();
  check_mma_device(mma, dev);
  if (c.d.kpr > 0) {
    rim_seq_fwd_cluster_cuda(c, tile, dev);
    return c.res;
  }
  RimSeqDims& d = c.d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h0.scalar_type(), "rim_seq_fwd_cuda",
                                  [&] {
    using T = typename CudaType<scalar_t>::type;
    using C = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int64_t cb = sizeof(C), tb = sizeof(T);
    if (d.resident < 0) d.resident = 0;  // automatic residency: none without a cluster
    auto bytes = [&](int64_t s) { return rim_seq_fwd_smem_bytes(d, s, tb, cb); };
    if (tile == 0) d.S = spread_tile(d.S, d.B, dev);
    d.S = fit_tile<C>(d.S, dev, bytes, d.mma, d.resident > 0);
    launch_fwd<C, T>(c, bytes(d.S), dev);
  });
  return c.res;
}

}  // namespace rims
