// Host tests of kernels/host_exec.h (no torch, no GPU): every item order visits each item of a
// phase exactly once (parallel_for and warp_for, sizes 0..40), order 1 is the reverse, order 2
// changes from phase to phase and is not the identity; and the point of the orders: a phase with a
// race (item i reads what item i - 1 writes in the same phase) gives different results reversed
// or permuted, while the race-free version (the read moved to the next phase) does not; and
// run_host_blocks' shared memory: NaN at each block's start, a write past its end reported.
#include <cstdio>
#include <vector>

#include "host_exec.h"

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

}  // namespace

int main() {
  test_orders_are_permutations();
  test_orders_show_a_race();
  test_host_blocks();
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
