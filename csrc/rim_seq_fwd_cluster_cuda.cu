// CUDA launcher of rims_fast::rim_seq_fwd with cluster > 0: one thread-block cluster of
// ceil(K / kpr) blocks per tile (sm_90+; csrc/kernels/rim_seq_fwd.cuh's CLUSTER variant: DSMEM
// pushes and cluster barriers), entered from rim_seq_fwd_cuda() after the shared preparation.
#include "rim_seq_cuda.cuh"

namespace rims {
namespace seq_cuda {
namespace {

// One tile per cluster of ceil(K / kpr) blocks (grid = tiles * ranks, cluster dims (ranks, 1, 1)).
// SMAX, THREADS: the largest tile and the block size, as the single-block kernels' (the wide
// kernel, use_wide: a tile of 1 on 512 threads).
template <typename C, typename T, int SMAX = kSeqTileMax, int THREADS = kSeqThreads>
__global__ void __launch_bounds__(THREADS) rim_seq_fwd_cluster_kernel(
    const RimSeqFwdParams<T> p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const auto cluster = cooperative_groups::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t tile = static_cast<int64_t>(blockIdx.x / cluster.dim_blocks().x);
  rim_seq_fwd_tile<SMAX, C, false, true>(DeviceClusterExec{{p.phase_clock}}, p, tile,
                                                reinterpret_cast<C*>(smem_raw), rank);
#else
  __trap();
#endif
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

// The launch configuration of `tiles` clusters of `ranks` blocks of `threads` threads with `smem`
// bytes each (attr: the caller's storage for the cluster-dimension attribute).
cudaLaunchConfig_t cluster_config(int64_t tiles, int64_t ranks, int64_t smem, int threads,
                                  int dev, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(tiles * ranks));
  cfg.blockDim = dim3(static_cast<unsigned>(threads));
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
// be scheduled). Cached per (kernel, device, ranks, smem) (a kernel has one block size), so that
// a warm-up call queries it outside any CUDA-graph capture.
template <typename Kernel>
int max_active_clusters(Kernel kernel, int64_t ranks, int64_t smem, int threads, int dev) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int64_t, int64_t>, int> known;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), dev, ranks, smem);
  std::lock_guard<std::mutex> lock(mu);
  const auto it = known.find(key);
  if (it != known.end()) return it->second;
  allow_max_smem(kernel, dev);
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = cluster_config(1, ranks, smem, threads, dev, attr);
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
  const int clusters =
      max_active_clusters(kernel, cluster_ranks(d), max_smem_per_block(dev), kSeqThreads, dev);
  if (clusters <= 0) return s_max;  // launch_cluster says why
  const int64_t s = (d.B + clusters - 1) / clusters;
  return s < 1 ? 1 : s > s_max ? s_max : s;
}

// The cluster forward: one cluster of ranks blocks of `threads` threads per tile, each with `smem`
// bytes (the device and build checked by check_cluster_device).
template <typename Kernel, typename Params>
void launch_cluster(Kernel kernel, const Params& p, int64_t smem, int threads, int dev) {
  const int64_t ranks = cluster_ranks(p), tiles = (p.B + p.S - 1) / p.S;
  // A cluster whose blocks' shared memory cannot be co-scheduled would fail to launch with a
  // generic error: say why instead.
  TORCH_CHECK(max_active_clusters(kernel, ranks, smem, threads, dev) > 0, "rims_fast::rim_seq: a cluster "
              "of ", ranks, " blocks with ", smem, " bytes of shared memory each cannot be "
              "scheduled on this GPU; use a smaller tile (RIMS_FAST_CUDA_TILE) or "
              "RIMS_FAST_CUDA_CLUSTER=0");
  allow_max_smem(kernel, dev);
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = cluster_config(tiles, ranks, smem, threads, dev, attr);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void rim_seq_fwd_cluster_cuda(SeqFwdCall& c, int64_t tile, int dev) {
  RimSeqDims& d = c.d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.h0.scalar_type(),
                                  "rim_seq_fwd_cluster_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using C = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int64_t cb = sizeof(C), tb = sizeof(T);
    // The tile first (automatic residency: with none), then the resident weights in the room
    // left.
    const bool auto_res = d.resident < 0;
    if (auto_res) d.resident = 0;
    auto bytes = [&](int64_t s) { return rim_seq_fwd_smem_bytes(d, s, tb, cb); };
    d.S = fit_tile<C>(d.S, dev, bytes, d.mma, d.resident > 0);
    const auto narrow = rim_seq_fwd_cluster_kernel<C, T>;
    check_cluster_device(narrow, d, dev);
    // The tile by the 256-thread kernel's occupancy (one block per SM's register file); the wide
    // kernel's 512 threads of at most 128 registers also fill it.
    if (tile == 0) d.S = one_wave_tile(narrow, d, d.S, dev);
    // A tile of one sample runs the wide kernel, as one block per tile does (use_wide). A
    // phase's time is its longest chain of dependent loads, which fewer mechanisms per block do
    // not shorten: on an H100 (27b, paper bf16) the 256-thread cluster kernel, one mechanism per
    // block, took 78 us a step against 53 for the 256-thread single block with all six, where
    // the wide single block's 512 threads took 39 (benchmarks/README.md). Not at tile 2, whose
    // 512-thread cluster kernel spills (sm_90a ptxas: 324 bytes in bf16; the single block's 200).
    const bool wide = use_wide(d);
    const auto kernel = wide ? rim_seq_fwd_cluster_kernel<C, T, 1, kSeqWideThreads> : narrow;
    const int threads = wide ? kSeqWideThreads : kSeqThreads;
    // Residency fills a block's shared memory, so one block per SM: worth it when every tile
    // runs at once; with more tiles than that (an explicit tile, or B beyond 8 samples per
    // cluster) the blocks keep the occupancy their arrays allow and read weights from L2.
    if (auto_res) {
      const int64_t cap = max_smem_per_block(dev), tiles = (d.B + d.S - 1) / d.S;
      const bool one_wave =
          tiles <= max_active_clusters(kernel, cluster_ranks(d), cap, threads, dev);
      d.resident = rim_seq_resident_fit(d, tb, cb, one_wave ? cap : bytes(d.S));
    }
    launch_cluster(kernel, seq_fwd_params<T>(c), bytes(d.S), threads, dev);
  });
}

}  // namespace seq_cuda
}  // namespace rims
