// Host tests of kernels/stage_run.cuh (no torch, no GPU): the stage_runs(n) items of a row copy
// each of its n elements exactly once, to both destinations (the second through its transform),
// whatever n (empty, inside one item, one warp's group, and past it, full and partial), and
// neighbouring items of a full group take neighbouring elements at each load (the coalescing the
// mapping exists for).
#include <cstdio>
#include <vector>

#include "stage_run.cuh"

namespace {

int failures = 0;
int checks = 0;

void expect(bool ok, const char* what, int n, int x) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s (n=%d, x=%d)\n", what, n, x);
  }
}

void test_copies_each_element_once() {
  for (int n = 0; n <= 3 * rims::kStageLanes * rims::kStageRun + 37; ++n) {
    std::vector<float> src(n), dst(n, -1.f), dst2(n, -1.f);
    for (int e = 0; e < n; ++e) src[e] = float(e) + 0.5f;
    std::vector<int> writes(n, 0);
    const int items = rims::stage_runs(n);
    for (int x = 0; x < items; ++x)
      rims::stage_run(dst.data(), src.data(), n, x, dst2.data(), [&](int e, float v) {
        ++writes[e];
        return e % 3 == 0 ? 0.f : -v;
      });
    bool once = true, same = true, second = true;
    for (int e = 0; e < n; ++e) {
      once = once && writes[e] == 1;
      same = same && dst[e] == src[e];
      second = second && dst2[e] == (e % 3 == 0 ? 0.f : -src[e]);
    }
    expect(once, "every element copied once", n, items);
    expect(same, "the first destination holds the row", n, items);
    expect(second, "the second holds the transform of the row", n, items);
  }
}

void test_only_second_destination() {
  const int n = 700;
  std::vector<double> src(n), dst2(n, -1.0);
  for (int e = 0; e < n; ++e) src[e] = e;
  for (int x = 0; x < rims::stage_runs(n); ++x)
    rims::stage_run<double>(nullptr, src.data(), n, x, dst2.data());
  bool same = true;
  for (int e = 0; e < n; ++e) same = same && dst2[e] == src[e];
  expect(same, "a null first destination: the second gets the row unchanged", n, -1);
}

// The u-th load of items 0..31 of a full group: elements base + u * 32 + l, consecutive.
void test_full_group_loads_are_consecutive() {
  const int n = 2 * rims::kStageLanes * rims::kStageRun;
  std::vector<int> src(n), dst(n);
  for (int e = 0; e < n; ++e) src[e] = e;
  for (int x = 0; x < rims::kStageLanes; ++x) {
    rims::stage_run(dst.data(), src.data(), n, x, static_cast<int*>(nullptr), rims::StageSame{});
    int count = 0;
    for (int u = 0; u < rims::kStageRun; ++u) {
      const int e = u * rims::kStageLanes + x;
      count += dst[e] == e;
    }
    expect(count == rims::kStageRun, "item x of the first group takes x, x + 32, ...", n, x);
  }
}

}  // namespace

int main() {
  test_copies_each_element_once();
  test_only_second_destination();
  test_full_group_loads_are_consecutive();
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
