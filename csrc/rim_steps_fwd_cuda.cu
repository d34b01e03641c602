// CUDA implementation of rims_fast::rim_steps_fwd (rim_steps_fwd.h): the driver's four phases per
// step as kernels on the current stream (rim_steps_cuda.cuh), between its ATen (cuBLAS) GEMMs.
// Registered for the CUDA key in rim_steps_fwd.cpp.
#include <type_traits>

#include "rim_steps_cuda.cuh"
#include "rim_steps_fwd.h"

namespace rims {
using namespace steps_cuda;
namespace {

template <typename T>
constexpr bool kHalfStorage = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

template <typename C, typename T>
struct SelectPhase {
  RimStepParams<T> p;
  int64_t t;
  __device__ void operator()(const seq_cuda::DeviceExec& ex, int64_t b, unsigned char* smem) const {
    rim_step_select<C>(ex, p, t, b, reinterpret_cast<C*>(smem));
  }
};
template <typename C, typename T>
struct CellPhase {
  RimStepParams<T> p;
  int64_t t;
  __device__ void operator()(int64_t i) const { rim_step_cell<C>(p, t, i); }
};
template <typename C, typename T>
struct GatesCellPhase {
  RimStepParams<T> p;
  int64_t t;
  __device__ void operator()(const seq_cuda::DeviceExec& ex, int64_t blk,
                             unsigned char* smem) const {
    rim_step_gates_cell<C>(ex, p, t, blk, reinterpret_cast<C*>(smem));
  }
};
template <typename C, typename T>
struct OutputResidualPhase {
  RimStepParams<T> p;
  int64_t t;
  __device__ void operator()(const seq_cuda::DeviceExec& ex, int64_t blk,
                             unsigned char* smem) const {
    rim_step_output_residual<C>(ex, p, t, blk, reinterpret_cast<C*>(smem));
  }
};
template <typename C, typename T>
struct CommPhase {
  RimStepParams<T> p;
  int64_t t;
  __device__ void operator()(const seq_cuda::DeviceExec& ex, int64_t b, unsigned char* smem) const {
    rim_step_comm<C>(ex, p, t, b, reinterpret_cast<C*>(smem));
  }
};
template <typename C, typename T>
struct ResidualPhase {
  RimStepParams<T> p;
  int64_t t;
  __device__ void operator()(int64_t i) const { rim_step_residual<C>(p, t, i); }
};

struct StepCudaDev {
  cudaStream_t stream;
  bool pdl;  // use_pdl
  int device;

  // RIMS_FAST_CUDA_FUSED=1 where the tensor-core kernels run: float16/bfloat16 storage on sm_80+.
  // Elsewhere (float32/float64; an older GPU) the GEMM path runs, and says so once: the switch is
  // process-wide, and a layer it cannot speed up should still run (backend="auto" never raises).
  template <typename T>
  StepFusion fusion(const RimSeqDims& d) const {
    const StepFusion fz = use_fused(d);
    if (!fz.output) return fz;
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    if (kHalfStorage<T> && major >= 8) return fz;
    TORCH_WARN_ONCE("rims_fast stepped ops: RIMS_FAST_CUDA_FUSED=1 applies to float16/bfloat16 "
                    "layers on compute capability 8.0 or newer; this one (",
                    kHalfStorage<T> ? "16-bit" : "float32/float64", ", sm_", major,
                    "x) runs the GEMMs and the small kernels");
    return StepFusion{};
  }

  template <typename C, typename T>
  void select(const RimStepParams<T>& p, int64_t t) const {
    for_samples<kPhaseThreads>(SelectPhase<C, T>{p, t}, p.s.B,
                static_cast<size_t>(rim_step_select_smem_elems(p.s, sizeof(C))) * sizeof(C),
                stream, pdl);
  }
  template <typename C, typename T>
  void cell(const RimStepParams<T>& p, int64_t t) const {
    for_items(CellPhase<C, T>{p, t}, p.s.B * p.s.K * p.s.H, stream, pdl);
  }
  // The fused kernels (RIMS_FAST_CUDA_FUSED=1): tensor-core products (WMMA, sm_80+) of
  // float16/bfloat16 operands.
  template <typename C, typename T>
  void gates_cell(const RimStepParams<T>& p, int64_t t) const {
    if constexpr (kHalfStorage<T>) {
      fused_blocks<C, T>(GatesCellPhase<C, T>{p, t}, rim_step_gates_grid(p.s));
    } else {
      refuse_fused();
    }
  }
  template <typename C, typename T>
  void output_residual(const RimStepParams<T>& p, int64_t t) const {
    if constexpr (kHalfStorage<T>) {
      fused_blocks<C, T>(OutputResidualPhase<C, T>{p, t}, rim_step_output_grid(p.s));
    } else {
      refuse_fused();
    }
  }
  template <typename C, typename T, class F>
  void fused_blocks(const F& f, const StepMmaGrid& g) const {
    for_samples(f, g.blocks(sizeof(T)),
                static_cast<size_t>(g.smem_elems(sizeof(C), sizeof(T))) * sizeof(C), stream, pdl);
  }
  static void refuse_fused() {  // unreachable: fusion<T> turns fusion off for these types
    TORCH_CHECK(false, "rims_fast stepped ops: the fused kernels need float16/bfloat16");
  }
  template <typename C, typename T>
  void comm(const RimStepParams<T>& p, int64_t t) const {
    for_samples<kPhaseThreads>(CommPhase<C, T>{p, t}, p.s.B,
                static_cast<size_t>(rim_step_comm_smem_elems(p.s, sizeof(C))) * sizeof(C),
                stream, pdl);
  }
  template <typename C, typename T>
  void residual(const RimStepParams<T>& p, int64_t t) const {
    for_items(ResidualPhase<C, T>{p, t}, p.s.B * p.s.K * p.s.H, stream, pdl);
  }
};

}  // namespace

SeqFwdResult rim_steps_fwd_cuda(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, bool save) {
  const c10::cuda::CUDAGuard guard(h0.device());
  SeqFwdCall c = seq_fwd_prepare(keys, xsrc, w_x, h0, c0, input_query, weight_hh, bias_ih,
                                 bias_hh, comm_query, comm_key, comm_value, comm_output, top_k,
                                 input_heads, comm_heads, per_head, input_dropout, comm_dropout,
                                 seed, /*tile=*/1, save, /*mma=*/false, /*cluster=*/0,
                                 /*resident=*/0, /*xw=*/0);
  const StepCudaDev dev{c10::cuda::getCurrentCUDAStream(h0.get_device()).stream(),
                        use_pdl(h0.get_device()), h0.get_device()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h0.scalar_type(), "rim_steps_fwd_cuda",
                                  [&] {
    using T = typename seq_cuda::CudaType<scalar_t>::type;
    using C = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    rim_steps_run<C, T>(c, dev);
  });
  return c.res;
}

}  // namespace rims
