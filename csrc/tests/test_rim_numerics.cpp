// Host tests of kernels/rim_numerics.h (no torch, no GPU): the null softmax against long double
// (including saturation and the p_k = 1/(M+1) of a zero state), the softmax backward against
// finite differences, the competition's rank rule on ties, and the dropout stream's rate and
// determinism. Float and double.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "rim_numerics.h"

namespace {

int failures = 0;
int checks = 0;

void expect(const char* what, bool ok) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what);
  }
}

void expect_close(const char* what, long double got, long double want, long double tol) {
  ++checks;
  if (!(std::fabs(got - want) <= tol * (1 + std::fabs(want)))) {
    ++failures;
    std::printf("FAIL %s: got %.17Lg want %.17Lg\n", what, got, want);
  }
}

template <typename T>
void test_null_softmax(std::mt19937_64& rng) {
  const long double tol = sizeof(T) == 4 ? 1e-6L : 1e-14L;
  std::uniform_real_distribution<double> u(-8, 8);
  for (int M : {1, 2, 3, 7}) {
    for (int trial = 0; trial < 50; ++trial) {
      std::vector<T> s(M), a(M);
      for (auto& v : s) v = T(u(rng));
      const T a_null = rims::null_softmax(s.data(), M, a.data());
      long double den = 1.0L;  // the null's e^0
      for (T v : s) den += std::exp((long double)v);
      expect_close("null_softmax a_null", a_null, 1.0L / den, tol);
      for (int m = 0; m < M; ++m)
        expect_close("null_softmax a", a[m], std::exp((long double)s[m]) / den, tol);
    }
    // Zero scores (zero state): every probability is exactly 1/(M+1).
    std::vector<T> s(M, T(0)), a(M);
    const T a_null = rims::null_softmax(s.data(), M, a.data());
    expect("null_softmax zero state exact", a_null == T(1) / T(M + 1));
  }
  // Saturation: huge scores give a_null == 0 exactly, no NaN; very negative give 1.
  T s_big[2] = {T(1e4), T(3)}, a[2];
  expect("null_softmax saturates to 0", rims::null_softmax(s_big, 2, a) == T(0) && a[0] == T(1));
  T s_neg[2] = {T(-1e4), T(-2e4)};
  expect("null_softmax saturates to 1", rims::null_softmax(s_neg, 2, a) == T(1));
}

template <typename T>
void test_softmax_bwd(std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(-2, 2);
  for (int n : {1, 3, 6}) {
    std::vector<double> s(n), dy(n), y(n), ds(n);
    for (int j = 0; j < n; ++j) s[j] = u(rng), dy[j] = u(rng);
    rims::softmax(s.data(), n, y.data());
    rims::softmax_bwd(y.data(), dy.data(), n, ds.data());
    for (int i = 0; i < n; ++i) {  // L = sum_j dy_j y_j(s)
      const double eps = 1e-6;
      std::vector<double> sp = s, sm = s, yp(n), ym(n);
      sp[i] += eps, sm[i] -= eps;
      rims::softmax(sp.data(), n, yp.data());
      rims::softmax(sm.data(), n, ym.data());
      double fd = 0;
      for (int j = 0; j < n; ++j) fd += dy[j] * (yp[j] - ym[j]) / (2 * eps);
      expect_close("softmax_bwd", ds[i], fd, 1e-8L);
    }
    // The null softmax's backward is the same formula over the real elements.
    std::vector<double> a(n), da(n);
    rims::null_softmax(s.data(), n, a.data());
    rims::softmax_bwd(a.data(), dy.data(), n, da.data());
    for (int i = 0; i < n; ++i) {
      const double eps = 1e-6;
      std::vector<double> sp = s, sm = s, ap(n), am(n);
      sp[i] += eps, sm[i] -= eps;
      rims::null_softmax(sp.data(), n, ap.data());
      rims::null_softmax(sm.data(), n, am.data());
      double fd = 0;
      for (int j = 0; j < n; ++j) fd += dy[j] * (ap[j] - am[j]) / (2 * eps);
      expect_close("null_softmax bwd", da[i], fd, 1e-8L);
    }
  }
}

void test_competition() {
  // Smallest p wins; ties go to the lower index.
  const float p1[5] = {0.3f, 0.1f, 0.2f, 0.1f, 0.5f};
  bool want1[5] = {false, true, true, true, false};  // top_k = 3: 1, 3 (tie, both), then 2
  for (int k = 0; k < 5; ++k) expect("rank basic", rims::competition_active(p1, 5, k, 3) == want1[k]);
  const float p2[4] = {0.25f, 0.25f, 0.25f, 0.25f};  // zero state: all tie
  for (int k = 0; k < 4; ++k) expect("rank all tie", rims::competition_active(p2, 4, k, 2) == (k < 2));
  const double p3[4] = {0.0, 1.0, 0.0, 0.0};  // saturated values tie too
  for (int k = 0; k < 4; ++k)
    expect("rank saturated", rims::competition_active(p3, 4, k, 2) == (k == 0 || k == 2));
  for (int k = 0; k < 4; ++k) expect("rank top_k = K", rims::competition_active(p3, 4, k, 4));
}

void test_dropout() {
  for (float p : {0.1f, 0.5f, 0.9f}) {
    int kept = 0;
    const int n = 200000;
    for (int i = 0; i < n; ++i) kept += rims::dropout_keep(1234, 0, i, p);
    expect("dropout rate", std::fabs(kept / double(n) - (1 - p)) < 0.005);
  }
  expect("dropout p=0 keeps all", rims::dropout_keep(5, 1, 77, 0.0f));
  // Deterministic per (seed, stream, index); streams and seeds differ.
  int same_stream = 0, same_seed = 0;
  for (int i = 0; i < 1000; ++i) {
    expect("dropout deterministic",
           rims::dropout_uniform(9, 0, i) == rims::dropout_uniform(9, 0, i));
    same_stream += rims::dropout_uniform(9, 0, i) == rims::dropout_uniform(9, 1, i);
    same_seed += rims::dropout_uniform(9, 0, i) == rims::dropout_uniform(10, 0, i);
    const float v = rims::dropout_uniform(9, 0, i);
    expect("dropout in [0, 1)", v >= 0.0f && v < 1.0f);
  }
  expect("dropout streams independent", same_stream < 5 && same_seed < 5);
}

}  // namespace

int main() {
  std::mt19937_64 rng(7);
  test_null_softmax<float>(rng);
  test_null_softmax<double>(rng);
  test_softmax_bwd<double>(rng);
  test_competition();
  test_dropout();
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
