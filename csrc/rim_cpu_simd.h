// Vectorized float32 LSTM pointwise rows for the CPU driver (x86-64 AVX2+FMA, chosen at run time;
// elsewhere, or for the tail of a row, the scalar helpers of kernels/masked_cell.cuh).
//
// Why: the scalar libm expf/tanhf of the shared helpers cost ~55 ns per LSTM element (5
// transcendentals), which made the cell pointwise the largest cost of a paper-sized forward. The
// formulas are those of lstm_pointwise_fwd/bwd; exp is Cephes' expf (range reduction + degree-6
// polynomial, ~1 ulp), tanh is Cephes' tanhf (odd polynomial below 0.625, 1 - 2/(e^{2|x|}+1)
// above), sigmoid(x) = 1 / (1 + e^{-x}). float64 always uses the scalar helpers.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/masked_cell.cuh"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RIMS_HAVE_AVX2_PATH 1
#include <immintrin.h>
#endif

namespace rims {

#ifdef RIMS_HAVE_AVX2_PATH
#define RIMS_AVX2 __attribute__((target("avx2,fma")))

RIMS_AVX2 inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365478515625f)),
                    _mm256_set1_ps(88.3762626647949f));
  const __m256 fx = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

RIMS_AVX2 inline __m256 sigmoid256(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

RIMS_AVX2 inline __m256 tanh256(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_andnot_ps(sign, x);
  // |x| < 0.625: x + x^3 P(x^2)
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-5.70498872745E-3f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954E-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531E-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036E-1f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422E-1f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
  // otherwise: sign(x) (1 - 2 / (e^{2|x|} + 1))
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 e = exp256(_mm256_add_ps(a, a));
  const __m256 big = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
  const __m256 big_signed = _mm256_or_ps(big, _mm256_and_ps(sign, x));
  return _mm256_blendv_ps(big_signed, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
}

// One row: gates g = (i, f, g, o) blocks of H; c previous cell -> h_new, c_new.
RIMS_AVX2 inline int64_t lstm_row_fwd_avx2(const float* g, const float* c, float* h_new,
                                           float* c_new, int64_t H) {
  int64_t j = 0;
  for (; j + 8 <= H; j += 8) {
    const __m256 si = sigmoid256(_mm256_loadu_ps(g + j));
    const __m256 sf = sigmoid256(_mm256_loadu_ps(g + H + j));
    const __m256 tg = tanh256(_mm256_loadu_ps(g + 2 * H + j));
    const __m256 so = sigmoid256(_mm256_loadu_ps(g + 3 * H + j));
    const __m256 cn = _mm256_add_ps(_mm256_mul_ps(sf, _mm256_loadu_ps(c + j)), _mm256_mul_ps(si, tg));
    _mm256_storeu_ps(c_new + j, cn);
    _mm256_storeu_ps(h_new + j, _mm256_mul_ps(so, tanh256(cn)));
  }
  return j;
}

// One row backward: dh, dc (in: grad of c_new; out: grad of c), gates, previous c -> dg (4H).
RIMS_AVX2 inline int64_t lstm_row_bwd_avx2(const float* dh, float* dc, const float* g,
                                           const float* c, float* dg, int64_t H) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t j = 0;
  for (; j + 8 <= H; j += 8) {
    const __m256 si = sigmoid256(_mm256_loadu_ps(g + j));
    const __m256 sf = sigmoid256(_mm256_loadu_ps(g + H + j));
    const __m256 tg = tanh256(_mm256_loadu_ps(g + 2 * H + j));
    const __m256 so = sigmoid256(_mm256_loadu_ps(g + 3 * H + j));
    const __m256 cp = _mm256_loadu_ps(c + j);
    const __m256 cn = _mm256_add_ps(_mm256_mul_ps(sf, cp), _mm256_mul_ps(si, tg));
    const __m256 tc = tanh256(cn);
    const __m256 vdh = _mm256_loadu_ps(dh + j);
    const __m256 dcn = _mm256_add_ps(
        _mm256_loadu_ps(dc + j),
        _mm256_mul_ps(_mm256_mul_ps(vdh, so), _mm256_sub_ps(one, _mm256_mul_ps(tc, tc))));
    _mm256_storeu_ps(dg + 3 * H + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(vdh, tc), so),
                                                   _mm256_sub_ps(one, so)));
    _mm256_storeu_ps(dg + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dcn, tg), si),
                                           _mm256_sub_ps(one, si)));
    _mm256_storeu_ps(dg + H + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dcn, cp), sf),
                                               _mm256_sub_ps(one, sf)));
    _mm256_storeu_ps(dg + 2 * H + j,
                     _mm256_mul_ps(_mm256_mul_ps(dcn, si), _mm256_sub_ps(one, _mm256_mul_ps(tg, tg))));
    _mm256_storeu_ps(dc + j, _mm256_mul_ps(dcn, sf));
  }
  return j;
}

inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif  // RIMS_HAVE_AVX2_PATH

// Row drivers: vector body where available (float only), scalar helpers for the rest.
template <typename S>
inline void lstm_row_fwd(const S* g, const S* c, S* h_new, S* c_new, int64_t H) {
  int64_t j = 0;
#ifdef RIMS_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<S, float>)
    if (cpu_has_avx2()) j = lstm_row_fwd_avx2(g, c, h_new, c_new, H);
#endif
  for (; j < H; ++j)
    lstm_pointwise_fwd(g[j], g[H + j], g[2 * H + j], g[3 * H + j], c[j], h_new[j], c_new[j]);
}

template <typename S>
inline void lstm_row_bwd(const S* dh, S* dc, const S* g, const S* c, S* dg, int64_t H) {
  int64_t j = 0;
#ifdef RIMS_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<S, float>)
    if (cpu_has_avx2()) j = lstm_row_bwd_avx2(dh, dc, g, c, dg, H);
#endif
  for (; j < H; ++j)
    lstm_pointwise_bwd(dh[j], dc[j], g[j], g[H + j], g[2 * H + j], g[3 * H + j], c[j], dg[j],
                       dg[H + j], dg[2 * H + j], dg[3 * H + j], dc[j]);
}

}  // namespace rims
