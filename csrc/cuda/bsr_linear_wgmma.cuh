// The Hopper variant of the x-slab kernel (bsr_linear_slab.cuh) for block 32, fp16/bf16: the same persistent,
// weight-balanced split of (M tile, block row) units and the same [64, K] slab of x kept in shared memory,
// but the products are warpgroup MMAs (wgmma.mma_async m64n32k16, sm_90a) that read both operands straight
// from shared memory, instead of ldmatrix + mma.sync from registers.
//
// Why: on the H200 (stop 11) the mma.sync slab kernel ran at 12.5% occupancy with SM 31% / L2 25% busy:
// each warp's ldmatrix -> mma chain had nothing to overlap with, and every k16 step re-read its A fragments
// from shared memory through the register file. A wgmma is issued asynchronously by a warpgroup (4 warps)
// and keeps running while the warpgroup waits for its next W block, and it needs no A/B fragment registers
// (16 accumulator registers per thread for a 64 x 32 tile), so four warpgroups per SM each keep one block
// in flight behind another.
//
// Layout: the slab uses the no-swizzle core-matrix layout wgmma reads directly (8 rows x 16 bytes per core
// matrix, 128 contiguous bytes): element (r, k) at ((r/8) * cols/8 + k/8) * 64 + (r%8) * 8 + k%8, so a k16 step
// of a block column is one descriptor (K-adjacent core matrices 128 bytes apart, 8-row groups cols * 16 bytes
// apart), and the 16-byte cp.async of consecutive threads land in consecutive 16 bytes. W blocks arrive as the
// copy engine's 64-byte swizzle writes them (rows of 64 bytes, 8-row atoms of 512 bytes), which is one of
// wgmma's own layouts: no repacking of the natural values.
//
// Per warpgroup: block rows wg, wg + G, ... of the CTA's run (G warpgroups), each a [64, 32] fp32 tile; a
// STAGES-deep ring of W blocks filled by the copy engine (one 2-D tensor-map copy per block from the natural
// values, 64-byte swizzled, completing on the slot's mbarrier; one thread issues, prefetching across block
// rows); per block: wait for the slot's phase, two wgmmas (k = 0..15, 16..31), commit, wait until only this
// block's group is pending, a warpgroup barrier (so every warp's slice of the previous block is done), refill
// that slot. Then bias + GELU and predicated stores, as the mma.sync kernels do.
//
// Measured on an H100 (stop 16, benchmarks/results/gpu-h100.md): correct everywhere it was tested, but
// slower than the mma.sync slab kernel (slab64x8) at every BERT-large shape timed, so it is only used when
// forced (BSBERT_CUDA_BSR_TILE=wgslab64x16 / wgslab64x8). W copies by per-thread cp.async were slower still
// (with or without the proxy fence), 2-D tensor-map copies and 1-D bulk copies of a repacked W about equal:
// only the tensor-map form is kept (no repack).
#pragma once

#include "cuda/bsr_linear_slab.cuh"
#include "cuda/bsr_tile_fragments.cuh"
#include "cuda/mma_utils.cuh"
#include "cuda/wgmma_utils.cuh"

#include <cuda.h>  // CUtensorMap

namespace bsbert {
namespace cuda {

template <int WARPS_, int STAGES_>
struct WgSlabConfig {
  static constexpr int BLOCK = 32, BM = 64, WARPS = WARPS_, STAGES = STAGES_;
  static constexpr int kGroups = WARPS / 4;  // warpgroups
  static constexpr int kThreads = WARPS * 32;
  static constexpr int kWElems = BLOCK * BLOCK;
  static constexpr int kWRingBytes = kGroups * STAGES * kWElems * 2;
  static constexpr int kBarBytes = kGroups * STAGES * 8;  // one mbarrier per ring slot
  static_assert(WARPS % 4 == 0 && kGroups >= 1 && kGroups <= 15, "whole warpgroups, one named barrier each (1..15)");
  static_assert(STAGES >= 2, "at least two stages");
  // Slab width: K rounded up to the block (every stored block's 32 columns exist, zero beyond K). The slab
  // is then a multiple of 4 KB, so the ring slots after it stay 2 KB (>= 512-byte swizzle atom) aligned.
  static int slab_cols(int K) { return (K + BLOCK - 1) / BLOCK * BLOCK; }
  static int64_t smem_bytes(int K) { return int64_t{BM} * slab_cols(K) * 2 + kWRingBytes + kBarBytes; }
};

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    bsr_linear_wgmma_kernel(const __grid_constant__ CUtensorMap w_map, const T* __restrict__ x,
                            const int* __restrict__ crow, const int* __restrict__ col, const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K, int num_m_tiles,
                            int nbr, bool gelu) {
#if BSBERT_WGMMA_DEVICE
  constexpr int BLOCK = Cfg::BLOCK, BM = Cfg::BM, STAGES = Cfg::STAGES, G = Cfg::kGroups;
  constexpr int kThreads = Cfg::kThreads, kWBytes = Cfg::kWElems * 2;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const int cols = (K + BLOCK - 1) / BLOCK * BLOCK;
  const int chunks = cols >> 3;  // 16-byte chunks per slab row
  const int tid = threadIdx.x, lane = tid & 31;
  const int wg = tid >> 7, wg_tid = tid & 127, wg_warp = (tid >> 5) & 3;
  const uint32_t slab_addr = smem_u32(smem_raw);
  const uint32_t ring_addr = slab_addr + BM * cols * 2 + wg * (STAGES * kWBytes);
  const uint32_t bar_addr = slab_addr + BM * cols * 2 + Cfg::kWRingBytes + wg * (STAGES * 8);
  const uint32_t slab_sbo = cols * 16;  // bytes between 8-row groups of the slab

  if (wg_tid == 0) {
    for (int s = 0; s < STAGES; ++s) mbar_init(bar_addr + s * 8, 1);
    fence_mbar_init();  // visible to the copy engine and, after the first __syncthreads, to every thread
  }
  int produced = 0, consumed = 0;  // W blocks of this warpgroup so far: slot = count % STAGES, phase = / STAGES

  const int2 run = slab_cta_run(num_m_tiles, nbr, crow);

  for (int u = run.x; u < run.y;) {
    const SlabSegment seg = slab_segment(u, run.y, nbr);
    const int rb_first = seg.rb_first, n_units = seg.n_units, m0 = seg.m_tile * BM;
    u += n_units;

    __syncthreads();  // every warpgroup's MMAs on the previous slab are complete (waited before each epilogue)
    // ---- the slab: rows m0..m0+63, all K columns (zero beyond M and K), core-matrix layout ----
    for (int i = tid; i < BM * chunks; i += kThreads) {
      const int rest = i >> 3, rg = rest / chunks, ch = rest - rg * chunks;
      const int r = rg * 8 + (i & 7);
      const int gm = m0 + r, gk = ch * 8;
      const bool ok = (gm < M) && (gk < K);
      const T* src = ok ? x + (static_cast<int64_t>(gm) * K + gk) : x;
      cp_async_16(slab_addr + i * 16, src, ok);
    }
    cp_async_commit();

    // ---- this warpgroup's W stream: block rows rb_first + wg, + G, ... ----
    WBlockStream stream(wg, G, n_units, rb_first, crow);
    // Starts the copy of the stream's next W block into slot produced % STAGES (one thread issues it).
    auto issue = [&] {
      const int blk = stream.next();
      if (blk >= 0) {
        if (wg_tid == 0) {
          const int ps = produced % STAGES;
          mbar_arrive_expect_tx(bar_addr + ps * 8, kWBytes);
          tma_load_2d(ring_addr + ps * kWBytes, &w_map, 0, blk * BLOCK, bar_addr + ps * 8);
        }
        ++produced;
      }
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue();
    cp_async_wait<0>();  // this thread's slab copies
    fence_proxy_async_smem();
    __syncthreads();  // ... and everyone's, visible to wgmma

    for (int i = wg; i < n_units; i += G) {
      const int rb = rb_first + i;
      const int kb0 = __ldg(crow + rb), kb1 = __ldg(crow + rb + 1);
      float acc[1][4][4];
      float(&d)[16] = reinterpret_cast<float(&)[16]>(acc);
#pragma unroll
      for (int e = 0; e < 16; ++e) d[e] = 0.f;

      for (int kb = kb0; kb < kb1; ++kb) {
        const int cs = consumed % STAGES;
        mbar_wait_parity(bar_addr + cs * 8, (consumed / STAGES) & 1);  // this W block has landed
        const uint32_t b0 = ring_addr + cs * kWBytes;
        ++consumed;
        const uint32_t a0 = slab_addr + __ldg(col + kb) * (BLOCK / 8) * 128;  // block column's first core matrix
        wgmma_fence();
#pragma unroll
        for (int e = 0; e < 16; ++e) reg_fence(d[e]);
#pragma unroll
        for (int kk = 0; kk < BLOCK / 16; ++kk) {
          const uint64_t bd = wgmma_desc(b0 + kk * 32, 16, 512, 2);  // 64-byte swizzle: +32 bytes per k16
          wgmma_m64n32k16<T>(d, wgmma_desc(a0 + kk * 256, 128, slab_sbo), bd);
        }
        wgmma_commit();
#pragma unroll
        for (int e = 0; e < 16; ++e) reg_fence(d[e]);
        wgmma_wait<1>();  // the previous block's MMAs are done (in this warp's slice) ...
        named_barrier_sync(1 + wg, 128);  // ... and in all four warps': its slot may be refilled
        issue();
      }
      wgmma_wait<0>();
#pragma unroll
      for (int e = 0; e < 16; ++e) reg_fence(d[e]);
      store_acc_tile<T, 1, 4>(acc, y, bias, M, N, m0 + wg_warp * 16, rb * BLOCK, lane, gelu);
    }
  }
#else
  // Built for another target than sm_90a: the host never launches this (bsr_linear_cuda checks the build
  // and the GPU first); trap rather than return an unwritten output if it ever were.
  __trap();
#endif
}

}  // namespace cuda
}  // namespace bsbert
