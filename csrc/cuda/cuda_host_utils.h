// Host-side helpers for bsbert's CUDA ops. Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h,
// which drags in cuBLAS/cuSPARSE headers that a minimal CUDA toolkit may not ship).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <set>
#include <string>
#include <utility>

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

// Lets `kernel` use up to the current device's opt-in maximum of dynamic shared memory, once per (device,
// kernel). The attribute is only a ceiling (each launch still asks for its own size); setting it on every
// call to that call's size could race with another host thread launching the same kernel with more.
inline void allow_max_dynamic_smem(const void* kernel) {
  static std::mutex mu;
  static std::set<std::pair<int, const void*>> done;
  const std::pair<int, const void*> key{static_cast<int>(c10::cuda::current_device()), kernel};
  std::lock_guard<std::mutex> lock(mu);
  if (done.count(key)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem_optin()));
  done.insert(key);
}

// Empty if `kernel` has code the current device can run, else the runtime's reason (e.g. no kernel image
// for this GPU's architecture in this build). The error is cleared: it is an answer here, not a failure.
inline std::string kernel_image_problem(const void* kernel) {
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err == cudaSuccess) return std::string();
  (void)cudaGetLastError();
  return cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace bsbert
