#pragma once
// Per-thread scratch memory that survives between calls of the CPU kernels: fresh pages from the OS
// would cost a fault per 4 KiB on every call (and a zeroed std::vector a pass over memory).
#include <cstdint>
#include <memory>

namespace bsbert {
namespace cpu {

// At least n floats owned by the calling thread, grown as needed and kept; contents undefined. Tag:
// one buffer per use, program-wide (e.g. a worker that is also the calling thread needs its own).
template <class Tag>
float* thread_buffer(int64_t n) {
  thread_local std::unique_ptr<float[]> buf;
  thread_local int64_t cap = 0;
  if (cap < n) {
    // The old buffer goes first (no peak of both), and cap with it: a failed new (std::bad_alloc, e.g. from
    // a huge tuning switch) must not leave a null buffer that a later, smaller call returns.
    buf.reset();
    cap = 0;
    buf.reset(new float[n]);
    cap = n;
  }
  return buf.get();
}

}  // namespace cpu
}  // namespace bsbert
