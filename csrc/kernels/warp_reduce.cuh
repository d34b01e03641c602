// Reductions over the lanes of a warp item (Exec::warp_for: the item index is the same on every
// lane, so the shuffles below see the whole warp). Every lane gets the result.
//
// On the host a warp item is by default one call with a single lane (HostExec), so these return
// v unchanged and a lane-strided loop `for (j = lane; j < n; j += lanes)` visits every element in
// order: a host run then sums exactly as the plain loop it replaced, while the device's lanes sum
// strided partials (round-off only; the reference comparisons cover both). Under
// host_warp_lanes() = 32 the host emulates the device's lanes and shuffles (host_exec.h).
#pragma once

#include "host_exec.h"      // HostWarp, host_lane: the host's emulated lanes
#include "masked_cell.cuh"  // RIMS_HD

namespace rims {

#if defined(__CUDA_ARCH__)
// v's partner across lane bit `off` (__shfl_xor_sync over the full warp).
template <typename C>
__device__ __forceinline__ C lane_xor(C v, int off) {
  return __shfl_xor_sync(0xffffffffu, v, off);
}
#endif

// Lanes of the calling warp: 32 on the device; on the host 32 inside an emulated warp, else 1.
RIMS_HD int warp_lanes() {
#if defined(__CUDA_ARCH__)
  return 32;
#else
  return host_lane().warp != nullptr ? host_lane().warp->lanes : 1;
#endif
}

// The butterfly: after the step with offset off each lane holds the sum of 2 off lanes' values
// (on the host, the emulated warp's replay of it, HostWarp::butterfly; one lane: v).
template <typename C>
RIMS_HD C warp_sum(C v) {
#if defined(__CUDA_ARCH__)
  for (int off = 16; off > 0; off >>= 1) v += lane_xor(v, off);
  return v;
#else
  const HostLane& me = host_lane();
  if (me.warp == nullptr) return v;
  return me.warp->butterfly(v, me.lane, [](C own, C other) { return own + other; });
#endif
}

// The larger of the lanes' values, as the scalar loops compare (a NaN's outcome unspecified).
template <typename C>
RIMS_HD C warp_max(C v) {
#if defined(__CUDA_ARCH__)
  for (int off = 16; off > 0; off >>= 1) {
    const C o = lane_xor(v, off);
    v = o > v ? o : v;
  }
  return v;
#else
  const HostLane& me = host_lane();
  if (me.warp == nullptr) return v;
  return me.warp->butterfly(v, me.lane, [](C own, C other) { return other > own ? other : own; });
#endif
}

// sum_e a[e] b[e] over e < n: the lanes take e = lane, lane + lanes, ... (a warp reads
// consecutive elements: no bank conflicts) and the warp adds their partials. Every lane gets it.
template <typename C>
RIMS_HD C warp_dot(const C* a, const C* b, int n, int lane, int lanes) {
  C part = C(0);
  for (int e = lane; e < n; e += lanes) part += a[e] * b[e];
  return warp_sum(part);
}

// y[0..n) = softmax(y[0..n)) over the lanes of a warp item, y written by lane 0 before the call
// (the attention's scores); then each(j) for the lane's j (lane, lane + lanes, ...) after y[j]
// holds its probability. On one lane: softmax()'s loops (rim_numerics.h) exactly.
template <typename C, class Exec, class Each>
RIMS_HD void warp_softmax(const Exec& ex, C* y, int n, int lane, int lanes, const Each& each) {
  ex.syncwarp();  // lane 0's scores, read by every lane
  // Lanes past n start from y[0], which lane 0 rewrites below, after the syncwarp that follows
  // every lane's reads.
  C mu = y[lane < n ? lane : 0];
  for (int j = lane + lanes; j < n; j += lanes) mu = y[j] > mu ? y[j] : mu;
  mu = warp_max(mu);
  ex.syncwarp();
  C sum = C(0);
  for (int j = lane; j < n; j += lanes) {
    y[j] = rims_exp(y[j] - mu);
    sum += y[j];
  }
  sum = warp_sum(sum);
  for (int j = lane; j < n; j += lanes) {
    y[j] = y[j] / sum;
    each(j);
  }
}

}  // namespace rims
