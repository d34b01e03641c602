// Launch helpers of the stepped forward's and backward's phase kernels (rim_steps_fwd_cuda.cu,
// rim_steps_bwd_cuda.cu): a phase is a functor, run either once per item (a thread each,
// grid-stride) or once per sample (a block each, DeviceExec: items over its threads, a barrier
// after each loop). All on the current stream, no synchronisation: a CUDA graph can capture them.
#pragma once

#include "rim_seq_cuda.cuh"

namespace rims {
namespace steps_cuda {

constexpr int kItemThreads = 256;
// A block per sample: at `paper` (B = 64) that is half the SMs of an H100 with one block each, so
// the phases' wide loops (hundreds to thousands of items) are better spread over 8 warps than 4.
constexpr int kSampleThreads = 256;

template <class F>
__global__ void __launch_bounds__(kItemThreads) items_kernel(const F f, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    f(i);
}

template <class F>
__global__ void __launch_bounds__(kSampleThreads) samples_kernel(const F f) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  f(seq_cuda::DeviceExec{}, static_cast<int64_t>(blockIdx.x), smem_raw);
}

// f(i) for i in [0, n).
template <class F>
void for_items(const F& f, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const int64_t blocks = std::min<int64_t>((n + kItemThreads - 1) / kItemThreads, 65535);
  items_kernel<F><<<static_cast<unsigned>(blocks), kItemThreads, 0, stream>>>(f, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// f(exec, b, smem) for b in [0, samples), a block each with `smem` bytes of shared memory.
template <class F>
void for_samples(const F& f, int64_t samples, size_t smem, cudaStream_t stream) {
  if (smem > 48 * 1024) {  // beyond the default: opt in once per kernel and device, never lowered
    int dev = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    TORCH_CHECK(static_cast<int64_t>(smem) <= seq_cuda::max_smem_per_block(dev),
                "rims_fast stepped ops: a phase kernel needs ", smem, " bytes of shared memory, "
                "more than this GPU's ", seq_cuda::max_smem_per_block(dev), " per block");
    seq_cuda::allow_max_smem(samples_kernel<F>, dev);
  }
  samples_kernel<F><<<static_cast<unsigned>(samples), kSampleThreads, smem, stream>>>(f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace steps_cuda
}  // namespace rims
