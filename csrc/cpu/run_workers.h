#pragma once
// The CPU ops' threading shape: n workers that claim work from shared atomic counters. One worker runs
// inline on the calling thread (no fork/join); more run as one at::parallel_for region over [0, n), so
// each of torch's threads runs at most one worker. Baseline-ISA translation units only.
#include <ATen/Parallel.h>

#include <cstdint>

namespace bsbert {
namespace cpu {

template <class Worker>
void run_workers(int64_t n, const Worker& worker) {
  if (n <= 1)
    worker(0, 1);
  else
    at::parallel_for(0, n, 1, worker);
}

}  // namespace cpu
}  // namespace bsbert
