// The "x slab" variant of bsbert::bsr_linear for block 32, fp16/bf16 (the dispatcher in bsr_linear_cuda.cu
// picks slab64x8 for large M, BSBERT_CUDA_BSR_TILE=slab<rows>x<warps> forces one; the format is described there).
//
// Why: the default kernel gives each CTA one M tile x one 32-wide block row, so each k-step brings a
// [BM, 32] x tile (8 KB at BM=128) into shared memory for one 32x32 W block (2 KB): at most ~32 FLOP per
// byte moved from L2, whatever BM is. ncu on the H200 showed it latency-bound at 25% occupancy and L2
// already 35-49% busy at ~96 TFLOP/s, so latency fixes alone cap it near 2x. Here a CTA keeps the whole
// [BM, K] slab of x in shared memory (BM=64, K=1024: 128 KB) and runs many block rows of W over it, so
// only W blocks stream from L2 (BM FLOP per byte) and the slab is read once per CTA and M tile.
//
// Work split: a unit is (M tile, block row), weighted nnz(block row) + 1 (the +1 for its epilogue). The
// grid is persistent (as many CTAs as fit on the GPU at once); CTA c takes the contiguous run of units
// whose cumulative weight falls in [c, c+1) * total / gridDim (binary search over crow_indices), so every
// CTA gets the same number of W blocks to within one block row, whatever the sparsity pattern. A CTA's
// run crosses at most a few M tiles; for each one it loads the slab, then its warps take the run's block
// rows round-robin. Each warp works alone on its block row: a [BM, 32] fp32 accumulator, its own
// STAGES-deep cp.async ring of W blocks (prefetching across block-row boundaries), ldmatrix A fragments
// from the slab, mma.sync m16n8k16, then bias + GELU and predicated stores. No CTA-wide barrier in the
// main loop: warps drift freely, so one warp's epilogue or L2 miss is hidden by the others.
#pragma once

#include "cuda/bsr_tile_fragments.cuh"
#include "cuda/mma_utils.cuh"

namespace bsbert {
namespace cuda {

template <int BM_, int WARPS_, int STAGES_>
struct SlabConfig {
  static constexpr int BLOCK = 32, BM = BM_, WARPS = WARPS_, STAGES = STAGES_;
  static_assert(BM <= 256, "bsr_linear_cuda's row check (M <= 2^31 - 257) assumes tiles of at most 256 rows");
  static constexpr int kThreads = WARPS * 32;
  static constexpr int MT = BM / 16, NT = BLOCK / 8;
  static constexpr int kWElems = BLOCK * BLOCK;
  static constexpr int kWRingBytes = WARPS * STAGES * kWElems * 2;
  static_assert(BM % 16 == 0 && STAGES >= 2, "slab rows must be a multiple of 16; at least two stages");
  // Slab width: K rounded up to 64 elements (8 chunks of 16 bytes, the XOR swizzle's period).
  static int slab_cols(int K) { return (K + 63) / 64 * 64; }
  static int64_t smem_bytes(int K) { return int64_t{BM} * slab_cols(K) * 2 + kWRingBytes; }
};

// Element offset of (row, 16-byte chunk) in a slab with `cols` columns: the chunk index is XORed with
// row % 8, so the 8 row addresses of one ldmatrix 8x8 matrix (8 consecutive rows, same chunk) fall in
// 8 different 16-byte bank groups.
__device__ __forceinline__ int slab_offset(int row, int chunk, int cols) {
  return row * cols + ((chunk ^ (row & 7)) << 3);
}

// Cumulative weight of the units before unit u: (m tile) * (nnzb + nbr) + crow[rb] - crow[0] + rb.
// Unit indices are 32-bit (the host checks): a 64-bit division is a call that needs a stack frame.
__device__ __forceinline__ int64_t slab_unit_start(int u, int nbr, int64_t per_tile, const int* crow) {
  const int mt = u / nbr;
  const int rb = u - mt * nbr;
  return mt * per_tile + (__ldg(crow + rb) - __ldg(crow)) + rb;
}

// First unit whose start is >= target (units are strictly increasing in start: every weight is >= 1).
__device__ __forceinline__ int slab_lower_bound(int64_t target, int units, int nbr, int64_t per_tile,
                                                const int* crow) {
  int lo = 0, hi = units;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (slab_unit_start(mid, nbr, per_tile, crow) < target) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// [first, last) unit of this CTA's run: CTA c takes the units whose cumulative weight starts in
// [c, c+1) * total / gridDim. Any rule monotone in c that gives 0 for c = 0 and total for c = P partitions
// the units consistently (the end of CTA c is the start of CTA c+1); multiplying by a reciprocal is
// monotone. (An exact 64-bit ceil division would serve as well: the stack frame once blamed on it came from
// ptxas capping registers, fixed by __launch_bounds__(..., 1); this form is the one that ran on the GPU.)
__device__ __forceinline__ int2 slab_cta_run(int num_m_tiles, int nbr, const int* crow) {
  const int64_t nnzb = __ldg(crow + nbr) - __ldg(crow);
  const int64_t per_tile = nnzb + nbr;
  const int units = num_m_tiles * nbr;
  const int64_t total = static_cast<int64_t>(num_m_tiles) * per_tile;
  const double inv_p = static_cast<double>(__frcp_rn(static_cast<float>(gridDim.x)));
  auto start_weight = [&](unsigned cta) -> int64_t {
    if (cta >= gridDim.x) return total;
    const int64_t w = static_cast<int64_t>(ceil(static_cast<double>(cta) * static_cast<double>(total) * inv_p));
    return w < total ? w : total;
  };
  return make_int2(slab_lower_bound(start_weight(blockIdx.x), units, nbr, per_tile, crow),
                   slab_lower_bound(start_weight(blockIdx.x + 1), units, nbr, per_tile, crow));
}

// The part of a CTA's run [u, u_end) that lies in one M tile: its block rows rb_first .. rb_first + n_units - 1
// (units u .. u + n_units - 1); the run goes on at u + n_units.
struct SlabSegment {
  int m_tile, rb_first, n_units;
};
__device__ __forceinline__ SlabSegment slab_segment(int u, int u_end, int nbr) {
  const int m_tile = u / nbr;
  return {m_tile, u - m_tile * nbr, min(u_end, (m_tile + 1) * nbr) - u};
}

// Producer cursor over the stored W blocks of one worker's block rows of a segment (units first, first +
// stride, ... < n_units, block row rb_first + unit), in the order the worker consumes them.
struct WBlockStream {
  int pu, pk = 0, pk_end = 0;
  const int stride, n_units, rb_first;
  const int* crow;
  __device__ __forceinline__ WBlockStream(int first, int stride_, int n_units_, int rb_first_, const int* crow_)
      : pu(first), stride(stride_), n_units(n_units_), rb_first(rb_first_), crow(crow_) {
    load();
  }
  __device__ __forceinline__ void load() {
    if (pu < n_units) {
      pk = __ldg(crow + rb_first + pu);
      pk_end = __ldg(crow + rb_first + pu + 1);
    }
  }
  // Index of the next stored block (skipping empty block rows), or -1 once the stream is done.
  __device__ __forceinline__ int next() {
    while (pu < n_units && pk >= pk_end) {
      pu += stride;
      load();
    }
    return pu < n_units ? pk++ : -1;
  }
};

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    bsr_linear_slab_kernel(const T* __restrict__ x, const int* __restrict__ crow, const int* __restrict__ col,
                           const T* __restrict__ values, const T* __restrict__ bias, T* __restrict__ y, int M, int N,
                           int K, int num_m_tiles, int nbr, bool gelu) {
  constexpr int BLOCK = Cfg::BLOCK, BM = Cfg::BM, STAGES = Cfg::STAGES, WARPS = Cfg::WARPS;
  constexpr int MT = Cfg::MT, NT = Cfg::NT, kThreads = Cfg::kThreads;
  using Swz = Swizzle<BLOCK>;

  extern __shared__ __align__(1024) unsigned char smem_raw[];  // one symbol, one alignment (wgmma swizzle atoms)
  const int cols = (K + 63) / 64 * 64;
  const int chunks = cols >> 3;
  T* slab = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  T* ring = slab + static_cast<int64_t>(BM) * cols + warp * (STAGES * Cfg::kWElems);

  // ---- this CTA's run of units, balanced by weight ----
  const int2 run = slab_cta_run(num_m_tiles, nbr, crow);

  for (int u = run.x; u < run.y;) {
    const SlabSegment seg = slab_segment(u, run.y, nbr);
    const int rb_first = seg.rb_first, n_units = seg.n_units, m0 = seg.m_tile * BM;
    u += n_units;

    __syncthreads();  // every warp is done with the previous slab
    // ---- the slab: rows m0..m0+BM-1 of x, all K columns (zero beyond M and K) ----
    for (int i = tid; i < BM * chunks; i += kThreads) {
      const int r = i / chunks, ch = i - r * chunks;
      const int gm = m0 + r, gk = ch * 8;
      const bool ok = (gm < M) && (gk < K);
      const T* src = ok ? x + (static_cast<int64_t>(gm) * K + gk) : x;
      cp_async_16(smem_u32(slab + slab_offset(r, ch, cols)), src, ok);
    }
    cp_async_commit();

    // ---- this warp's W stream: block rows rb_first + warp, + WARPS, ...; producer cursor ----
    WBlockStream stream(warp, WARPS, n_units, rb_first, crow);
    // Issues the copy of the next W block of the stream into `slot` (nothing once the stream is done) and
    // commits a group either way, so group i always holds item i.
    auto issue = [&](int slot) {
      const int blk = stream.next();
      if (blk >= 0) {
        const T* src = values + static_cast<int64_t>(blk) * (BLOCK * BLOCK);
        T* dst = ring + slot * Cfg::kWElems;
#pragma unroll
        for (int i = lane; i < BLOCK * (BLOCK / 8); i += 32) {
          const int r = i >> 2, ch = i & 3;
          cp_async_16(smem_u32(dst + Swz::chunk_offset(r, ch)), src + r * BLOCK + ch * 8, true);
        }
      }
      cp_async_commit();
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(s);
    cp_async_wait<STAGES - 1>();  // this thread's slab copies are done (only W groups may be in flight)
    __syncthreads();              // ... and everyone's: the slab is complete

    int item = 0;
    for (int i = warp; i < n_units; i += WARPS) {
      const int rb = rb_first + i;
      const int kb0 = __ldg(crow + rb), kb1 = __ldg(crow + rb + 1);
      float acc[MT][NT][4];
#pragma unroll
      for (int a = 0; a < MT; ++a)
#pragma unroll
        for (int b = 0; b < NT; ++b)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.f;

      for (int kb = kb0; kb < kb1; ++kb, ++item) {
        cp_async_wait<STAGES - 2>();
        __syncwarp();  // W block `item` visible to the whole warp; slot item-1 no longer read by anyone
        issue((item + STAGES - 1) % STAGES);
        const T* sw = ring + (item % STAGES) * Cfg::kWElems;
        const int chunk0 = __ldg(col + kb) * (BLOCK / 8);
#pragma unroll
        for (int kk = 0; kk < BLOCK / 16; ++kk) {
          uint32_t b[NT][2];
          load_w_fragments<BLOCK, NT>(b, sw, 0, kk, lane);
#pragma unroll
          for (int a = 0; a < MT; ++a) {
            uint32_t af[4];
            const int r = a * 16 + (lane & 15);
            ldmatrix_x4(af, smem_u32(slab + slab_offset(r, chunk0 + kk * 2 + (lane >> 4), cols)));
#pragma unroll
            for (int j = 0; j < NT; ++j) mma_16816<T>(acc[a][j], af, b[j]);
          }
        }
      }

      store_acc_tile<T, MT, NT>(acc, y, bias, M, N, m0, rb * BLOCK, lane, gelu);
    }
    cp_async_wait<0>();  // the ring's trailing (empty or unread) groups: nothing in flight past the segment
  }
}

}  // namespace cuda
}  // namespace bsbert
