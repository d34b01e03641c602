// Launch helpers of the stepped forward's and backward's phase kernels (rim_steps_fwd_cuda.cu,
// rim_steps_bwd_cuda.cu): a phase is a functor, run either once per item (a thread each,
// grid-stride) or once per sample (a block each, DeviceExec: items over its threads, a barrier
// after each loop). All on the current stream, no synchronisation: a CUDA graph can capture them.
#pragma once

#include <cstdlib>
#include <string>
#include <utility>

#include "rim_seq_cuda.cuh"

namespace rims {
namespace steps_cuda {

// Programmatic dependent launch (RIMS_FAST_CUDA_PDL=1, sm_90+): every phase kernel follows one of
// the step's cuBLAS GEMMs, whose output it reads. Launched with programmatic stream
// serialization, a phase kernel's blocks may be scheduled while the GEMM's last blocks drain, and
// wait for the GEMM's completion and memory in wait_prerequisites() (griddepcontrol.wait) before
// their first read, instead of the whole launch waiting for the GEMM to retire: the gap between
// the two kernels, paid eight times a step, shrinks. Without the attribute (the default, and
// below sm_90) the wait returns at once: the kernels are the same either way, so are the results.
inline bool pdl_requested() {
  const char* v = std::getenv("RIMS_FAST_CUDA_PDL");
  const std::string s = v == nullptr ? "0" : v;
  TORCH_CHECK(s == "0" || s == "1", "RIMS_FAST_CUDA_PDL must be 0 or 1, got '", s, "'");
  return s == "1";
}

// Compiled with the phase kernels' flags, so that its code on a device is theirs (use_pdl).
template <int>
__global__ void pdl_probe_kernel() {}

// The first statement of every phase kernel: nothing of the previous kernel is read before it.
__device__ __forceinline__ void wait_prerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Whether this call's phase kernels launch with programmatic stream serialization. Refused below
// compute capability 9.0, and where the kernels' code on this device was compiled below sm_90 (a
// JIT of compute_80 PTX, say, under TORCH_CUDA_ARCH_LIST="8.0+PTX"): that code has no
// griddepcontrol.wait, so with the attribute it would read its GEMM's result too early. Once per
// call, not per launch.
inline bool use_pdl(int dev) {
  if (!pdl_requested()) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  TORCH_CHECK(major >= 9, "rims_fast stepped ops: RIMS_FAST_CUDA_PDL=1 (programmatic dependent "
              "launch) needs compute capability 9.0 or newer, this GPU has ", major,
              ".x; unset it");
  cudaFuncAttributes fa{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, pdl_probe_kernel<0>));
  TORCH_CHECK(fa.ptxVersion >= 90, "rims_fast stepped ops: RIMS_FAST_CUDA_PDL=1, but this "
              "build's phase kernels run on this GPU from code for compute_", fa.ptxVersion,
              ", which lacks the device-side wait; rebuild with 9.0a (or newer) in "
              "TORCH_CUDA_ARCH_LIST, or unset RIMS_FAST_CUDA_PDL");
  return true;
}

// kernel<<<grid, threads, smem, stream>>>(args...), with programmatic stream serialization when
// pdl (cudaLaunchKernelEx: the attribute cannot be given to a triple-chevron launch).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned grid, unsigned threads, size_t smem,
            cudaStream_t stream, bool pdl, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

constexpr int kItemThreads = 256;
// Blocks of the fused tensor-core kernels (kStepMmaWarps warps, step_mma.cuh).
constexpr int kSampleThreads = 256;
// A block per sample for the select and comm phases and their backward: at `paper` (B = 64) that
// is half the SMs of an H100 with one block each, so the phases' loops (hundreds to thousands of
// items) and warp items are spread over 16 warps, not 8: half the rounds (comm's 24 warp items:
// 2 rounds instead of 3; comm_bwd's 2 304 items of d Q|K|V: 5 instead of 9), and twice the warps
// to hide each round's shared-memory and L2 latency. At `large` (B = 256) all blocks are resident
// either way. An item is one thread's or one warp's whatever the block size: same results.
// float64 too: ptxas sm_90a (2026-11-28, after 7989b02) gives its four kernels 64-106 registers
// and no spills at 512, where at 256 its select spilled 40 bytes.
constexpr int kPhaseThreads = 512;

template <class F>
__global__ void __launch_bounds__(kItemThreads) items_kernel(const F f, int64_t n) {
  wait_prerequisites();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    f(i);
}

template <class F, int THREADS>
__global__ void __launch_bounds__(THREADS) samples_kernel(const F f) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  wait_prerequisites();
  f(seq_cuda::DeviceExec{}, static_cast<int64_t>(blockIdx.x), smem_raw);
}

// f(i) for i in [0, n).
template <class F>
void for_items(const F& f, int64_t n, cudaStream_t stream, bool pdl) {
  if (n <= 0) return;
  const int64_t blocks = std::min<int64_t>((n + kItemThreads - 1) / kItemThreads, 65535);
  launch(items_kernel<F>, static_cast<unsigned>(blocks), kItemThreads, 0, stream, pdl, f, n);
}

// f(exec, b, smem) for b in [0, samples), a block of THREADS threads each with `smem` bytes of
// shared memory.
template <int THREADS = kSampleThreads, class F>
void for_samples(const F& f, int64_t samples, size_t smem, cudaStream_t stream, bool pdl) {
  if (smem > 48 * 1024) {  // beyond the default: opt in once per kernel and device, never lowered
    int dev = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    TORCH_CHECK(static_cast<int64_t>(smem) <= seq_cuda::max_smem_per_block(dev),
                "rims_fast stepped ops: a phase kernel needs ", smem, " bytes of shared memory, "
                "more than this GPU's ", seq_cuda::max_smem_per_block(dev), " per block");
    seq_cuda::allow_max_smem(samples_kernel<F, THREADS>, dev);
  }
  launch(samples_kernel<F, THREADS>, static_cast<unsigned>(samples), THREADS, smem, stream, pdl,
         f);
}

}  // namespace steps_cuda
}  // namespace rims
