// Host-side helpers for bsbert's CUDA ops. Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h,
// which drags in cuBLAS/cuSPARSE headers that a minimal CUDA toolkit may not ship).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace bsbert {
namespace cuda {

// A device attribute of the current device, cached per device id (up to 64 devices): the dispatchers
// ask on every call. The cache holds value + 1, so 0 means "not read yet" and a zero-valued attribute
// (e.g. compute capability minor 0) is cached too.
template <cudaDeviceAttr Attr>
inline int cached_device_attr() {
  static std::atomic<int> cache[64] = {};
  const int dev = static_cast<int>(c10::cuda::current_device());
  if (dev >= 0 && dev < 64) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v - 1;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, Attr, dev));
  if (dev >= 0 && dev < 64 && v >= 0) cache[dev].store(v + 1, std::memory_order_relaxed);
  return v;
}

inline int sm_count() { return cached_device_attr<cudaDevAttrMultiProcessorCount>(); }
// Largest dynamic shared memory one block may opt in to.
inline int max_smem_optin() { return cached_device_attr<cudaDevAttrMaxSharedMemoryPerBlockOptin>(); }

inline bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

}  // namespace cuda
}  // namespace bsbert
