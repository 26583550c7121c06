// Hopper (sm_90a) helpers: shared-memory matrix descriptors, wgmma.mma_async m64n32k16 with fp32
// accumulators and its fence / commit / wait, the async-proxy fence, mbarriers, 2-D tensor-map copies (TMA)
// and named barriers.
//
// wgmma exists only in the sm_90a target (compute_90a). Everything that emits it is compiled only when
// BSBERT_WGMMA_DEVICE is 1 (the sm_90a device pass); the other passes (sm_80, plain sm_90, the host) see
// no wgmma, so one source builds for every architecture in the list.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BSBERT_WGMMA_DEVICE 1
#else
#define BSBERT_WGMMA_DEVICE 0
#endif

namespace bsbert {
namespace cuda {

#if BSBERT_WGMMA_DEVICE
// Shared-memory matrix descriptor for the no-swizzle ("interleaved") layout: the operand is made of core
// matrices of 8 rows x 16 bytes, each stored as 128 contiguous bytes; `lbo` = bytes from one core matrix
// to the next along K, `sbo` = bytes from one 8-row group to the next along M (or N). Address and offsets
// are encoded >> 4 in 14-bit fields; base offset 0 (bits 49-51), swizzle mode in bits 62-63.
// `swizzle`: 0 none, 2 the 64-byte swizzle (rows of 64 bytes, 16-byte chunk c of row r stored at c ^ (r/2 % 4);
// 8-row atoms of 512 bytes, `sbo` apart; lbo unused), as the copy engine's CU_TENSOR_MAP_SWIZZLE_64B writes it.
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t smem_addr, uint32_t lbo, uint32_t sbo, uint32_t swizzle = 0) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (static_cast<uint64_t>(swizzle) << 62);
}

// D[64 x 32] += A[64 x 16] * B[16 x 32], A and B K-major in shared memory (descriptors), D in registers:
// thread t of the warpgroup holds rows 16*(t/32) + (t%32)/4 (+8) and columns 8*j + 2*(t%4) (+1) in
// d[4*j .. 4*j+3], the m16n8 accumulator layout of mma.sync repeated over j = 0..3.
template <typename T>
__device__ __forceinline__ void wgmma_m64n32k16(float (&d)[16], uint64_t a, uint64_t b);

#define BSBERT_WGMMA_M64N32K16(TYPE, PTX_TYPE)                                                                   \
  template <>                                                                                                  \
  __device__ __forceinline__ void wgmma_m64n32k16<TYPE>(float(&d)[16], uint64_t a, uint64_t b) {               \
    asm volatile(                                                                                              \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                                           \
        "wgmma.mma_async.sync.aligned.m64n32k16.f32." PTX_TYPE "." PTX_TYPE                                    \
        " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),      \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
        : "l"(a), "l"(b), "r"(1));                                                                             \
  }
BSBERT_WGMMA_M64N32K16(__half, "f16")
BSBERT_WGMMA_M64N32K16(__nv_bfloat16, "bf16")
#undef BSBERT_WGMMA_M64N32K16

// Orders the registers' earlier ordinary accesses before the next wgmma (required before the first one and
// whenever other instructions touched its accumulators).
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Tells the compiler a register may change here: wgmma writes its accumulators asynchronously, so their
// reads must not move above the wait (nor their writes below the issue).
__device__ __forceinline__ void reg_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// Shared memory written by ordinary stores or cp.async (generic proxy) and read next by wgmma (async
// proxy) needs this fence in each writing thread before the barrier that publishes it.
__device__ __forceinline__ void fence_proxy_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---- mbarriers and the bulk-copy (TMA) engine: copies that complete on an mbarrier, written through the
// async proxy, so wgmma may read them after the barrier's phase flips with no proxy fence ----
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the async proxy (the copy engine) and the other threads.
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// One arrival that also announces `bytes` of copies completing on this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait_parity(uint32_t bar, int parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// The box at (c0 = innermost coordinate, c1) of a 2-D tensor map -> shared, laid out as the map says
// (swizzle included).
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* tensor_map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(tensor_map), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// Barrier `id` (1..15; 0 is __syncthreads) over `threads` threads (a multiple of 32).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
#endif  // BSBERT_WGMMA_DEVICE

}  // namespace cuda
}  // namespace bsbert
