// Host tests of kernels/column_dot.cuh (no torch, no GPU): columns_dot's grouped sums equal the
// plain per-column loop bit for bit (same FMAs in the same order), for widths that do and do not
// fill the last group, row strides with and without vector alignment, a base pointer off the
// vector alignment, reduction lengths around the load batch, a use mask that depends on the
// sample and the reduction index, and fewer samples than accumulators. Float (4 columns per item)
// and double (2); float over 16-bit weights at tiles of 1 (32-row batches) and 2.
// hoisted_input_term likewise against its plain loop (per-sample rows, skipped samples).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <random>
#include <vector>

#include "column_dot.cuh"

namespace {

int failures = 0;
int checks = 0;

template <typename C>
bool same_bits(C a, C b) { return std::memcmp(&a, &b, sizeof(C)) == 0; }

// A 16-bit storage type on the host (bfloat16's bits: the upper half of a float), so that the
// packed batches of 16-bit weights (kVectorBatch: 32 rows at tile 1) run here too.
struct Bf16 {
  uint16_t bits;
};
float to_c(Bf16 v) {
  const uint32_t b = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
template <typename W>
W store(double v) {
  if constexpr (sizeof(W) == 2) {
    const float f = float(v);
    uint32_t b;
    std::memcpy(&b, &f, sizeof b);
    return W{uint16_t(b >> 16)};
  } else {
    return W(v);
  }
}

// C: compute type, W: storage type of the weights, SMAX accumulators per column of which S used.
template <typename C, typename W, int SMAX, int S>
void test_columns(std::mt19937_64& rng, std::initializer_list<int> lengths) {
  using rims::to_c;  // beside Bf16's
  constexpr int NC = rims::kColumnsOf<C>;
  std::uniform_real_distribution<double> u(-1, 1);
  for (int width : {1, 3, 4, 5, 8, 9, 12}) {
    for (int extra : {0, 1, 4}) {  // row stride = width + extra
      for (int shift : {0, 1}) {   // base pointer 0 or 1 element past the buffer's alignment
        for (int n : lengths) {
          const int ld = width + extra;
          std::vector<W> buf(size_t(n) * ld + 8);
          std::vector<C> rows(static_cast<size_t>(SMAX) * n);
          for (auto& v : buf) v = store<W>(u(rng));
          for (auto& v : rows) v = C(u(rng));
          const W* w = buf.data() + shift;
          auto row = [&](int s, int64_t j) { return rows[size_t(s) * n + j]; };
          auto use = [&](int s, int64_t j) { return (s + j) % 5 != 3; };
          for (int c0 = 0; c0 < width; c0 += NC) {
            const int nc = rims::min_int(NC, width - c0);
            C acc[NC][SMAX];
            rims::columns_fill(acc, C(0.25));
            rims::columns_dot(acc, S, n, w + c0, ld, nc, row, use);
            for (int c = 0; c < nc; ++c)
              for (int s = 0; s < SMAX; ++s) {
                C want = C(0.25);
                for (int j = 0; j < n; ++j)
                  if (s < S && use(s, j)) want += row(s, j) * to_c(w[size_t(j) * ld + c0 + c]);
                ++checks;
                if (!same_bits(acc[c][s], want)) {
                  ++failures;
                  std::printf("FAIL C %zu W %zu SMAX %d width %d ld %d shift %d n %d col %d s %d: "
                              "%.17g vs %.17g\n", sizeof(C), sizeof(W), SMAX, width, ld, shift, n,
                              c0 + c, s, double(acc[c][s]), double(want));
                }
              }
          }
        }
      }
    }
  }
}

// hoisted_input_term: per sample its own rows (rowof), coefficients a(s, j), samples with
// on(s) false and s >= S untouched; the plain loop's sums bit for bit, vector and scalar loads.
template <typename C>
void test_hoisted(std::mt19937_64& rng) {
  constexpr int NC = rims::kColumnsOf<C>, SMAX = 4, S = 3;
  std::uniform_real_distribution<double> u(-1, 1);
  for (int width : {1, 4, 6, 8, 12}) {
    for (int extra : {0, 2}) {
      for (int nj : {1, 2, 5}) {
        const int ld = width + extra, rows_total = SMAX * nj + 3;
        std::vector<C> buf(size_t(rows_total) * ld + 8), coef(size_t(SMAX) * nj);
        for (auto& v : buf) v = C(u(rng));
        for (auto& v : coef) v = C(u(rng));
        // Sample s's row j sits at (j * SMAX + s) ^ 1 (interleaved, as x F's (m, k, n) rows).
        auto rowof = [&](int s, int j) { return int64_t((j * SMAX + s) ^ 1); };
        auto a = [&](int s, int j) { return coef[size_t(s) * nj + j]; };
        auto on = [&](int s) { return s != 1; };
        for (int c0 = 0; c0 < width; c0 += NC) {
          const int nc = rims::min_int(NC, width - c0);
          C acc[NC][SMAX];
          rims::columns_fill(acc, C(0.5));
          rims::hoisted_input_term(acc, S, nj, buf.data() + c0, nc, on, a, rowof, ld);
          for (int c = 0; c < nc; ++c)
            for (int s = 0; s < SMAX; ++s) {
              C want = C(0.5);
              if (s < S && on(s))
                for (int j = 0; j < nj; ++j) want += a(s, j) * buf[rowof(s, j) * ld + c0 + c];
              ++checks;
              if (!same_bits(acc[c][s], want)) {
                ++failures;
                std::printf("FAIL hoisted %s width %d ld %d nj %d col %d s %d: %.17g vs %.17g\n",
                            sizeof(C) == 4 ? "float" : "double", width, ld, nj, c0 + c, s,
                            double(acc[c][s]), double(want));
              }
            }
        }
      }
    }
  }
}

}  // namespace

int main() {
  std::mt19937_64 rng(7);
  // S < SMAX: the last sample's accumulators must stay untouched.
  test_columns<float, float, 3, 2>(rng, {1, 7, 8, 9, 17});
  test_columns<double, double, 3, 2>(rng, {1, 7, 8, 9, 17});
  // Tile 1: float/double guarded batches of 8 rows.
  test_columns<float, float, 1, 1>(rng, {1, 7, 8, 9, 15, 16, 17, 33, 100});
  test_columns<double, double, 1, 1>(rng, {1, 7, 8, 9, 17, 100});
  static_assert(rims::kGuardedBatch<float, 1> == rims::kColumnBatch / 2);
  static_assert(rims::kGuardedBatch<Bf16, 1> == rims::kColumnBatch);
  // 16-bit weights: 32-row packed batches at tile 1, 16 rows at larger tiles.
  test_columns<float, Bf16, 1, 1>(rng, {1, 15, 16, 31, 32, 33, 47, 64, 100});
  test_columns<float, Bf16, 2, 2>(rng, {1, 15, 16, 17, 33, 100});
  static_assert(rims::kVectorBatch<Bf16, 1> == 2 * rims::kColumnBatch);
  static_assert(rims::kVectorBatch<Bf16, 2> == rims::kColumnBatch);
  static_assert(rims::kVectorBatch<float, 1> == rims::kColumnBatch);
  test_hoisted<float>(rng);
  test_hoisted<double>(rng);
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
