// Reductions over the lanes of a warp item (Exec::warp_for: the item index is the same on every
// lane, so the shuffles below see the whole warp). Every lane gets the result.
//
// On the host a warp item is one call with a single lane (HostExec), so these return v unchanged
// and a lane-strided loop `for (j = lane; j < n; j += lanes)` visits every element in order: a
// host run then sums exactly as the plain loop it replaced, while the device's lanes sum strided
// partials (round-off only; the reference comparisons cover both).
#pragma once

#include "masked_cell.cuh"  // RIMS_HD

namespace rims {

template <typename C>
RIMS_HD C warp_sum(C v) {
#if defined(__CUDA_ARCH__)
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
#endif
  return v;
}

// The larger of the lanes' values, as the scalar loops compare (a NaN's outcome unspecified).
template <typename C>
RIMS_HD C warp_max(C v) {
#if defined(__CUDA_ARCH__)
  for (int off = 16; off > 0; off >>= 1) {
    const C o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
#endif
  return v;
}

}  // namespace rims
