// Host tests of kernels/masked_cell.cuh (no torch, no GPU): the pointwise LSTM/GRU helpers are
// checked against long double formulas (forward) and central finite differences (backward), in
// float and double, and the masked element functions against the helpers plus exact copies.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "masked_cell.cuh"

namespace {

int failures = 0;
int checks = 0;

void expect_close(const char* what, long double got, long double want, long double tol) {
  ++checks;
  const long double err = std::fabs(got - want);
  if (!(err <= tol * (1 + std::fabs(want)))) {  // also fails on NaN
    ++failures;
    std::printf("FAIL %s: got %.17Lg want %.17Lg (err %.3Lg, tol %.3Lg)\n", what, got, want, err,
                tol);
  }
}

void expect(const char* what, bool ok) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what);
  }
}

long double sig_ld(long double x) { return 1.0L / (1.0L + std::exp(-x)); }

template <typename T>
constexpr long double fwd_tol() {
  return sizeof(T) == 4 ? 2e-6L : 1e-14L;
}

template <typename T>
void test_sigmoid() {
  const char* name = sizeof(T) == 4 ? "sigmoid<float>" : "sigmoid<double>";
  for (long double x : {-1000.0L, -100.0L, -30.0L, -5.0L, -1.0L, -1e-3L, 0.0L, 1e-3L, 1.0L, 5.0L,
                        30.0L, 100.0L, 1000.0L}) {
    const long double want = sig_ld(static_cast<T>(x));
    const T got = rims::sigmoid(static_cast<T>(x));
    // Relative to the value itself (the two-branch form keeps precision for tiny results), down
    // to T's smallest normal number, below which results are subnormal or flush to zero.
    ++checks;
    if (!(std::fabs(got - want) <= fwd_tol<T>() * want + std::numeric_limits<T>::min())) {
      ++failures;
      std::printf("FAIL %s(%Lg): got %.17g want %.17Lg\n", name, x, double(got), want);
    }
  }
}

// Inputs in a range where every gate matters (not saturated) so differences are visible.
template <typename T>
std::vector<T> draw(std::mt19937_64& rng, int n, double scale = 2.0) {
  std::uniform_real_distribution<double> u(-scale, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(u(rng));
  return v;
}

template <typename T>
void test_lstm(std::mt19937_64& rng) {
  for (int trial = 0; trial < 200; ++trial) {
    const auto v = draw<T>(rng, 7);  // i, f, g, o, c, dh, dc
    const T i = v[0], f = v[1], g = v[2], o = v[3], c = v[4], dh = v[5], dc = v[6];
    T h_new, c_new;
    rims::lstm_pointwise_fwd(i, f, g, o, c, h_new, c_new);
    const long double cw = sig_ld(f) * c + sig_ld(i) * std::tanh((long double)g);
    expect_close("lstm c_new", c_new, cw, fwd_tol<T>());
    expect_close("lstm h_new", h_new, sig_ld(o) * std::tanh(cw), fwd_tol<T>());

    T d[5];
    rims::lstm_pointwise_bwd(dh, dc, i, f, g, o, c, d[0], d[1], d[2], d[3], d[4]);
    // Finite differences of L = dh * h_new + dc * c_new, in double whatever T is.
    const double x0[5] = {double(i), double(f), double(g), double(o), double(c)};
    const double eps = 1e-6;
    static const char* names[5] = {"lstm d_i", "lstm d_f", "lstm d_g", "lstm d_o", "lstm d_c"};
    for (int k = 0; k < 5; ++k) {
      double xp[5], xm[5];
      std::memcpy(xp, x0, sizeof xp);
      std::memcpy(xm, x0, sizeof xm);
      xp[k] += eps;
      xm[k] -= eps;
      double hp, cp, hm, cm;
      rims::lstm_pointwise_fwd(xp[0], xp[1], xp[2], xp[3], xp[4], hp, cp);
      rims::lstm_pointwise_fwd(xm[0], xm[1], xm[2], xm[3], xm[4], hm, cm);
      const double fd = (dh * (hp - hm) + dc * (cp - cm)) / (2 * eps);
      expect_close(names[k], d[k], fd, sizeof(T) == 4 ? 1e-5L : 1e-8L);
    }
  }
}

template <typename T>
void test_gru(std::mt19937_64& rng) {
  for (int trial = 0; trial < 200; ++trial) {
    const auto v = draw<T>(rng, 8);  // ir, iz, in, hr, hz, hn, h, dh
    const long double r = sig_ld((long double)v[0] + v[3]), z = sig_ld((long double)v[1] + v[4]);
    const long double n = std::tanh((long double)v[2] + r * v[5]);
    const T got = rims::gru_pointwise_fwd(v[0], v[1], v[2], v[3], v[4], v[5], v[6]);
    expect_close("gru h_new", got, (1 - z) * n + z * v[6], fwd_tol<T>());

    T d[7];
    rims::gru_pointwise_bwd(v[7], v[0], v[1], v[2], v[3], v[4], v[5], v[6], d[0], d[1], d[2],
                            d[3], d[4], d[5], d[6]);
    const double eps = 1e-6;
    static const char* names[7] = {"gru d_ir", "gru d_iz", "gru d_in", "gru d_hr",
                                   "gru d_hz", "gru d_hn", "gru d_h"};
    for (int k = 0; k < 7; ++k) {
      double xp[7], xm[7];
      for (int q = 0; q < 7; ++q) xp[q] = xm[q] = double(v[q]);
      xp[k] += eps;
      xm[k] -= eps;
      const double fp = rims::gru_pointwise_fwd(xp[0], xp[1], xp[2], xp[3], xp[4], xp[5], xp[6]);
      const double fm = rims::gru_pointwise_fwd(xm[0], xm[1], xm[2], xm[3], xm[4], xm[5], xm[6]);
      expect_close(names[k], d[k], double(v[7]) * (fp - fm) / (2 * eps),
                   sizeof(T) == 4 ? 1e-5L : 1e-8L);
    }
  }
}

// Two rows of H elements, row 0 active, row 1 inactive: the element functions must equal the
// pointwise helpers on row 0, copy row 1 bit-exactly and zero its gate gradients.
template <typename T>
void test_masked_elements(std::mt19937_64& rng) {
  const int H = 5, rows = 2;
  const bool mask[rows] = {true, false};
  auto gates = draw<T>(rng, rows * 4 * H), h = draw<T>(rng, rows * H), c = draw<T>(rng, rows * H);
  auto gh = draw<T>(rng, rows * H), gc = draw<T>(rng, rows * H);
  std::vector<T> h_new(rows * H, T(NAN)), c_new(rows * H, T(NAN));
  rims::MaskedLstmFwdParams<T> fp{gates.data(), h.data(), c.data(), mask, h_new.data(),
                                  c_new.data(), rows, H, 4 * H, H};
  std::vector<T> dg(rows * 4 * H, T(NAN)), dh(rows * H, T(NAN)), dc(rows * H, T(NAN));
  rims::MaskedLstmBwdParams<T> bp{gh.data(), gc.data(), gates.data(), c.data(), mask, dg.data(),
                                  dh.data(), dc.data(), rows, H, 4 * H, H};
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < H; ++j) {
      rims::masked_lstm_fwd_element(fp, r, j);
      rims::masked_lstm_bwd_element(bp, r, j);
    }
  for (int j = 0; j < H; ++j) {
    const T* g = &gates[j];
    T hw, cw, d[5];
    rims::lstm_pointwise_fwd(g[0], g[H], g[2 * H], g[3 * H], c[j], hw, cw);
    rims::lstm_pointwise_bwd(gh[j], gc[j], g[0], g[H], g[2 * H], g[3 * H], c[j], d[0], d[1], d[2],
                             d[3], d[4]);
    expect("lstm active h_new", h_new[j] == hw && c_new[j] == cw);
    expect("lstm active grads", dg[j] == d[0] && dg[H + j] == d[1] && dg[2 * H + j] == d[2] &&
                                    dg[3 * H + j] == d[3] && dc[j] == d[4] && dh[j] == T(0));
    const int s = H + j;
    expect("lstm inactive copy", h_new[s] == h[s] && c_new[s] == c[s]);
    expect("lstm inactive grads", dh[s] == gh[s] && dc[s] == gc[s]);
    for (int q = 0; q < 4; ++q) expect("lstm inactive grad_gates == 0", dg[4 * H + q * H + j] == 0);
  }

  auto gi = draw<T>(rng, rows * 3 * H), ghh = draw<T>(rng, rows * 3 * H);
  std::vector<T> hn(rows * H, T(NAN)), dgi(rows * 3 * H, T(NAN)), dgh(rows * 3 * H, T(NAN));
  std::vector<T> dhh(rows * H, T(NAN));
  rims::MaskedGruFwdParams<T> gfp{gi.data(), ghh.data(), h.data(), mask, hn.data(), rows, H,
                                  3 * H, H};
  rims::MaskedGruBwdParams<T> gbp{gh.data(), gi.data(), ghh.data(), h.data(), mask, dgi.data(),
                                  dgh.data(), dhh.data(), rows, H, 3 * H, H};
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < H; ++j) {
      rims::masked_gru_fwd_element(gfp, r, j);
      rims::masked_gru_bwd_element(gbp, r, j);
    }
  for (int j = 0; j < H; ++j) {
    const T *a = &gi[j], *b = &ghh[j];
    T d[7];
    const T hw = rims::gru_pointwise_fwd(a[0], a[H], a[2 * H], b[0], b[H], b[2 * H], h[j]);
    rims::gru_pointwise_bwd(gh[j], a[0], a[H], a[2 * H], b[0], b[H], b[2 * H], h[j], d[0], d[1],
                            d[2], d[3], d[4], d[5], d[6]);
    expect("gru active h_new", hn[j] == hw);
    bool ok = dhh[j] == d[6];
    for (int q = 0; q < 3; ++q) ok = ok && dgi[q * H + j] == d[q] && dgh[q * H + j] == d[3 + q];
    expect("gru active grads", ok);
    const int s = H + j;
    expect("gru inactive copy", hn[s] == h[s] && dhh[s] == gh[s]);
    for (int q = 0; q < 3; ++q)
      expect("gru inactive grads == 0", dgi[3 * H + q * H + j] == 0 && dgh[3 * H + q * H + j] == 0);
  }
}

}  // namespace

int main() {
  std::mt19937_64 rng(1234);
  test_sigmoid<float>();
  test_sigmoid<double>();
  test_lstm<float>(rng);
  test_lstm<double>(rng);
  test_gru<float>(rng);
  test_gru<double>(rng);
  test_masked_elements<float>(rng);
  test_masked_elements<double>(rng);
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
