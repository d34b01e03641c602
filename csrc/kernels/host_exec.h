// Host execution of the kernels' tile functions (rim_seq_{fwd,bwd}.cuh, rim_step_{fwd,bwd}.cuh):
// each phase's items run one after another and the end of the loop is the phase's barrier. This
// is how CI checks the kernels' arithmetic without a GPU.
//
// On the device a phase's items run concurrently, so a tile function that reads in one item what
// another item of the same phase writes is a race the in-order host run cannot show. The item
// order is therefore selectable (host_item_order(), set by rims_fast._C._set_host_item_order):
//   0  in order (the default);
//   1  reversed;
//   2  a strided permutation i -> (a*i + c) mod n, 1 < a < n coprime with n, drawn afresh for
//      every phase from a per-thread phase counter that restarts when the order is set (so a
//      failure reproduces from the same call sequence; a cluster's blocks, fresh threads for each
//      tile, draw the same sequence).
// A race-free tile function gives the same bits in all three (tests/test_host_item_order.py).
//
// A warp item (warp_for) is written per lane: lane-strided loops, then warp_sum / warp_max
// (warp_reduce.cuh) and syncwarp(). By default a host run calls it once as lane 0 of 1, which
// checks the arithmetic but none of the lane splitting. host_warp_lanes() = 32 (set by
// rims_fast._C._set_host_warp_lanes) runs each warp phase on 32 host threads instead, one per
// lane, each taking the phase's items in the same order; their reductions and syncwarp() meet at
// a barrier and combine as the device's shuffles do (the same butterfly), so a lane-splitting
// bug (a shuffle some lanes skip, a value read from another lane before it is written, a
// lane-strided loop that misses elements) shows on the host (tests/test_host_lanes.py).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace rims {

// Set between host runs (rims_fast._C._set_host_item_order, the C++ tests), read by every phase:
// atomic, as a CPU op may run on another Python thread.
inline std::atomic<int>& host_item_order() {
  static std::atomic<int> mode{0};
  return mode;
}

// Bumped by every set of the order (set_host_item_order) so that each thread's phase counter
// restarts.
inline std::atomic<uint64_t>& host_order_epoch() {
  static std::atomic<uint64_t> epoch{0};
  return epoch;
}

inline void set_host_item_order(int mode) {
  host_item_order().store(mode, std::memory_order_relaxed);
  host_order_epoch().fetch_add(1, std::memory_order_relaxed);
}

// Lanes per warp item in host runs: 1 (one call per item, the default) or 32 (kHostWarpLanes:
// one host thread per lane, as on the device).
constexpr int kHostWarpLanes = 32;

inline std::atomic<int>& host_warp_lanes() {
  static std::atomic<int> lanes{1};
  return lanes;
}

// A reusable barrier of n threads (std::barrier is C++20; the extension builds as C++17 on
// torch 2.11): a cluster's blocks (cluster_host.h) and a warp's lanes. Waiters spin on the
// generation, yielding: with 32 lanes on an idle 2-core machine a barrier took ~380 us with a
// mutex and condition variable (every release wakes 31 threads that then queue on the mutex) and
// ~33 us this way. (With the cores busy with other work each yield gives the core away for a time
// slice, and the spin is slower than the condition variable: ~2 ms against ~0.3. CI runs the
// tests alone.)
class HostBarrier {
 public:
  explicit HostBarrier(int n) : n_(n) {}
  void wait() {
    // The generation is read before arriving, so it is this round's: it cannot advance before
    // this thread has arrived.
    const uint64_t gen = gen_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      arrived_.store(0, std::memory_order_relaxed);  // before the release below
      gen_.store(gen + 1, std::memory_order_release);
    } else {
      while (gen_.load(std::memory_order_acquire) == gen) std::this_thread::yield();
    }
  }

 private:
  const int n_;
  std::atomic<int> arrived_{0};
  std::atomic<uint64_t> gen_{0};
};

// The lanes of one emulated warp: their barrier and two buffers of one exchange slot per lane
// (double holds a float or double value exactly).
struct HostWarp {
  explicit HostWarp(int lanes) : lanes(lanes), barrier(lanes), parity(lanes, 0) {
    for (auto& s : slot) s.assign(lanes, 0.0);
  }
  int lanes;
  HostBarrier barrier;
  std::vector<double> slot[2];
  std::vector<int> parity;  // each lane's next buffer (a lane touches only its own entry)
  // The xor-shuffle butterfly as the device runs it (warp_reduce.cuh): for off = lanes/2 .. 1
  // every lane l replaces its value by step(own, lane l ^ off's). Every lane publishes v, meets
  // the others at one barrier, then replays the whole butterfly on the published values and keeps
  // lane `lane`'s result: the device's bits, at one barrier per reduction instead of two per
  // shuffle (ten for a warp_sum). The buffers alternate per call, so none needs a second wait: a
  // lane writes a buffer again only after the next call's barrier, which every lane reaches after
  // reading it.
  template <class C, class Step>
  C butterfly(C v, int lane, const Step& step) {
    std::vector<double>& buf = slot[parity[lane]];
    parity[lane] ^= 1;
    buf[lane] = static_cast<double>(v);
    barrier.wait();
    C a[kHostWarpLanes], b[kHostWarpLanes];
    for (int l = 0; l < lanes; ++l) a[l] = static_cast<C>(buf[l]);
    for (int off = lanes / 2; off > 0; off >>= 1) {
      for (int l = 0; l < lanes; ++l) b[l] = step(a[l], a[l ^ off]);
      for (int l = 0; l < lanes; ++l) a[l] = b[l];
    }
    return a[lane];
  }
};

// This thread's warp and lane while it runs a lane of a warp phase (nullptr otherwise: the
// reductions are then the identity, as for one lane).
struct HostLane {
  HostWarp* warp = nullptr;
  int lane = 0;
};

inline HostLane& host_lane() {
  thread_local HostLane me;
  return me;
}

namespace host_exec_detail {

// This thread's next phase number since the order was last set.
inline uint64_t next_phase() {
  thread_local uint64_t phase = 0, seen = 0;
  const uint64_t epoch = host_order_epoch().load(std::memory_order_relaxed);
  if (epoch != seen) {
    seen = epoch;
    phase = 0;
  }
  return ++phase;
}

inline int64_t gcd(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t r = a % b;
    a = b;
    b = r;
  }
  return a;
}

// Runs f(map(i)) for i in [0, n) under the current order (I: int for a block's items, int64_t
// for a grid's).
template <class I, class F>
void for_each_item(I n, const F& f) {
  const int mode = host_item_order().load(std::memory_order_relaxed);
  if (mode == 1) {
    for (I i = n - 1; i >= 0; --i) f(i);
    return;
  }
  if (mode != 2 || n < 3) {
    for (I i = 0; i < n; ++i) f(i);
    return;
  }
  const uint64_t h = next_phase() * 0x9E3779B97F4A7C15ull;
  const int64_t m = static_cast<int64_t>(n);
  // a in 2 .. n - 1 (never 1 mod n: not a rotation or the identity); n - 1 is coprime with n.
  int64_t a = 2 + static_cast<int64_t>((h >> 8) % static_cast<uint64_t>(m - 2));
  while (gcd(a, m) != 1) ++a;
  const int64_t c = static_cast<int64_t>((h >> 32) % static_cast<uint64_t>(m));
  // (a * i + c) mod n without overflow for any n a host run sees (a, i < n < 2^31 for blocks;
  // grids here are test-sized).
  for (int64_t i = 0; i < m; ++i) f(static_cast<I>((a * i + c) % m));
}

// A kernel bug, not an input error: stop where it shows (a throw could leave a cluster's other
// blocks waiting at a barrier).
template <class W>
void expect_disjoint(const W* a, int64_t na, const W* b, int64_t nb, const char* what) {
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(a), b0 = reinterpret_cast<uintptr_t>(b);
  const uintptr_t a1 = a0 + na * sizeof(W), b1 = b0 + nb * sizeof(W);
  if (na > 0 && nb > 0 && a0 < b1 && b0 < a1) {
    std::fprintf(stderr, "rims_fast host run: %s overlap\n", what);
    std::abort();
  }
}

}  // namespace host_exec_detail

// The independent items of a grid-wide kernel (one thread each on the device) under the same
// orders, for the host loops that stand for such kernels.
template <class F>
void host_grid_for(int64_t n, const F& f) {
  host_exec_detail::for_each_item(n, f);
}

// A block's shared memory on the host: the n elements its size function gives, then a guard of
// kHostSharedGuard more (allocate n + kHostSharedGuard). All of it is NaN at the start of each
// block (tile or sample), as a GPU block's shared memory starts undefined: a read before the first
// write, or past the end, shows in the results, and a tile cannot reuse what the previous tile
// left (as it could when the host runs tiles in turn). After the block the guard must still be
// NaN (shared_guard_intact): a write past the end shows there, where on the GPU it would land in
// another block's shared memory or fault.
constexpr int64_t kHostSharedGuard = 64;

template <class C>
void poison_shared(C* smem, int64_t n) {
  std::fill(smem, smem + n + kHostSharedGuard, std::numeric_limits<C>::quiet_NaN());
}

template <class C>
bool shared_guard_intact(const C* smem, int64_t n) {
  const C nan = std::numeric_limits<C>::quiet_NaN();
  for (int64_t i = n; i < n + kHostSharedGuard; ++i)
    if (std::memcmp(&smem[i], &nan, sizeof(C)) != 0) return false;
  return true;
}

// Blocks 0 .. blocks - 1 of a grid in host_item_order(), one after another, each calling
// f(block, smem) with n elements of shared memory prepared as above. Returns the first block (in
// the order run) that wrote past them, -1 if none did (the caller reports it: this header is
// torch-free).
// The memory starts 64-byte aligned, as a kernel's dynamic shared memory (tensor-core operands
// there need 256-bit alignment, which the host product checks).
template <class C, class F>
int64_t run_host_blocks(int64_t blocks, int64_t n, const F& f) {
  constexpr size_t kAlign = 64;
  std::vector<C> buf(static_cast<size_t>(n + kHostSharedGuard) + kAlign / sizeof(C));
  const uintptr_t at = reinterpret_cast<uintptr_t>(buf.data());
  C* smem = reinterpret_cast<C*>((at + kAlign - 1) / kAlign * kAlign);
  int64_t bad = -1;
  host_grid_for(blocks, [&](int64_t b) {
    poison_shared(smem, n);
    f(b, smem);
    if (bad < 0 && !shared_guard_intact(smem, n)) bad = b;
  });
  return bad;
}

// A warp item is one call as warp 0 with a single lane, or one per lane on 32 threads under
// host_warp_lanes() (a tensor-core tile is then computed and stored by lane 0 alone, and every
// lane runs its share of the epilogue: mma_tile_lane in mma_tile.cuh).
struct HostExec {
  template <class F>
  void parallel_for(int n, const F& f) const {
    host_exec_detail::for_each_item(n, f);
  }
  // dst[0..n) = src[0..n) (a block-wide copy and barrier on the device).
  template <class W>
  void copy(W* dst, const W* src, int64_t n) const {
    host_exec_detail::expect_disjoint(dst, n, src, n, "a copy's source and destination");
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(W));
  }
  // Two copies, one barrier on the device: all four ranges run at once there, so a destination
  // may overlap neither source nor the other destination (the host would run them in turn).
  template <class W>
  void copy(W* dst, const W* src, int64_t n, W* dst2, const W* src2, int64_t n2) const {
    using host_exec_detail::expect_disjoint;
    expect_disjoint(dst, n, src2, n2, "a copy's destination and the other's source");
    expect_disjoint(dst2, n2, src, n, "a copy's destination and the other's source");
    expect_disjoint(dst, n, dst2, n2, "two copies' destinations");
    copy(dst, src, n);
    copy(dst2, src2, n2);
  }
  template <class F>
  void warp_for(int n, const F& f) const {
    if (host_warp_lanes().load(std::memory_order_relaxed) == 1) {
      host_exec_detail::for_each_item(n, [&](int i) { f(i, 0, 0, 1); });
      return;
    }
    // Every lane takes the items in the same order (drawn once, here); a lane that throws would
    // leave the others at a barrier, so it stops the process instead (the tile functions do not
    // throw inside a phase).
    std::vector<int> items;
    host_exec_detail::for_each_item(n, [&](int i) { items.push_back(i); });
    HostWarp warp(kHostWarpLanes);
    std::vector<std::thread> lanes;
    for (int lane = 0; lane < kHostWarpLanes; ++lane)
      lanes.emplace_back([&, lane]() noexcept {
        host_lane() = HostLane{&warp, lane};
        for (int i : items) f(i, 0, lane, kHostWarpLanes);
        host_lane() = HostLane{};
      });
    for (auto& th : lanes) th.join();
  }
  void syncwarp() const {
    if (HostWarp* w = host_lane().warp) w->barrier.wait();
  }
  // The device policy's phase timing (DeviceExec): nothing to time on the host.
  void step() const {}
  void steps_done() const {}
};

}  // namespace rims
