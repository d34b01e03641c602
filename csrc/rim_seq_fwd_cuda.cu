// CUDA launchers of rims_fast::rim_seq_fwd / rim_seq_bwd: one thread block (forward with
// cluster > 0: one thread-block cluster) per tile of S samples runs the whole sequence (csrc/kernels/rim_seq_fwd.cuh, rim_seq_bwd.cuh), its state and per-step
// activations in shared memory. Registered for the CUDA key in rim_seq_fwd.cpp; the argument
// checks and buffer allocation are shared with the CPU implementation there.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <map>
#include <set>
#include <utility>
#include <mutex>
#include <tuple>

#include "rim_seq_fwd.h"

namespace rims {
namespace {

constexpr int kSeqThreads = 32 * kSeqWarps;

struct DeviceExec {
  template <class F>
  __device__ __forceinline__ void parallel_for(int n, const F& f) const {
    for (int i = threadIdx.x; i < n; i += blockDim.x) f(i);
    __syncthreads();
  }
  // One warp per item: every lane of warp w calls f(i, w, lane, 32) for i = w, w + warps, ...
  // (f may be warp-collective: the item index is uniform across the warp).
  template <class F>
  __device__ __forceinline__ void warp_for(int n, const F& f) const {
    const int warps = static_cast<int>(blockDim.x) >> 5, w = static_cast<int>(threadIdx.x) >> 5;
    const int lane = static_cast<int>(threadIdx.x) & 31;
    for (int i = w; i < n; i += warps) f(i, w, lane, 32);
    __syncthreads();
  }
  __device__ __forceinline__ void syncwarp() const { __syncwarp(); }
  // dst[0..n) = src[0..n) by the whole block, then a barrier (the resident weights, once per
  // call): 16-byte accesses with four loads in flight per thread when both are 16-byte aligned
  // (dst always is), element by element otherwise and for the tail.
  template <class W>
  __device__ __noinline__ void copy(W* dst, const W* src, int64_t n) const {
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
    __syncthreads();
  }
};

// A block of a thread-block cluster (sm_90+): the cluster barrier and DSMEM addresses
// (rim_seq_fwd_tile's CLUSTER variant). The kernels are also built for sm_80, where clusters do
// not exist: that device pass has neither this nor the cluster kernel's body (it traps), and the
// launcher refuses such devices first.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
struct DeviceClusterExec : DeviceExec {
  __device__ __forceinline__ void cluster_sync() const {
    cooperative_groups::this_cluster().sync();
  }
  template <class P>
  __device__ __forceinline__ P* peer(P* ptr, int rank) const {
    return cooperative_groups::this_cluster().map_shared_rank(ptr, static_cast<unsigned>(rank));
  }
};
#endif

// MMA: the gate products on tensor cores (half/bfloat16 storage only; rim_seq_fwd_tile).
template <typename C, typename T, bool MMA>
__global__ void __launch_bounds__(kSeqThreads) rim_seq_fwd_kernel(const RimSeqFwdParams<T> p) {
  // 128-byte aligned: the tensor-core tiles at the start need 256-bit alignment.
  extern __shared__ __align__(128) unsigned char smem_raw[];
  rim_seq_fwd_tile<kSeqTileMax, C, MMA>(DeviceExec{}, p, static_cast<int64_t>(blockIdx.x),
                                        reinterpret_cast<C*>(smem_raw));
}

// One tile per cluster of ceil(K / kpr) blocks (grid = tiles * ranks, cluster dims (ranks, 1, 1)).
template <typename C, typename T>
__global__ void __launch_bounds__(kSeqThreads) rim_seq_fwd_cluster_kernel(
    const RimSeqFwdParams<T> p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const auto cluster = cooperative_groups::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t tile = static_cast<int64_t>(blockIdx.x / cluster.dim_blocks().x);
  rim_seq_fwd_tile<kSeqTileMax, C, false, true>(DeviceClusterExec{}, p, tile,
                                                reinterpret_cast<C*>(smem_raw), rank);
#else
  __trap();
#endif
}

template <typename C, typename T, bool MMA>
__global__ void __launch_bounds__(kSeqThreads) rim_seq_bwd_kernel(const RimSeqBwdParams<T> p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  rim_seq_bwd_tile<kSeqTileMax, C, MMA>(DeviceExec{}, p, static_cast<int64_t>(blockIdx.x),
                                        reinterpret_cast<C*>(smem_raw));
}

// at:: storage types -> CUDA's.
template <typename S> struct CudaType { using type = S; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

// The largest tile (<= d.S) whose shared memory fits the device's per-block opt-in limit.
// mma: the call uses the tensor-core scratch (part of bytes(S), named in the error).
int64_t max_smem_per_block(int dev) {
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

template <typename C, typename Bytes>
int64_t fit_tile(int64_t S, int dev, const Bytes& bytes, bool mma, bool resident = false) {
  const int64_t max_smem = max_smem_per_block(dev);
  while (S > 1 && bytes(S) > max_smem) --S;
  TORCH_CHECK(bytes(S) <= max_smem, "rims_fast::rim_seq: one sample needs ", bytes(1),
              " bytes of shared memory, more than this GPU's ", max_smem,
              " per block (K, H or the input width too large for the persistent kernel)",
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
int64_t spread_tile(int64_t S, int64_t B, int dev) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return std::max<int64_t>(1, std::min<int64_t>(S, (B + sms - 1) / sms));
}

// The tensor-core path needs sm_80+ (bfloat16 WMMA; the kernels are built for 8.0 and 9.0a).
void check_mma_device(bool mma, int dev) {
  if (!mma) return;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  TORCH_CHECK(major >= 8, "rims_fast::rim_seq: mma=True needs compute capability 8.0 or newer, "
              "this GPU has ", major, ".x; use RIMS_FAST_CUDA_MMA=0");
}

template <typename Kernel, typename Params>
void launch(Kernel kernel, const Params& p, int64_t smem, int dev) {
  const int64_t tiles = (p.B + p.S - 1) / p.S;
  allow_max_smem(kernel, dev);
  kernel<<<static_cast<unsigned>(tiles), kSeqThreads, static_cast<size_t>(smem),
           c10::cuda::getCurrentCUDAStream(dev)>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Clusters of the forward: ranks = ceil(K / kpr) blocks per tile.
int64_t cluster_ranks(const RimSeqDims& d) { return (d.K + d.kpr - 1) / d.kpr; }

// Refuses what cannot run the cluster kernel: pre-sm_90 devices, clusters over the portable size,
// and builds whose only code for this GPU is sm_80 PTX (e.g. TORCH_CUDA_ARCH_LIST="8.0+PTX" JITs
// the trap stub).
template <typename Kernel>
void check_cluster_device(Kernel kernel, const RimSeqDims& d, int dev) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  TORCH_CHECK(major >= 9, "rims_fast::rim_seq: cluster > 0 (thread-block clusters) needs compute "
              "capability 9.0 or newer, this GPU has ", major, ".x; use RIMS_FAST_CUDA_CLUSTER=0");
  const int64_t ranks = cluster_ranks(d);
  TORCH_CHECK(ranks <= 8, "rims_fast::rim_seq: a cluster of ", ranks, " blocks (K=", d.K,
              ", ", d.kpr, " mechanisms per block) exceeds the portable cluster size 8");
  cudaFuncAttributes fa{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
  TORCH_CHECK(fa.ptxVersion >= 90, "rims_fast::rim_seq: the cluster kernel was built from PTX ",
              fa.ptxVersion, " (no sm_90 code in this build: TORCH_CUDA_ARCH_LIST needs 9.0a); "
              "use RIMS_FAST_CUDA_CLUSTER=0");
}

// The launch configuration of `tiles` clusters of `ranks` blocks with `smem` bytes each (attr:
// the caller's storage for the cluster-dimension attribute).
cudaLaunchConfig_t cluster_config(int64_t tiles, int64_t ranks, int64_t smem, int dev,
                                  cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(tiles * ranks));
  cfg.blockDim = dim3(kSeqThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = c10::cuda::getCurrentCUDAStream(dev);
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(ranks);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// How many clusters of `ranks` blocks with `smem` bytes each the GPU runs at once (0: none can
// be scheduled). Cached per (kernel, device, ranks, smem), so that a warm-up call queries it
// outside any CUDA-graph capture.
template <typename Kernel>
int max_active_clusters(Kernel kernel, int64_t ranks, int64_t smem, int dev) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int64_t, int64_t>, int> known;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), dev, ranks, smem);
  std::lock_guard<std::mutex> lock(mu);
  const auto it = known.find(key);
  if (it != known.end()) return it->second;
  allow_max_smem(kernel, dev);
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = cluster_config(1, ranks, smem, dev, attr);
  int clusters = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg));
  known.emplace(key, clusters);
  return clusters;
}

// The default tile of the cluster forward (tile = 0): the smallest S whose tiles all run at once
// (one wave of clusters), capped by s_max, the largest that fits. A model-based choice (not yet
// measured): a smaller S shortens each block's serial work per step, and the room it leaves in
// shared memory holds more resident weights; a second wave would double the time.
template <typename Kernel>
int64_t one_wave_tile(Kernel kernel, const RimSeqDims& d, int64_t s_max, int dev) {
  const int clusters = max_active_clusters(kernel, cluster_ranks(d), max_smem_per_block(dev), dev);
  if (clusters <= 0) return s_max;  // launch_cluster says why
  const int64_t s = (d.B + clusters - 1) / clusters;
  return s < 1 ? 1 : s > s_max ? s_max : s;
}

// The cluster forward: one cluster of ranks blocks per tile, each with `smem` bytes (the device
// and build checked by check_cluster_device).
template <typename Kernel, typename Params>
void launch_cluster(Kernel kernel, const Params& p, int64_t smem, int dev) {
  const int64_t ranks = cluster_ranks(p), tiles = (p.B + p.S - 1) / p.S;
  // A cluster whose blocks' shared memory cannot be co-scheduled would fail to launch with a
  // generic error: say why instead.
  TORCH_CHECK(max_active_clusters(kernel, ranks, smem, dev) > 0, "rims_fast::rim_seq: a cluster "
              "of ", ranks, " blocks with ", smem, " bytes of shared memory each cannot be "
              "scheduled on this GPU; use a smaller tile (RIMS_FAST_CUDA_TILE) or "
              "RIMS_FAST_CUDA_CLUSTER=0");
  allow_max_smem(kernel, dev);
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = cluster_config(tiles, ranks, smem, dev, attr);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The forward kernel for the call: the tensor-core variant exists for half/bfloat16 storage only
// (a function template, so that `if constexpr` keeps it from being instantiated for the rest).
template <typename C, typename T>
void launch_fwd(const SeqFwdCall& c, int64_t smem, int dev) {
  if (c.d.kpr > 0) {
    launch_cluster(rim_seq_fwd_cluster_kernel<C, T>, seq_fwd_params<T>(c), smem, dev);
    return;
  }
  if constexpr (sizeof(T) == 2) {
    if (c.d.mma) {
      launch(rim_seq_fwd_kernel<C, T, true>, seq_fwd_params<T>(c), smem, dev);
      return;
    }
  }
  launch(rim_seq_fwd_kernel<C, T, false>, seq_fwd_params<T>(c), smem, dev);
}

template <typename C, typename T>
void launch_bwd(const SeqBwdCall& c, int64_t smem, int dev) {
  if constexpr (sizeof(T) == 2) {
    if (c.d.mma) {
      launch(rim_seq_bwd_kernel<C, T, true>, seq_bwd_params<T>(c), smem, dev);
      return;
    }
  }
  launch(rim_seq_bwd_kernel<C, T, false>, seq_bwd_params<T>(c), smem, dev);
}

void check_mma_dtype(bool mma, const at::Tensor& h0) {
  const auto st = h0.scalar_type();
  TORCH_CHECK(!mma || st == at::kHalf || st == at::kBFloat16,
              "rims_fast::rim_seq: mma=True (tensor-core products) takes float16 or bfloat16, "
              "got ", st, "; float32/float64 run on CUDA cores (mma=False)");
}

}  // namespace

SeqFwdResult rim_seq_fwd_cuda(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, int64_t tile,
    bool save, bool mma, int64_t cluster, int64_t resident) {
  const c10::cuda::CUDAGuard guard(h0.device());
  check_mma_dtype(mma, h0);
  SeqFwdCall c = seq_fwd_prepare(keys, xsrc, w_x, h0, c0, input_query, weight_hh, bias_ih,
                                 bias_hh, comm_query, comm_key, comm_value, comm_output, top_k,
                                 input_heads, comm_heads, per_head, input_dropout, comm_dropout,
                                 seed, tile, save, mma, cluster, resident);
  const int dev = h0.get_device();
  check_mma_device(mma, dev);
  RimSeqDims& d = c.d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h0.scalar_type(), "rim_seq_fwd_cuda",
                                  [&] {
    using T = typename CudaType<scalar_t>::type;
    using C = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int64_t cb = sizeof(C), tb = sizeof(T);
    // The tile first (auto residency: with none), then the resident weights in the room left.
    const bool auto_res = d.resident < 0;
    if (auto_res) d.resident = 0;
    auto bytes = [&](int64_t s) { return rim_seq_fwd_smem_bytes(d, s, tb, cb); };
    if (tile == 0 && d.kpr == 0) d.S = spread_tile(d.S, d.B, dev);
    d.S = fit_tile<C>(d.S, dev, bytes, d.mma, d.resident > 0);
    if (d.kpr > 0) {
      const auto kernel = rim_seq_fwd_cluster_kernel<C, T>;
      check_cluster_device(kernel, d, dev);
      if (tile == 0) d.S = one_wave_tile(kernel, d, d.S, dev);
      // Residency fills a block's shared memory, so one block per SM: worth it when every tile
      // runs at once; with more tiles than that (an explicit tile, or B beyond 8 samples per
      // cluster) the blocks keep the occupancy their arrays allow and read weights from L2.
      if (auto_res) {
        const int64_t cap = max_smem_per_block(dev), tiles = (d.B + d.S - 1) / d.S;
        const bool one_wave = tiles <= max_active_clusters(kernel, cluster_ranks(d), cap, dev);
        d.resident = rim_seq_resident_fit(d, tb, cb, one_wave ? cap : bytes(d.S));
      }
    }
    launch_fwd<C, T>(c, bytes(d.S), dev);
  });
  return c.res;
}

SeqBwdResult rim_seq_bwd_cuda(
    const std::optional<at::Tensor>& g_out, const std::optional<at::Tensor>& g_hn,
    const std::optional<at::Tensor>& g_cn, const at::Tensor& keys, const at::Tensor& xsrc,
    const at::Tensor& w_x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& input_query, const at::Tensor& weight_hh, const at::Tensor& bias_ih,
    const at::Tensor& bias_hh, const at::Tensor& comm_query, const at::Tensor& comm_key,
    const at::Tensor& comm_value, const at::Tensor& comm_output, const at::Tensor& masks,
    at::TensorList saved, int64_t top_k, int64_t input_heads, int64_t comm_heads, bool per_head,
    double input_dropout, double comm_dropout, int64_t seed, bool block_inactive_grad,
    int64_t tile, bool mma) {
  const c10::cuda::CUDAGuard guard(h0.device());
  check_mma_dtype(mma, h0);
  SeqBwdCall c = seq_bwd_prepare(g_out, g_hn, g_cn, keys, xsrc, w_x, h0, c0, input_query,
                                 weight_hh, bias_ih, bias_hh, comm_query, comm_key, comm_value,
                                 comm_output, masks, saved, top_k, input_heads, comm_heads,
                                 per_head, input_dropout, comm_dropout, seed,
                                 block_inactive_grad, tile, mma);
  const int dev = h0.get_device();
  check_mma_device(mma, dev);
  RimSeqDims& d = c.d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h0.scalar_type(), "rim_seq_bwd_cuda",
                                  [&] {
    using T = typename CudaType<scalar_t>::type;
    using C = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int64_t cb = sizeof(C), tb = sizeof(T);
    auto bytes = [&](int64_t s) {
      return (rim_seq_bwd_smem_elems(s, d.M, d.K, d.H, d.GH, d.n_in, d.nk, d.Dx, d.n_c, d.ck,
                                     d.cv, d.lstm) +
              (d.mma ? mma_smem_elems(d.K, s, c.ba, tb, cb) : 0)) * cb;
    };
    if (tile == 0) d.S = spread_tile(d.S, d.B, dev);
    d.S = fit_tile<C>(d.S, dev, bytes, d.mma);
    launch_bwd<C, T>(c, bytes(d.S), dev);
  });
  return c.res;
}

}  // namespace rims
