// Storage <-> compute type conversions of the persistent kernels (float, double; CUDA's __half
// and __nv_bfloat16 under nvcc), usable on host and device.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "masked_cell.cuh"  // RIMS_HD

namespace rims {

RIMS_HD float to_c(float v) { return v; }
RIMS_HD double to_c(double v) { return v; }
template <typename C>
RIMS_HD void from_c(C v, float* p) { *p = static_cast<float>(v); }
template <typename C>
RIMS_HD void from_c(C v, double* p) { *p = static_cast<double>(v); }
#if defined(__CUDACC__)
RIMS_HD float to_c(__half v) { return __half2float(v); }
RIMS_HD float to_c(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename C>
RIMS_HD void from_c(C v, __half* p) { *p = __float2half_rn(static_cast<float>(v)); }
template <typename C>
RIMS_HD void from_c(C v, __nv_bfloat16* p) { *p = __float2bfloat16_rn(static_cast<float>(v)); }
#endif

}  // namespace rims
