// The batched GEMM of the stepped forward and backward (rim_steps_fwd.h, rim_steps_bwd.h).
#pragma once

#include <ATen/ATen.h>

namespace rims {

// out = a w for each mechanism: a (K, B, kd) in the storage type (a strided view is fine: its rows
// are unit-stride), w (K, kd, n), out (K, B, n) in the compute type, contiguous. float16/bfloat16
// operands accumulate in float32 and the result stays float32 (ATen's bmm with out_dtype: cuBLAS
// on tensor cores); float32 follows PyTorch's TF32 setting, as the reference's matmuls do.
inline void step_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& w) {
  if (a.scalar_type() == out.scalar_type()) {
    at::bmm_out(out, a, w);
    return;
  }
  // cuBLAS cannot return float32 from float16 operands accumulated in float16.
  TORCH_CHECK(a.scalar_type() != at::kHalf || !at::globalContext().allowFP16AccumulationCuBLAS(),
              "rims_fast: the stepped ops accumulate products in float32 (SPEC), which "
              "torch.backends.cuda.matmul.allow_fp16_accumulation=True rules out for float16; "
              "unset it, or use bfloat16");
  at::bmm_out(out, a, w, out.scalar_type());
}

}  // namespace rims
