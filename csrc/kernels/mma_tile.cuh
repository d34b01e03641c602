// One warp's 8 x 32 output tile of a tensor-core product, K in steps of 16 (WMMA m8n32k16):
// A (8 x 16 per step) and B (16 x 32 per step) row-major in the storage type T, accumulated in
// the compute type. On the device this is nvcuda::wmma (T = __half or __nv_bfloat16, float
// accumulators, sm_80+; compiled for an older architecture it traps, and the launchers refuse such
// a device before launching). On the host it is the same product written
// out, for any T, with WMMA's operand requirements asserted (pointers 256-bit aligned, leading
// dimensions multiples of 8 elements for A/B and of 4 for the accumulator store), so that host
// runs of a kernel check its tiling, padding and alignment, which are all the caller decides.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#include <mma.h>
#endif

#include "masked_cell.cuh"  // RIMS_HD
#include "storage_types.cuh"

namespace rims {

constexpr int kMmaM = 8, kMmaN = 32, kMmaK = 16;

RIMS_HD bool mma_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 32 == 0; }

template <typename T, typename Acc>
struct MmaTile8x32 {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // bfloat16 fragments do not exist below sm_80: never launched there (check_mma_device).
  float c;
  __device__ void zero() { __trap(); }
  __device__ void step(const T*, int, const T*, int) { __trap(); }
  __device__ void store(float*, int) { __trap(); }
#elif defined(__CUDA_ARCH__)
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 8, 32, 16, T, nvcuda::wmma::row_major> a;
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 8, 32, 16, T, nvcuda::wmma::row_major> b;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 8, 32, 16, float> c;
  __device__ __forceinline__ void zero() { nvcuda::wmma::fill_fragment(c, 0.0f); }
  // c += A[0:8, 0:16] B[0:16, 0:32].
  __device__ __forceinline__ void step(const T* A, int lda, const T* B, int ldb) {
    nvcuda::wmma::load_matrix_sync(a, A, lda);
    nvcuda::wmma::load_matrix_sync(b, B, ldb);
    nvcuda::wmma::mma_sync(c, a, b, c);
  }
  __device__ __forceinline__ void store(float* C, int ldc) {
    nvcuda::wmma::store_matrix_sync(C, c, ldc, nvcuda::wmma::mem_row_major);
  }
#else
  // Thrown, not asserted: host runs are the tests of these requirements (NDEBUG builds too).
  static void require(bool ok, const char* what) {
    if (!ok) throw std::logic_error(std::string("rims::MmaTile8x32: ") + what);
  }
  Acc c[kMmaM * kMmaN];
  void zero() {
    for (Acc& v : c) v = Acc(0);
  }
  void step(const T* A, int lda, const T* B, int ldb) {
    require(mma_aligned(A) && mma_aligned(B), "operand pointer not 256-bit aligned");
    require(lda % 8 == 0 && ldb % 8 == 0, "operand leading dimension not a multiple of 8");
    for (int i = 0; i < kMmaM; ++i)
      for (int n = 0; n < kMmaN; ++n) {
        Acc s = c[i * kMmaN + n];
        for (int k = 0; k < kMmaK; ++k)
          s += Acc(to_c(A[i * lda + k])) * Acc(to_c(B[k * ldb + n]));
        c[i * kMmaN + n] = s;
      }
  }
  void store(Acc* C, int ldc) const {
    require(mma_aligned(C), "accumulator pointer not 256-bit aligned");
    require(ldc % 4 == 0, "accumulator leading dimension not a multiple of 4");
    for (int i = 0; i < kMmaM; ++i)
      for (int n = 0; n < kMmaN; ++n) C[i * ldc + n] = c[i * kMmaN + n];
  }
#endif
};

}  // namespace rims
