// Torch-free numerics of a RIM step (SPEC.md steps 1, 2, 4 and "Dropout"), shared by the C++
// CPU driver (csrc/rim_cpu.cpp), future CUDA kernels and the host tests (csrc/tests).
//
// Everything here is pointwise over one (sample, mechanism, head) row: the null softmax and the
// p_k it yields, the competition's rank rule (a comparison count, no sort), the plain softmax of
// the communication, the softmax backward, and the counter-based dropout stream.
#pragma once

#include <cstdint>

#include "masked_cell.cuh"  // RIMS_HD, rims_exp

namespace rims {

// SPEC step 1: softmax over {null, s[0..M)}, the null having score 0. Writes the probabilities of
// the real elements to a[0..M) and returns the null's. The shift mu = max(0, max_m s) is SPEC
// step 2's, so the returned value is exactly what the competition ranks. NaN: unspecified.
template <typename T>
RIMS_HD T null_softmax(const T* s, int64_t M, T* a) {
  T mu = T(0);
  for (int64_t m = 0; m < M; ++m) mu = s[m] > mu ? s[m] : mu;
  T sum = T(0);
  for (int64_t m = 0; m < M; ++m) {
    a[m] = rims_exp(s[m] - mu);
    sum += a[m];
  }
  const T e_null = rims_exp(-mu);
  const T denom = e_null + sum;
  for (int64_t m = 0; m < M; ++m) a[m] = a[m] / denom;
  return e_null / denom;
}

// Plain max-shifted softmax of s[0..n) into y[0..n) (communication attention, SPEC step 4).
template <typename T>
RIMS_HD void softmax(const T* s, int64_t n, T* y) {
  T mu = s[0];
  for (int64_t j = 1; j < n; ++j) mu = s[j] > mu ? s[j] : mu;
  T sum = T(0);
  for (int64_t j = 0; j < n; ++j) {
    y[j] = rims_exp(s[j] - mu);
    sum += y[j];
  }
  for (int64_t j = 0; j < n; ++j) y[j] = y[j] / sum;
}

// Backward of y = softmax(s) restricted to n entries: ds = y * (dy - sum_j y_j dy_j). For the null
// softmax pass the real elements only: the null's score is a constant and its dy is 0, so the
// same formula holds over the real elements. ds may alias dy.
template <typename T>
RIMS_HD void softmax_bwd(const T* y, const T* dy, int64_t n, T* ds) {
  T dot = T(0);
  for (int64_t j = 0; j < n; ++j) dot += y[j] * dy[j];
  for (int64_t j = 0; j < n; ++j) ds[j] = y[j] * (dy[j] - dot);
}

// SPEC step 2: k is active iff #{j : p_j < p_k or (p_j == p_k and j < k)} < top_k. Ties,
// including saturated values, go to the lower index; no sort, so no dependence on a sort's order.
template <typename T>
RIMS_HD bool competition_active(const T* p, int64_t K, int64_t k, int64_t top_k) {
  int64_t beats = 0;
  for (int64_t j = 0; j < K; ++j) beats += (p[j] < p[k]) || (p[j] == p[k] && j < k);
  return beats < top_k;
}

// ---- Dropout: a counter-based stream (splitmix64), so any element's draw is independent of
// the order in which elements are visited (host loops, GPU threads). One 64-bit seed per call;
// stream 0 is the input attention, indexed row-major over (T, B, K, n_in, M), stream 1 the
// communication, row-major over (T, B, K, n_c, K).
RIMS_HD uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform in [0, 1) with 24 random bits (exact in float and double).
RIMS_HD float dropout_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  const uint64_t counter = 2 * index + stream + 1;
  const uint64_t z = splitmix64(seed + 0x9E3779B97F4A7C15ull * counter);
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
}

// Whether element `index` of `stream` survives dropout with probability p (keep prob 1 - p).
RIMS_HD bool dropout_keep(uint64_t seed, uint64_t stream, uint64_t index, float p) {
  return dropout_uniform(seed, stream, index) >= p;
}

}  // namespace rims
