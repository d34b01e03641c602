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

// The clamp's operand order matters: x86 min/max return their second operand when either is NaN,
// so x goes second and a NaN argument stays NaN (README: NaN propagates) instead of clamping.
RIMS_AVX2 inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f),
                    _mm256_max_ps(_mm256_set1_ps(-87.3365478515625f), x));
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
  if (j < H) {  // tail: padded to one vector (scalar libm would cost as much as the body)
    const int64_t r = H - j;
    alignas(32) float gb[4][8] = {}, cb[8] = {}, hb[8], cnb[8];
    for (int64_t i = 0; i < r; ++i) {
      for (int q = 0; q < 4; ++q) gb[q][i] = g[q * H + j + i];
      cb[i] = c[j + i];
    }
    const __m256 si = sigmoid256(_mm256_load_ps(gb[0]));
    const __m256 sf = sigmoid256(_mm256_load_ps(gb[1]));
    const __m256 tg = tanh256(_mm256_load_ps(gb[2]));
    const __m256 so = sigmoid256(_mm256_load_ps(gb[3]));
    const __m256 cn = _mm256_add_ps(_mm256_mul_ps(sf, _mm256_load_ps(cb)), _mm256_mul_ps(si, tg));
    _mm256_store_ps(cnb, cn);
    _mm256_store_ps(hb, _mm256_mul_ps(so, tanh256(cn)));
    for (int64_t i = 0; i < r; ++i) {
      c_new[j + i] = cnb[i];
      h_new[j + i] = hb[i];
    }
    j = H;
  }
  return j;
}

// One row backward: dh, dc (in: grad of c_new; out: grad of c), gates, previous c -> dg (4H).
// 8 lanes of the backward; dh, dc, c, dg rows with strides (gate blocks gs apart in g and dg).
RIMS_AVX2 inline void lstm_bwd8(const float* dh, float* dc, const float* g, const float* c,
                                float* dg, int64_t gs) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const int64_t H = gs, j = 0;
  {
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
}

RIMS_AVX2 inline int64_t lstm_row_bwd_avx2(const float* dh, float* dc, const float* g,
                                           const float* c, float* dg, int64_t H) {
  int64_t j = 0;
  for (; j + 8 <= H; j += 8) lstm_bwd8(dh + j, dc + j, g + j, c + j, dg + j, H);
  if (j < H) {  // tail: padded to one vector
    const int64_t r = H - j;
    alignas(32) float dhb[8] = {}, dcb[8] = {}, gb[32] = {}, cb[8] = {}, dgb[32];
    for (int64_t i = 0; i < r; ++i) {
      dhb[i] = dh[j + i], dcb[i] = dc[j + i], cb[i] = c[j + i];
      for (int q = 0; q < 4; ++q) gb[q * 8 + i] = g[q * H + j + i];
    }
    lstm_bwd8(dhb, dcb, gb, cb, dgb, 8);
    for (int64_t i = 0; i < r; ++i) {
      dc[j + i] = dcb[i];
      for (int q = 0; q < 4; ++q) dg[q * H + j + i] = dgb[q * 8 + i];
    }
    j = H;
  }
  return j;
}

// AVX-512F versions of the same formulas, 16 lanes (the forward row only). GCC 12's
// avx512fintrin.h trips -Wuninitialized (_mm512_undefined_*) when inlined under a target
// attribute: silenced here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define RIMS_AVX512 __attribute__((target("avx512f,avx2,fma")))
RIMS_AVX512 inline __m512 exp512(__m512 x) {  // NaN-preserving clamp: see exp256
  x = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f),
                    _mm512_max_ps(_mm512_set1_ps(-87.3365478515625f), x));
  const __m512 fx = _mm512_roundscale_ps(
      _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, z, _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  const __m512i n = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(n));
}

RIMS_AVX512 inline __m512 sigmoid512(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

RIMS_AVX512 inline __m512 tanh512(__m512 x) {
  const __m512 a = _mm512_abs_ps(x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(-5.70498872745E-3f);
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.06390887954E-2f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-5.37397155531E-2f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.33314422036E-1f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-3.33332819422E-1f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp512(_mm512_add_ps(a, a));
  const __m512 big = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
  // sign(x) * big: copy x's sign bit
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(int(0x80000000u)));
  const __m512 big_signed = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(big), sign));
  const __mmask16 is_small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.625f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(is_small, big_signed, small);
}

// One row forward, 16 lanes at a time; the tail (< 16) is masked.
RIMS_AVX512 inline int64_t lstm_row_fwd_avx512(const float* g, const float* c, float* h_new,
                                               float* c_new, int64_t H) {
  for (int64_t j = 0; j < H; j += 16) {
    const __mmask16 m = H - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (H - j)) - 1u);
    const __m512 si = sigmoid512(_mm512_maskz_loadu_ps(m, g + j));
    const __m512 sf = sigmoid512(_mm512_maskz_loadu_ps(m, g + H + j));
    const __m512 tg = tanh512(_mm512_maskz_loadu_ps(m, g + 2 * H + j));
    const __m512 so = sigmoid512(_mm512_maskz_loadu_ps(m, g + 3 * H + j));
    const __m512 cn =
        _mm512_add_ps(_mm512_mul_ps(sf, _mm512_maskz_loadu_ps(m, c + j)), _mm512_mul_ps(si, tg));
    _mm512_mask_storeu_ps(c_new + j, m, cn);
    _mm512_mask_storeu_ps(h_new + j, m, _mm512_mul_ps(so, tanh512(cn)));
  }
  return H;
}

#pragma GCC diagnostic pop

inline bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
                         __builtin_cpu_supports("fma");
  return ok;
}

inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif  // RIMS_HAVE_AVX2_PATH

#ifdef RIMS_HAVE_AVX2_PATH
RIMS_AVX2 inline void exp_inplace_avx2(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp256(_mm256_loadu_ps(x + i)));
  if (i < n) {
    alignas(32) float b[8] = {};
    for (int64_t j = 0; j < n - i; ++j) b[j] = x[i + j];
    _mm256_store_ps(b, exp256(_mm256_load_ps(b)));
    for (int64_t j = 0; j < n - i; ++j) x[i + j] = b[j];
  }
}
#endif

#ifdef RIMS_HAVE_AVX2_PATH
RIMS_AVX2 inline float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  float sum = _mm_cvtss_f32(v);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

RIMS_AVX2 inline void axpy_avx2(float w, const float* x, float* y, int64_t n) {
  const __m256 vw = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vw, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += w * x[i];
}
#endif

// sum_i a[i] b[i] (8 partial sums; AVX2+FMA for float where available).
template <typename S>
inline S dot_n(const S* a, const S* b, int64_t n) {
#ifdef RIMS_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<S, float>)
    if (cpu_has_avx2()) return dot_avx2(a, b, n);
#endif
  S acc[8] = {S(0), S(0), S(0), S(0), S(0), S(0), S(0), S(0)};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  S sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y[i] += w x[i] for i < n.
template <typename S>
inline void axpy_n(S w, const S* x, S* y, int64_t n) {
#ifdef RIMS_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<S, float>)
    if (cpu_has_avx2()) return axpy_avx2(w, x, y, n);
#endif
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

// x[i] = exp(x[i]) for i < n: the vector exp for float where available, else rims_exp.
template <typename S>
inline void exp_inplace(S* x, int64_t n) {
#ifdef RIMS_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<S, float>)
    if (cpu_has_avx2()) {
      exp_inplace_avx2(x, n);
      return;
    }
#endif
  for (int64_t i = 0; i < n; ++i) x[i] = rims_exp(x[i]);
}

// Row drivers: vector body where available (float only), scalar helpers for the rest.
template <typename S>
inline void lstm_row_fwd(const S* g, const S* c, S* h_new, S* c_new, int64_t H) {
  int64_t j = 0;
#ifdef RIMS_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<S, float>) {
    if (cpu_has_avx512())
      j = lstm_row_fwd_avx512(g, c, h_new, c_new, H);
    else if (cpu_has_avx2())
      j = lstm_row_fwd_avx2(g, c, h_new, c_new, H);
  }
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
