// Shared pieces of the CUDA launchers of rims_fast::rim_seq_fwd / rim_seq_bwd (the persistent
// kernels, csrc/kernels/rim_seq_fwd.cuh, rim_seq_bwd.cuh): the device execution policies, the
// shared-memory and tile rules, the plain launch. The kernels and their launchers are split over
// three translation units, rim_seq_fwd_cuda.cu (one block per tile), rim_seq_fwd_cluster_cuda.cu
// (thread-block clusters) and rim_seq_bwd_cuda.cu, so that nvcc compiles them in parallel: each
// kernel inlines a whole sequence's tile function, and one unit holding all of them took most of
// the build.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <utility>

#include "rim_seq_fwd.h"

namespace rims {
namespace seq_cuda {

constexpr int kSeqThreads = 32 * kSeqWarps;
// Threads per block of the "wide" kernels (use_wide): a tile of one sample (or two, forward)
// keeps that many samples' accumulators (SMAX = 1, 2), so 512 threads fit the register file (at
// most 128 registers each) where the tile-8 kernels' 225-243 allow 256. At tile 1 these kernels
// wait on latency (benchmarks/README.md: 73 us per paper step against ~20 modelled): twice the
// warps per SM hide twice the L2 round trips, and phases of 257..512 items run in one round
// instead of two (H100, paper bf16: 3.93 ms forward against 5.34). Tile 2 halves the weights'
// L2 traffic per sample (the bound at tile 1: 39 us a step) at twice the work per block.
constexpr int kSeqWideThreads = 512;

// dst[0..n) = src[0..n) by the whole block (no barrier): 16-byte accesses with four loads in
// flight per thread when both are 16-byte aligned, element by element otherwise and for the
// tail. Not inlined (one copy of the loop however many call sites), and a free function so that
// the caller's execution policy never needs an address.
template <class W>
__device__ __noinline__ void block_copy(W* dst, const W* src, int64_t n) {
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  int64_t done = 0;
  if (((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) & 15) == 0) {
    const int64_t n16 = n * static_cast<int64_t>(sizeof(W)) / 16;
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (int64_t i = tid; i < n16; i += 4 * nt) {
      uint4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (i + u * nt < n16) v[u] = s[i + u * nt];
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (i + u * nt < n16) d[i + u * nt] = v[u];
    }
    done = n16 * 16 / static_cast<int64_t>(sizeof(W));
  }
  for (int64_t i = done + tid; i < n; i += nt) dst[i] = src[i];
}

// CLOCK: debug timing of the persistent kernels' phases (RimSeqDims::phase_clock, set by
// rims_fast._C._set_phase_clock; tools/phase_clocks.py). With clk set, thread 0 of each block
// adds each phase's clock64() cycles (barrier to barrier, within the step loop) into clk[phase]
// and counts its steps in clk[kPhaseSlots - 1]; unset, it costs a uniform branch per barrier and
// the state's ~5 registers. The tensor-core kernels, at the register limit, take CLOCK = false
// (the state then is never read and costs nothing: with it their forward spilled 200 bytes).
template <bool CLOCK>
struct DeviceExecT {
  unsigned long long* clk = nullptr;
  mutable long long last = 0;
  mutable int phase = -1;  // -1: outside the step loop
  __device__ __forceinline__ void step() const {
    if constexpr (CLOCK) {
      if (clk == nullptr || threadIdx.x != 0) return;
      phase = 0;
      last = clock64();
      atomicAdd(clk + kPhaseSlots - 1, 1ull);
    }
  }
  __device__ __forceinline__ void steps_done() const {
    if constexpr (CLOCK) phase = -1;
  }
  __device__ __forceinline__ void tick() const {
    if constexpr (CLOCK) {
      if (clk == nullptr || threadIdx.x != 0 || phase < 0) return;
      const long long now = clock64();
      if (phase < kPhaseSlots - 1)
        atomicAdd(clk + phase, static_cast<unsigned long long>(now - last));
      ++phase;
      last = now;
    }
  }
  template <class F>
  __device__ __forceinline__ void parallel_for(int n, const F& f) const {
    for (int i = threadIdx.x; i < n; i += blockDim.x) f(i);
    __syncthreads();
    tick();
  }
  // One warp per item: every lane of warp w calls f(i, w, lane, 32) for i = w, w + warps, ...
  // (f may be warp-collective: the item index is uniform across the warp).
  template <class F>
  __device__ __forceinline__ void warp_for(int n, const F& f) const {
    const int warps = static_cast<int>(blockDim.x) >> 5, w = static_cast<int>(threadIdx.x) >> 5;
    const int lane = static_cast<int>(threadIdx.x) & 31;
    for (int i = w; i < n; i += warps) f(i, w, lane, 32);
    __syncthreads();
    tick();
  }
  __device__ __forceinline__ void syncwarp() const { __syncwarp(); }
  // dst[0..n) = src[0..n) by the whole block (block_copy), then a barrier.
  template <class W>
  __device__ __forceinline__ void copy(W* dst, const W* src, int64_t n) const {
    block_copy(dst, src, n);
    __syncthreads();
    tick();
  }
  // Two copies, one barrier.
  template <class W>
  __device__ __forceinline__ void copy(W* dst, const W* src, int64_t n, W* dst2, const W* src2,
                                       int64_t n2) const {
    block_copy(dst, src, n);
    block_copy(dst2, src2, n2);
    __syncthreads();
    tick();
  }
};
using DeviceExec = DeviceExecT<true>;

// A block of a thread-block cluster (sm_90+): the cluster barrier and DSMEM addresses
// (rim_seq_fwd_tile's CLUSTER variant). The kernels are also built for sm_80, where clusters do
// not exist: that device pass has neither this nor the cluster kernel's body (it traps), and the
// launcher refuses such devices first.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
struct DeviceClusterExec : DeviceExec {
  __device__ __forceinline__ void cluster_sync() const {
    cooperative_groups::this_cluster().sync();
    tick();
  }
  template <class P>
  __device__ __forceinline__ P* peer(P* ptr, int rank) const {
    return cooperative_groups::this_cluster().map_shared_rank(ptr, static_cast<unsigned>(rank));
  }
};
#endif

// at:: storage types -> CUDA's.
template <typename S> struct CudaType { using type = S; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

// The per-block opt-in limit of dynamic shared memory.
inline int64_t max_smem_per_block(int dev) {
  int max_smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return max_smem;
}

// Lets `kernel` use up to the device's per-block maximum of dynamic shared memory: set once per
// (kernel, device) and never lowered, so that concurrent callers with different sizes cannot
// undo each other's setting between it and their launch.
template <typename Kernel>
void allow_max_smem(Kernel kernel, int dev) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), dev);
  std::lock_guard<std::mutex> lock(mu);
  if (done.count(key)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(max_smem_per_block(dev))));
  done.insert(key);
}

// The largest tile (<= S) whose shared memory fits the device's per-block opt-in limit.
// mma: the call uses the tensor-core scratch (part of bytes(S), named in the error).
template <typename C, typename Bytes>
int64_t fit_tile(int64_t S, int dev, const Bytes& bytes, bool mma, bool resident = false) {
  const int64_t max_smem = max_smem_per_block(dev);
  while (S > 1 && bytes(S) > max_smem) --S;
  TORCH_CHECK(bytes(S) <= max_smem, "rims_fast::rim_seq: one sample needs ", bytes(1),
              " bytes of shared memory, more than this GPU's ", max_smem,
              " per block (K, H or the input width too large for the persistent kernel; the "
              "stepped ops, RIMS_FAST_CUDA_FWD=stepped, have no such limit)",
              resident ? "; that includes the resident weights asked for (resident=...): fewer "
                         "may fit" : "",
              mma ? "; that includes the tensor-core scratch (mma_smem_elems: the warps' staging "
                    "tiles and the packed operand rows), so RIMS_FAST_CUDA_MMA=0 may fit"
                  : "");
  return S;
}

// The automatic tile (tile = 0) of the one-block-per-tile kernels: the fewest samples per block
// that still leave at most one block per SM, ceil(B / SMs), capped by the tile asked for. A tile's
// samples run one after another inside its block, so when the batch is small, spreading it over
// more SMs beats sharing each weight read among more samples: on an H100 at the paper shape
// (B = 64, bf16) tile 1 ran the tensor-core forward in 10.8 ms against 19.6 ms at tile 8 (the old
// default), and forward+backward in 26.7 ms against 44.4 ms
// (benchmarks/results/nvidia-h100-session-2026-11-26d-2-tiles.log).
inline int64_t spread_tile(int64_t S, int64_t B, int dev) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return std::max<int64_t>(1, std::min<int64_t>(S, (B + sms - 1) / sms));
}

// The tensor-core path needs sm_80+ (bfloat16 WMMA; the kernels are built for 8.0 and 9.0a).
inline void check_mma_device(bool mma, int dev) {
  if (!mma) return;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  TORCH_CHECK(major >= 8, "rims_fast::rim_seq: mma=True needs compute capability 8.0 or newer, "
              "this GPU has ", major, ".x; use RIMS_FAST_CUDA_MMA=0");
}

template <typename Kernel, typename Params>
void launch(Kernel kernel, const Params& p, int64_t smem, int dev, int threads = kSeqThreads) {
  const int64_t tiles = (p.B + p.S - 1) / p.S;
  allow_max_smem(kernel, dev);
  kernel<<<static_cast<unsigned>(tiles), threads, static_cast<size_t>(smem),
           c10::cuda::getCurrentCUDAStream(dev)>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline void check_mma_dtype(bool mma, const at::Tensor& h0) {
  const auto st = h0.scalar_type();
  TORCH_CHECK(!mma || st == at::kHalf || st == at::kBFloat16,
              "rims_fast::rim_seq: mma=True (tensor-core products) takes float16 or bfloat16, "
              "got ", st, "; float32/float64 run on CUDA cores (mma=False)");
}

// The cluster forward (rim_seq_fwd_cluster_cuda.cu): its tile, resident weights and launch for
// the prepared call c (c.d.kpr > 0); tile: the op's argument (0: automatic).
void rim_seq_fwd_cluster_cuda(SeqFwdCall& c, int64_t tile, int dev);

}  // namespace seq_cuda
}  // namespace rims
