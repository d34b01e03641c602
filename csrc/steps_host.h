// The per-sample phases of the stepped ops' host runs (rim_steps_fwd.cpp, rim_steps_bwd.cpp).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

#include "kernels/host_exec.h"

namespace rims {

// f(b, smem) for every sample b of step t as host blocks (run_host_blocks: each block's shared
// memory NaN-poisoned and guarded); a block that wrote past its shared memory is an error naming
// the phase, the step and the sample.
template <class C, class F>
void run_host_samples(const char* phase, int64_t t, int64_t samples, int64_t smem_elems,
                      const F& f) {
  const int64_t bad = run_host_blocks<C>(samples, smem_elems, f);
  TORCH_CHECK(bad < 0, "rims_fast: ", phase, " wrote past its shared memory in a host run (step ",
              t, ", sample ", bad, ")");
}

}  // namespace rims
