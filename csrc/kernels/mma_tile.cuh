// One warp's 8 x 32 output tile of a tensor-core product, K in steps of 16 (WMMA m8n32k16):
// A (8 x 16 per step) row-major and B (16 x 32 per step) column-major (B[k, n] at B[n * ldb + k])
// in the storage type T, accumulated in the compute type. B is column-major because that is
// mma.sync's own operand layout: a row-major B fragment is loaded word by word and transposed in
// registers (MOVM), and each transpose waits for its load, so a warp's weight loads from L2 went
// one k-step at a time whatever the unrolling (sm_90a SASS); column-major, they are plain loads
// that a batch (MmaOperands) keeps in flight together. On the device this is nvcuda::wmma (T = __half or __nv_bfloat16, float
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

// Whether this lane computes and stores a warp's tile. On the device every lane does (the WMMA
// calls are warp-collective). On the host the product is written out whole, so with emulated
// lanes (host_exec.h) lane 0 alone computes and stores it: 32 host threads storing the same
// values into the staging area would be a data race, however benign. The callers' syncwarp after
// the store orders it before the other lanes' reads.
RIMS_HD constexpr bool mma_tile_lane(int lane) {
#if defined(__CUDA_ARCH__)
  return (void)lane, true;
#else
  return lane == 0;
#endif
}

// Up to KB k-steps' operand fragments of one warp, loaded together (load) before their products
// (MmaTile8x32::mma), so that a warp has KB steps' weight loads in flight instead of one (the
// products are bound by the latency of those L2 loads, benchmarks/README.md). On the host it
// keeps the operand pointers and the product reads them.
template <typename T, int KB>
struct MmaOperands {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __device__ void load(int, const T*, int, const T*, int) { __trap(); }
#elif defined(__CUDA_ARCH__)
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 8, 32, 16, T, nvcuda::wmma::row_major> a[KB];
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 8, 32, 16, T, nvcuda::wmma::col_major> b[KB];
  // Slot u (a compile-time index in the callers' unrolled loops, so the fragments stay in
  // registers) = A[0:8, 0:16], B[0:16, 0:32].
  __device__ __forceinline__ void load(int u, const T* A, int lda, const T* B, int ldb) {
    nvcuda::wmma::load_matrix_sync(a[u], A, lda);
    nvcuda::wmma::load_matrix_sync(b[u], B, ldb);
  }
#else
  const T* A[KB] = {};
  const T* B[KB] = {};
  int lda[KB] = {}, ldb[KB] = {};
  void load(int u, const T* a, int la, const T* b, int lb) {
    A[u] = a;
    B[u] = b;
    lda[u] = la;
    ldb[u] = lb;
  }
#endif
};

template <typename T, typename Acc>
struct MmaTile8x32 {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // bfloat16 fragments do not exist below sm_80: never launched there (check_mma_device).
  float c;
  __device__ void zero() { __trap(); }
  template <int KB>
  __device__ void mma(const MmaOperands<T, KB>&, int) { __trap(); }
  __device__ void store(float*, int) { __trap(); }
#elif defined(__CUDA_ARCH__)
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 8, 32, 16, float> c;
  __device__ __forceinline__ void zero() { nvcuda::wmma::fill_fragment(c, 0.0f); }
  // c += the product of ops' slot u (loaded earlier).
  template <int KB>
  __device__ __forceinline__ void mma(const MmaOperands<T, KB>& ops, int u) {
    nvcuda::wmma::mma_sync(c, ops.a[u], ops.b[u], c);
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
  // c += A[0:8, 0:16] B[0:16, 0:32] (B column-major).
  void step(const T* A, int lda, const T* B, int ldb) {
    require(mma_aligned(A) && mma_aligned(B), "operand pointer not 256-bit aligned");
    require(lda % 8 == 0 && ldb % 8 == 0, "operand leading dimension not a multiple of 8");
    for (int i = 0; i < kMmaM; ++i)
      for (int n = 0; n < kMmaN; ++n) {
        Acc s = c[i * kMmaN + n];
        for (int k = 0; k < kMmaK; ++k)
          s += Acc(to_c(A[i * lda + k])) * Acc(to_c(B[n * ldb + k]));
        c[i * kMmaN + n] = s;
      }
  }
  template <int KB>
  void mma(const MmaOperands<T, KB>& ops, int u) {
    step(ops.A[u], ops.lda[u], ops.B[u], ops.ldb[u]);
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
