// Host tests of kernels/host_exec.h (no torch, no GPU): every item order visits each item of a
// phase exactly once (parallel_for and warp_for, sizes 0..40), order 1 is the reverse, order 2
// changes from phase to phase and is not the identity; and the point of the orders: a phase with a
// race (item i reads what item i - 1 writes in the same phase) gives different results reversed
// or permuted, while the race-free version (the read moved to the next phase) does not; and
// run_host_blocks' shared memory: NaN at each block's start, a write past its end reported; and
// the emulated lanes of warp items (host_warp_lanes() = 32): warp_sum / warp_max as the device's
// butterfly in every lane, lane-strided loops covering each element once, syncwarp ordering.
#include <cmath>
#include <cstdio>
#include <vector>

#include "host_exec.h"
#include "warp_reduce.cuh"

namespace {

int failures = 0;
int checks = 0;

void expect(bool ok, const char* what, int mode, int n) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s (order %d, n %d)\n", what, mode, n);
  }
}

std::vector<int> visits(int n, bool warp) {
  std::vector<int> seen;
  const rims::HostExec ex;
  if (warp) {
    ex.warp_for(n, [&](int i, int w, int l, int lanes) {
      if (w == 0 && l == 0 && lanes == 1) seen.push_back(i);
    });
  } else {
    ex.parallel_for(n, [&](int i) { seen.push_back(i); });
  }
  return seen;
}

void test_orders_are_permutations() {
  for (int mode = 0; mode <= 2; ++mode) {
    rims::set_host_item_order(mode);
    for (int n = 0; n <= 40; ++n) {
      for (bool warp : {false, true}) {
        const std::vector<int> v = visits(n, warp);
        std::vector<int> count(n, 0);
        bool in_range = static_cast<int>(v.size()) == n;
        for (int i : v) {
          if (i < 0 || i >= n) in_range = false;
          else ++count[i];
        }
        bool once = in_range;
        for (int c : count) once = once && c == 1;
        expect(once, "each item exactly once", mode, n);
        if (mode == 1 && once) {
          bool rev = true;
          for (int i = 0; i < n; ++i) rev = rev && v[i] == n - 1 - i;
          expect(rev, "order 1 is the reverse", mode, n);
        }
      }
    }
  }
  // Order 2: over 20 phases of 12 items, none in order and at least 10 distinct permutations.
  rims::set_host_item_order(2);
  std::vector<std::vector<int>> seen;
  int identity = 0;
  for (int phase = 0; phase < 20; ++phase) {
    const std::vector<int> v = visits(12, false);
    bool id = true;
    for (int i = 0; i < 12; ++i) id = id && v[i] == i;
    identity += id;
    bool fresh = true;
    for (const auto& s : seen) fresh = fresh && s != v;
    if (fresh) seen.push_back(v);
  }
  expect(identity == 0, "order 2 never the identity", 2, 12);
  expect(seen.size() >= 10, "order 2 changes between phases", 2, 12);
  rims::set_host_item_order(0);
}

// A prefix sum as one phase (item i reads item i - 1's output: a race on the device) and as two
// (inputs copied first, then each item sums from the copy: race-free).
std::vector<double> prefix(bool racy) {
  const rims::HostExec ex;
  const int n = 16;
  std::vector<double> in(n), out(n, 0.0), copy(n);
  for (int i = 0; i < n; ++i) in[i] = 1.0 + 0.1 * i;
  if (racy) {
    ex.parallel_for(n, [&](int i) { out[i] = in[i] + (i > 0 ? out[i - 1] : 0.0); });
  } else {
    ex.parallel_for(n, [&](int i) { copy[i] = in[i]; });
    ex.parallel_for(n, [&](int i) {
      double s = 0.0;
      for (int j = 0; j <= i; ++j) s += copy[j];
      out[i] = s;
    });
  }
  return out;
}

void test_orders_show_a_race() {
  rims::set_host_item_order(0);
  const std::vector<double> racy0 = prefix(true), clean0 = prefix(false);
  for (int mode = 1; mode <= 2; ++mode) {
    rims::set_host_item_order(mode);
    expect(prefix(true) != racy0, "a racy phase changes under the order", mode, 16);
    expect(prefix(false) == clean0, "a race-free phase does not", mode, 16);
  }
  rims::set_host_item_order(0);
}

// run_host_blocks: every block sees NaN shared memory (nothing left by the block before), a write
// past n is reported, one within n is not.
void test_host_blocks() {
  rims::set_host_item_order(2);
  bool all_nan = true;
  const bool ok = rims::run_host_blocks<float>(5, 8, [&](int64_t b, float* sm) {
    for (int i = 0; i < 8; ++i) all_nan = all_nan && sm[i] != sm[i];
    for (int i = 0; i < 8; ++i) sm[i] = static_cast<float>(b);
  }) < 0;
  expect(ok && all_nan, "blocks start as NaN and a write within n passes", 2, 8);
  const int64_t past = rims::run_host_blocks<double>(3, 8, [&](int64_t b, double* sm) {
    if (b == 1) sm[8] = 0.0;
  });
  expect(past == 1, "a write past n is reported, with its block", 2, 8);
  rims::set_host_item_order(0);
}

// Lanes: with 32 emulated lanes each lane of an item gets the xor butterfly's sum (computed here on
// an array, in the device's order: every lane ends with the same bits, the additions being
// pairwise commutative) and the maximum; with one lane both are the value itself.
void test_lanes() {
  constexpr int kItems = 5, kL = rims::kHostWarpLanes, kWide = 70;
  auto value = [](int i, int lane) { return static_cast<float>(std::sin(37.0 * i + lane) * 1e3); };
  std::vector<float> sum(kItems * kL), mx(kItems * kL), seen(kItems * kL), shared(kItems, 0.f);
  std::vector<int> hits(kItems * kWide, 0), lanes_seen(kItems * kL, 0);
  const rims::HostExec ex;
  const int old = rims::host_warp_lanes().exchange(kL);
  ex.warp_for(kItems, [&](int i, int, int lane, int lanes) {
    lanes_seen[i * kL + lane] = lanes;
    sum[i * kL + lane] = rims::warp_sum(value(i, lane));
    mx[i * kL + lane] = rims::warp_max(value(i, lane));
    for (int e = lane; e < kWide; e += lanes) ++hits[i * kWide + e];  // each e one lane's
    if (lane == 0) shared[i] = 42.f + static_cast<float>(i);
    ex.syncwarp();
    seen[i * kL + lane] = shared[i];
  });
  rims::host_warp_lanes().store(old);
  for (int i = 0; i < kItems; ++i) {
    float a[kL];
    float m = value(i, 0);
    for (int l = 0; l < kL; ++l) {
      a[l] = value(i, l);
      m = a[l] > m ? a[l] : m;
    }
    for (int off = kL / 2; off > 0; off >>= 1) {
      float b[kL];
      for (int l = 0; l < kL; ++l) b[l] = a[l] + a[l ^ off];
      for (int l = 0; l < kL; ++l) a[l] = b[l];
    }
    for (int l = 0; l < kL; ++l) {
      expect(lanes_seen[i * kL + l] == kL, "every lane runs with lanes = 32", 0, l);
      expect(sum[i * kL + l] == a[l] && a[l] == a[0], "warp_sum: the butterfly, in every lane", 0, l);
      expect(mx[i * kL + l] == m, "warp_max: the maximum, in every lane", 0, l);
      expect(seen[i * kL + l] == 42.f + static_cast<float>(i), "syncwarp orders lane 0's write", 0, l);
    }
    for (int e = 0; e < kWide; ++e) expect(hits[i * kWide + e] == 1, "lane-strided loop", 0, e);
  }
  int one = 0;
  float single = 0.f;
  ex.warp_for(1, [&](int, int, int lane, int lanes) {
    one += lanes;
    single = rims::warp_sum(3.5f) + rims::warp_max(-1.f) + static_cast<float>(lane);
  });
  expect(one == 1 && single == 2.5f, "one lane by default: the reductions are the value", 0, 1);
}

}  // namespace

int main() {
  test_lanes();
  test_orders_are_permutations();
  test_orders_show_a_race();
  test_host_blocks();
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
