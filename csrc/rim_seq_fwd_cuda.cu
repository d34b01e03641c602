// CUDA launcher of rims_fast::rim_seq_fwd: one thread block per tile of S samples runs the whole
// sequence (csrc/kernels/rim_seq_fwd.cuh), its state and per-step activations in shared memory.
// Registered for the CUDA key in rim_seq_fwd.cpp; checks are shared with the CPU implementation.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "rim_seq_fwd.h"

namespace rims {
namespace {

constexpr int kSeqThreads = 256;

struct DeviceExec {
  template <class F>
  __device__ __forceinline__ void parallel_for(int64_t n, const F& f) const {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) f(i);
    __syncthreads();
  }
};

template <typename C, typename T>
__global__ void __launch_bounds__(kSeqThreads) rim_seq_fwd_kernel(const RimSeqFwdParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  rim_seq_fwd_tile<kSeqTileMax, C>(DeviceExec{}, p, static_cast<int64_t>(blockIdx.x),
                                   reinterpret_cast<C*>(smem_raw));
}

// at:: storage types -> CUDA's.
template <typename S> struct CudaType { using type = S; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

template <typename S>
SeqFwdResult launch(RimSeqDims d, const at::Tensor& keys, const at::Tensor& xsrc,
                    const at::Tensor& w_x, const at::Tensor& h0, const at::Tensor& c0,
                    const at::Tensor& wq, const at::Tensor& whh, const at::Tensor& bih,
                    const at::Tensor& bhh, const at::Tensor& cq, const at::Tensor& ck,
                    const at::Tensor& cv, const at::Tensor& co) {
  using T = typename CudaType<S>::type;
  using C = std::conditional_t<std::is_same_v<S, double>, double, float>;
  const auto opt = h0.options();
  at::Tensor out = at::empty({d.T_, d.B, d.K * d.H}, opt);
  at::Tensor h_n = at::empty({d.B, d.K, d.H}, opt);
  at::Tensor c_n = d.lstm ? at::empty({d.B, d.K, d.H}, opt) : at::empty({0}, opt);
  at::Tensor masks = at::empty({d.T_, d.B, d.K}, opt.dtype(at::kBool));

  // The largest tile whose shared memory fits this device's per-block opt-in limit.
  int dev = h0.get_device(), max_smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  auto bytes = [&](int64_t tile_s) {
    return rim_seq_smem_elems(tile_s, d.M, d.K, d.H, d.GH, d.n_in, d.nk, d.Dx, d.n_c, d.ck, d.cv,
                              d.lstm) * static_cast<int64_t>(sizeof(C));
  };
  while (d.S > 1 && bytes(d.S) > max_smem) --d.S;
  TORCH_CHECK(bytes(d.S) <= max_smem, "rims_fast::rim_seq_fwd: one sample needs ", bytes(1),
              " bytes of shared memory, more than this GPU's ", max_smem,
              " per block (K, H or the input width too large for the persistent kernel)");

  RimSeqFwdParams<T> p;
  static_cast<RimSeqDims&>(p) = d;
  p.keys = keys.const_data_ptr();
  p.xsrc = xsrc.const_data_ptr();
  p.w_x = w_x.const_data_ptr();
  p.h0 = reinterpret_cast<const T*>(h0.const_data_ptr());
  p.c0 = d.lstm ? reinterpret_cast<const T*>(c0.const_data_ptr()) : nullptr;
  p.w_query = reinterpret_cast<const T*>(wq.const_data_ptr());
  p.w_hh = reinterpret_cast<const T*>(whh.const_data_ptr());
  p.b_ih = reinterpret_cast<const T*>(bih.const_data_ptr());
  p.b_hh = reinterpret_cast<const T*>(bhh.const_data_ptr());
  p.c_query = reinterpret_cast<const T*>(cq.const_data_ptr());
  p.c_key = reinterpret_cast<const T*>(ck.const_data_ptr());
  p.c_value = reinterpret_cast<const T*>(cv.const_data_ptr());
  p.c_output = reinterpret_cast<const T*>(co.const_data_ptr());
  p.out = reinterpret_cast<T*>(out.mutable_data_ptr());
  p.h_n = reinterpret_cast<T*>(h_n.mutable_data_ptr());
  p.c_n = d.lstm ? reinterpret_cast<T*>(c_n.mutable_data_ptr()) : nullptr;
  p.masks = masks.mutable_data_ptr<bool>();

  const int64_t smem = bytes(d.S);
  const int64_t tiles = (d.B + d.S - 1) / d.S;
  auto kernel = rim_seq_fwd_kernel<C, T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  kernel<<<static_cast<unsigned>(tiles), kSeqThreads, static_cast<size_t>(smem),
           c10::cuda::getCurrentCUDAStream(dev)>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, h_n, c_n, masks};
}

}  // namespace

SeqFwdResult rim_seq_fwd_cuda(
    const at::Tensor& keys, const at::Tensor& xsrc, const at::Tensor& w_x, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& input_query,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh,
    const at::Tensor& comm_query, const at::Tensor& comm_key, const at::Tensor& comm_value,
    const at::Tensor& comm_output, int64_t top_k, int64_t input_heads, int64_t comm_heads,
    bool per_head, double input_dropout, double comm_dropout, int64_t seed, int64_t tile) {
  const RimSeqDims d = seq_fwd_check(keys, xsrc, w_x, h0, c0, input_query, weight_hh, bias_ih,
                                     bias_hh, comm_query, comm_key, comm_value, comm_output,
                                     top_k, input_heads, comm_heads, per_head, input_dropout,
                                     comm_dropout, seed, tile);
  const c10::cuda::CUDAGuard guard(h0.device());
  auto c = [](const at::Tensor& t) { return t.contiguous(); };
  const at::Tensor c0c = d.lstm ? c0->contiguous() : at::Tensor();
  SeqFwdResult res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h0.scalar_type(), "rim_seq_fwd_cuda",
                                  [&] {
    res = launch<scalar_t>(d, c(keys), c(xsrc), c(w_x), c(h0), c0c, c(input_query),
                           c(weight_hh), c(bias_ih), c(bias_hh), c(comm_query), c(comm_key),
                           c(comm_value), c(comm_output));
  });
  return res;
}

}  // namespace rims
