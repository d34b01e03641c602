// Host execution of a thread-block cluster, for the host runs (tests) of kernels written against
// an Exec with cluster_sync() and peer() (rim_seq_fwd_tile<..., CLUSTER=true>).
//
// Each block of the cluster is a host thread with its own shared-memory buffer; cluster_sync() is
// a barrier of those threads and peer(ptr, r) maps a pointer into this block's buffer to the same
// offset in block r's, as DSMEM's map_shared_rank does on the device. Within a block, items run
// one by one in host_item_order() (HostExec, host_exec.h). Threads, not a sequential schedule,
// because a block runs its phases between cluster barriers in one call.
#pragma once

#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

#include "rim_seq_fwd.cuh"

namespace rims {

struct ClusterHostExec : HostExec {
  int rank;
  HostBarrier* barrier;
  const std::vector<char*>* bases;  // each block's shared-memory buffer
  void cluster_sync() const { barrier->wait(); }
  template <class P>
  P* peer(P* ptr, int r) const {
    const char* mine = (*bases)[rank];
    return reinterpret_cast<P*>((*bases)[r] + (reinterpret_cast<const char*>(ptr) - mine));
  }
};

// Runs f(exec, rank) for rank = 0 .. ranks - 1 concurrently, block rank's shared memory at
// bases[rank]; rethrows the first exception (a throwing block must not leave the others waiting
// at a barrier, so f must not throw between cluster barriers; the kernels' tile functions don't).
template <class F>
void run_cluster_on_host(const std::vector<char*>& bases, const F& f) {
  const int ranks = static_cast<int>(bases.size());
  HostBarrier barrier(ranks);
  std::vector<std::exception_ptr> errors(ranks);
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      try {
        f(ClusterHostExec{{}, r, &barrier, &bases}, r);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (auto& th : threads) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace rims
