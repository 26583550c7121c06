// bsbert::bsr_linear for the CUDA dispatch key: y = x @ W^T + bias (optionally erf-GELU), W block-sparse.
//
// W is a bsbert.formats.BlockSparseMatrix: logical (N, K), square blocks of BLOCK in {16, 32, 64},
// int32 crow_indices [ceil(N/BLOCK)+1], int32 col_indices (sorted per block row), values
// [nnzb, BLOCK, BLOCK] with values[i][r][c] = W[rb*BLOCK + r, cb*BLOCK + c] (zero padded). On CUDA the
// "packed" values are the natural values tensor (contiguous, x's dtype).
// The index *values* are trusted here (shapes, dtypes and devices are checked): reading them would cost a
// device-to-host copy and a sync per call. BlockSparseMatrix validates them when it is built, which is how
// bsbert calls this op; a direct caller with hand-made indices (a negative or out-of-range column, crow not
// running from 0 to nnzb) gets wrong values or an illegal address. The CPU op checks them (it reads them anyway).
//
// fp16/bf16 kernel: one CTA computes a BM x BLOCK tile of y (BM = 64 or 128 rows of x, one block row of W).
// It walks the nonzero blocks of its block row: each step brings an x tile [BM, BLOCK] (the columns of
// the block, zero-filled beyond M and K) and the W block [BLOCK, BLOCK] into shared memory with cp.async
// (STAGES-deep pipeline, XOR-swizzled tiles), feeds ldmatrix -> mma.sync.m16n8k16 (fp32 accumulate), and
// finishes with bias + optional GELU, predicated stores (never beyond M or N). CTAs are ordered in groups
// of kGroupM M tiles so that CTAs running together share the same x rows in L2.
// Large M, block 32: the x-slab kernels (bsr_linear_slab.cuh; a Hopper wgmma variant in bsr_linear_wgmma.cuh).
// fp32 input: a simple SIMT kernel (correct, not fast).
//
// -DBSBERT_KERNELS_ONLY compiles the kernels alone (no torch headers, no host code): tests/test_cuda_sass.py
// uses it to check registers/spills/SASS quickly without a GPU.
#include "cuda/bsr_linear_slab.cuh"
#include "cuda/bsr_linear_wgmma.cuh"
#include "cuda/bsr_tile_fragments.cuh"
#include "cuda/mma_utils.cuh"

#ifndef BSBERT_KERNELS_ONLY
#include <ATen/core/Tensor.h>  // (not ATen/ATen.h: every op's header, parsed again per architecture)
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/zeros.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <string>
#include <torch/library.h>
#include <type_traits>

#include "cuda/cuda_host_utils.h"
#include "check.h"
#endif

namespace bsbert {
namespace cuda {
namespace {

constexpr int kGroupM = 8;  // M tiles per grid swizzle group

template <int BLOCK_, int BM_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct BsrConfig {
  static constexpr int BLOCK = BLOCK_, BM = BM_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static_assert(BM <= 256, "bsr_linear_cuda's row check (M <= 2^31 - 257) assumes tiles of at most 256 rows");
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int WTM = BM / WARPS_M;   // warp tile rows
  static constexpr int WTN = BLOCK / WARPS_N;  // warp tile cols
  static constexpr int MT = WTM / 16, NT = WTN / 8;
  static constexpr int kXElems = BM * BLOCK, kWElems = BLOCK * BLOCK;
  static constexpr int kStageElems = kXElems + kWElems;
  static constexpr int kSmemBytes = STAGES * kStageElems * 2;
  static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile must be a multiple of 16x16");
  static_assert(STAGES >= 2, "need at least two pipeline stages");
};

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    bsr_linear_mma_kernel(const T* __restrict__ x, const int* __restrict__ crow, const int* __restrict__ col,
                          const T* __restrict__ values, const T* __restrict__ bias, T* __restrict__ y, int M,
                          int N, int K, int num_m_tiles, int num_block_rows, bool gelu) {
  constexpr int BLOCK = Cfg::BLOCK, BM = Cfg::BM, STAGES = Cfg::STAGES, kThreads = Cfg::kThreads;
  constexpr int MT = Cfg::MT, NT = Cfg::NT;
  constexpr int kChunks = BLOCK / 8;  // 16-byte chunks per tile row
  using Swz = Swizzle<BLOCK>;
  using Ty = MmaType<T>;

  extern __shared__ __align__(1024) unsigned char smem_raw[];  // one symbol, one alignment (wgmma swizzle atoms)
  T* smem = reinterpret_cast<T*>(smem_raw);

  // ---- grouped (swizzled) CTA order: kGroupM M tiles x all block rows per group ----
  const int pid = blockIdx.x;
  const int per_group = kGroupM * num_block_rows;
  const int group = pid / per_group;
  const int first_m = group * kGroupM;
  const int group_m = min(num_m_tiles - first_m, kGroupM);
  const int in_group = pid - group * per_group;
  const int m_tile = first_m + in_group % group_m;
  const int rb = in_group / group_m;
  const int m0 = m_tile * BM;
  const int n0 = rb * BLOCK;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / Cfg::WARPS_N, wn = warp % Cfg::WARPS_N;

  const int kb_begin = __ldg(crow + rb), kb_end = __ldg(crow + rb + 1);
  const int nk = kb_end - kb_begin;

  auto load_stage = [&](int stage, int kb) {
    T* sx = smem + stage * Cfg::kStageElems;
    T* sw = sx + Cfg::kXElems;
    const int kcol0 = __ldg(col + kb) * BLOCK;
    // x tile: BM rows x kChunks chunks; rows >= M and columns >= K are zero-filled (K % 8 == 0 here).
#pragma unroll
    for (int c = tid; c < BM * kChunks; c += kThreads) {
      const int r = c / kChunks, ch = c % kChunks;
      const int gm = m0 + r, gk = kcol0 + ch * 8;
      const bool ok = (gm < M) && (gk < K);
      const T* src = ok ? x + (static_cast<int64_t>(gm) * K + gk) : x;
      cp_async_16(smem_u32(sx + Swz::chunk_offset(r, ch)), src, ok);
    }
    // W block: BLOCK x BLOCK, always complete (zero padded by the format).
    const T* wsrc = values + static_cast<int64_t>(kb) * (BLOCK * BLOCK);
#pragma unroll
    for (int c = tid; c < BLOCK * kChunks; c += kThreads) {
      const int r = c / kChunks, ch = c % kChunks;
      cp_async_16(smem_u32(sw + Swz::chunk_offset(r, ch)), wsrc + r * BLOCK + ch * 8, true);
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // ---- prologue: fill STAGES-1 stages ----
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_stage(s, kb_begin + s);
    cp_async_commit();
  }

  // ---- main loop over the nonzero blocks of block row rb ----
  for (int it = 0; it < nk; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage `it` visible to all; everyone is done with stage it-1 (reused below)
    {
      const int nxt = it + STAGES - 1;
      if (nxt < nk) load_stage(nxt % STAGES, kb_begin + nxt);
      cp_async_commit();
    }
    const T* sx = smem + (it % STAGES) * Cfg::kStageElems;
    const T* sw = sx + Cfg::kXElems;
#pragma unroll
    for (int kk = 0; kk < BLOCK / 16; ++kk) {
      uint32_t a[MT][4], b[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int r = wm * Cfg::WTM + i * 16 + (lane & 15);
        const int ch = kk * 2 + (lane >> 4);
        ldmatrix_x4(a[i], smem_u32(sx + Swz::chunk_offset(r, ch)));
      }
      load_w_fragments<BLOCK, NT>(b, sw, wn * Cfg::WTN, kk, lane);
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_16816<T>(acc[i][j], a[i], b[j]);
    }
  }
  cp_async_wait<0>();  // no copy may be in flight when the CTA exits

  store_acc_tile<T, MT, NT>(acc, y, bias, M, N, m0 + wm * Cfg::WTM, n0 + wn * Cfg::WTN, lane, gelu);
}

// fp32: one thread per output element (SIMT, fp32 accumulate). Correct for any shape; not tuned.
__global__ void bsr_linear_f32_kernel(const float* __restrict__ x, const int* __restrict__ crow,
                                      const int* __restrict__ col, const float* __restrict__ values,
                                      const float* __restrict__ bias, float* __restrict__ y, int64_t M, int N,
                                      int K, int block, bool gelu) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * N) return;
  const int64_t m = idx / N;
  const int n = static_cast<int>(idx - m * N);
  const int rb = n / block, r = n - rb * block;
  const float* xr = x + m * K;
  float acc = 0.f;
  for (int i = crow[rb]; i < crow[rb + 1]; ++i) {
    const int k0 = col[i] * block;
    const float* w = values + (static_cast<int64_t>(i) * block + r) * block;
    const int kend = min(block, K - k0);
    for (int c = 0; c < kend; ++c) acc = fmaf(xr[k0 + c], w[c], acc);
  }
  if (bias != nullptr) acc += bias[n];
  if (gelu) acc = gelu_erf(acc);
  y[idx] = acc;
}

// The tile configurations (block, BM, warps_m, warps_n, stages). The defaults are 64x4 and 128x4
// (rows x warps); the others are candidates selected with BSBERT_CUDA_BSR_TILE until measured to pay:
// 8 warps per CTA (more warps to hide latency: ncu found the 4-warp kernel latency-bound at 25%
// occupancy) and 256-row tiles (each W block fetched half as often).
using Cfg16x64 = BsrConfig<16, 64, 4, 1, 4>;
using Cfg16x128 = BsrConfig<16, 128, 4, 1, 4>;
using Cfg32x64 = BsrConfig<32, 64, 2, 2, 4>;
using Cfg32x64w8 = BsrConfig<32, 64, 4, 2, 4>;
using Cfg32x128 = BsrConfig<32, 128, 4, 1, 4>;
using Cfg32x128w8 = BsrConfig<32, 128, 4, 2, 4>;
using Cfg32x256 = BsrConfig<32, 256, 4, 2, 4>;
using Cfg64x64 = BsrConfig<64, 64, 2, 2, 3>;
using Cfg64x128 = BsrConfig<64, 128, 2, 2, 3>;
using Cfg64x128w8 = BsrConfig<64, 128, 4, 2, 3>;

// Every configuration, listed once: the dispatcher, the SASS check's instantiations and the error
// message all come from this list (bsbert.ops.linear_backends.CudaBsr.TILES mirrors it in Python).
template <typename... Cfgs>
struct CfgList {};
using AllBsrConfigs = CfgList<Cfg16x64, Cfg16x128, Cfg32x64, Cfg32x64w8, Cfg32x128, Cfg32x128w8, Cfg32x256,
                              Cfg64x64, Cfg64x128, Cfg64x128w8>;

// The x-slab kernels (bsr_linear_slab.cuh), block 32 only: 64 rows x 8 warps (K=1024: 128 KB slab + 64 KB
// of W rings, one CTA per SM; dispatch_mma's default for large M), and, forced with
// BSBERT_CUDA_BSR_TILE=slab<rows>x<warps>, 64 x 4 (fewer warps, 160 KB) and 32 x 8 (half the slab, but with
// its 64 KB of W rings still one CTA per SM at K=1024). On the H200 both were slower than 64 x 8 except
// 32 x 8 at M = 3072, N = 1024, density 0.5 / 0.25: 0.032 / 0.022 ms (64 x 8: 0.033 / 0.024; default tile
// 0.035 / 0.021).
// 32 x 4 (K=1024: 64 KB slab + 32 KB of rings) is the one that fits two CTAs per SM: while one waits for its
// slab the other computes. On the H100 (stop 16) the block-independent part of slab64x8's time (loading x
// slabs, storing y: ~36 us at M = 12288, N = K = 1024) was as large as cuBLAS's whole dense GEMM; this tile
// is the cheapest test of hiding it (added after that run: not yet measured).
using Slab64x8 = SlabConfig<64, 8, 4>;
using Slab64x4 = SlabConfig<64, 4, 4>;
using Slab32x8 = SlabConfig<32, 8, 4>;
using Slab32x4 = SlabConfig<32, 4, 4>;
using AllSlabConfigs = CfgList<Slab64x8, Slab64x4, Slab32x8, Slab32x4>;

// The Hopper x-slab kernels (bsr_linear_wgmma.cuh; sm_90a builds on sm_90 GPUs): 64 rows, 4 or 2
// warpgroups, 8-deep W rings (K=1024: 128 KB slab + 64 / 32 KB of rings). Forced only
// (BSBERT_CUDA_BSR_TILE=wgslab64x16 / wgslab64x8): on the H100 (stop 16) they ran 2-28% slower than slab64x8.
using WgSlab64x16 = WgSlabConfig<16, 8>;
using WgSlab64x8 = WgSlabConfig<8, 8>;
using AllWgSlabConfigs = CfgList<WgSlab64x16, WgSlab64x8>;

#ifdef BSBERT_KERNELS_ONLY
template <typename... Cfgs, typename... Slabs, typename... WgSlabs>
void take_kernels(CfgList<Cfgs...>, CfgList<Slabs...>, CfgList<WgSlabs...>, void** out) {
  int i = 0;
  ((out[i++] = (void*)&bsr_linear_mma_kernel<__half, Cfgs>), ...);
  ((out[i++] = (void*)&bsr_linear_mma_kernel<__nv_bfloat16, Cfgs>), ...);
  ((out[i++] = (void*)&bsr_linear_slab_kernel<__half, Slabs>), ...);
  ((out[i++] = (void*)&bsr_linear_slab_kernel<__nv_bfloat16, Slabs>), ...);
  ((out[i++] = (void*)&bsr_linear_wgmma_kernel<__half, WgSlabs>), ...);
  ((out[i++] = (void*)&bsr_linear_wgmma_kernel<__nv_bfloat16, WgSlabs>), ...);
  out[i] = (void*)&bsr_linear_f32_kernel;
}
}  // namespace
// Instantiates every kernel the dispatcher can launch (SASS/resource checks); never called.
void bsr_linear_kernels_for_sass(void** out) {
  take_kernels(AllBsrConfigs{}, AllSlabConfigs{}, AllWgSlabConfigs{}, out);
}
namespace {
#else
// The persistent launch of the x-slab kernels: as many CTAs as fit on the GPU at once (never more than
// there are (M tile, block row) units), and the tile counts both kernels take; a clear error when the slab
// does not fit in shared memory. Also raises the kernel's dynamic shared-memory limit.
struct SlabLaunch {
  unsigned grid;
  int64_t smem;
  int num_m_tiles, nbr;
};

template <typename Cfg, typename Kernel>
SlabLaunch slab_launch(Kernel kernel, const char* prefix, int M, int N, int K) {
  const int64_t smem = Cfg::smem_bytes(K);
  const int optin = max_smem_optin();
  BSBERT_CHECK(smem <= optin, "bsr_linear (CUDA): BSBERT_CUDA_BSR_TILE=", prefix, Cfg::BM, "x", Cfg::WARPS,
              " needs ", smem, " bytes of shared memory for in_features=", K, " (a ", Cfg::BM, " x ",
              Cfg::slab_cols(K), " slab of x plus the W rings); this GPU allows ", optin,
              " per block: use a smaller slab or a rows x warps tile");
  allow_max_dynamic_smem(reinterpret_cast<const void*>(kernel));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Cfg::kThreads, smem));
  BSBERT_CHECK(per_sm > 0, "bsr_linear (CUDA): the slab kernel cannot be resident with ", smem,
              " bytes of shared memory");
  const int num_m_tiles = (M + Cfg::BM - 1) / Cfg::BM, nbr = (N + Cfg::BLOCK - 1) / Cfg::BLOCK;
  const int64_t units = static_cast<int64_t>(num_m_tiles) * nbr;
  BSBERT_CHECK(units < (int64_t{1} << 31), "bsr_linear (CUDA): ", units, " (M tile, block row) units are too many "
              "for the slab kernel (at most 2^31 - 1)");
  const int64_t grid = std::min<int64_t>(units, static_cast<int64_t>(per_sm) * sm_count());
  return {static_cast<unsigned>(grid), smem, num_m_tiles, nbr};
}

template <typename T, typename Cfg>
void launch_slab(const at::Tensor& x2, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& vals,
                 const T* bias, at::Tensor& y, int M, int N, int K, bool gelu, cudaStream_t stream) {
  auto kernel = bsr_linear_slab_kernel<T, Cfg>;
  const SlabLaunch l = slab_launch<Cfg>(kernel, "slab", M, N, K);
  kernel<<<l.grid, Cfg::kThreads, l.smem, stream>>>(
      reinterpret_cast<const T*>(x2.data_ptr()), crow.data_ptr<int>(), col.data_ptr<int>(),
      reinterpret_cast<const T*>(vals.data_ptr()), bias, reinterpret_cast<T*>(y.data_ptr()), M, N, K, l.num_m_tiles,
      l.nbr, gelu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// cuTensorMapEncodeTiled from the driver, found through the runtime (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
    BSBERT_CHECK(p != nullptr && q == cudaDriverEntryPointSuccess,
                 "bsr_linear (CUDA): the driver has no cuTensorMapEncodeTiled (needs CUDA 12+)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// W's natural values [nnzb, 32, 32] as a 2-D tensor [nnzb * 32 rows, 32 columns]; each copy is one block
// (a 32 x 32 box), written 64-byte swizzled. An all-zero map when there is no block (never read).
template <typename T>
CUtensorMap w_tensor_map(const at::Tensor& vals) {
  CUtensorMap map;
  std::memset(&map, 0, sizeof(map));
  if (vals.size(0) == 0) return map;
  const cuuint64_t dims[2] = {32, static_cast<cuuint64_t>(vals.size(0)) * 32};
  const cuuint64_t strides[1] = {32 * sizeof(T)};
  const cuuint32_t box[2] = {32, 32}, elem_strides[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(
      &map, std::is_same_v<T, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
      vals.data_ptr(), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_64B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  BSBERT_CHECK(r == CUDA_SUCCESS, "bsr_linear (CUDA): cuTensorMapEncodeTiled failed (CUresult ", static_cast<int>(r),
               ")");
  return map;
}

// The Hopper x-slab kernel: W blocks come through a tensor map over the natural values (bsr_linear_wgmma.cuh).
template <typename T, typename Cfg>
void launch_wgslab(const at::Tensor& x2, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& vals,
                   const T* bias, at::Tensor& y, int M, int N, int K, bool gelu, cudaStream_t stream) {
  auto kernel = bsr_linear_wgmma_kernel<T, Cfg>;
  const SlabLaunch l = slab_launch<Cfg>(kernel, "wgslab", M, N, K);
  kernel<<<l.grid, Cfg::kThreads, l.smem, stream>>>(
      w_tensor_map<T>(vals), reinterpret_cast<const T*>(x2.data_ptr()), crow.data_ptr<int>(), col.data_ptr<int>(),
      bias, reinterpret_cast<T*>(y.data_ptr()), M, N, K, l.num_m_tiles, l.nbr, gelu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool Wgmma, typename... Slabs>
bool launch_matching_slab(CfgList<Slabs...>, int bm, int warps, const at::Tensor& x2, const at::Tensor& crow,
                          const at::Tensor& col, const at::Tensor& vals, const T* bias, at::Tensor& y, int M, int N,
                          int K, bool gelu, cudaStream_t stream) {
  auto try_one = [&](auto cfg) {
    using Cfg = decltype(cfg);
    if (bm != Cfg::BM || warps != Cfg::WARPS) return false;
    if constexpr (Wgmma) {
      launch_wgslab<T, Cfg>(x2, crow, col, vals, bias, y, M, N, K, gelu, stream);
    } else {
      launch_slab<T, Cfg>(x2, crow, col, vals, bias, y, M, N, K, gelu, stream);
    }
    return true;
  };
  return (try_one(Slabs{}) || ...);
}

// The wgmma kernels exist only in an sm_90a build (BSBERT_HAS_SM90A: setup.py defines it when the arch list
// names 9.0a) and run only on compute capability 9.0 exactly (sm_90a code runs nowhere else).
#ifdef BSBERT_HAS_SM90A
constexpr bool kBuiltForSm90a = true;
#else
constexpr bool kBuiltForSm90a = false;
#endif
bool wgmma_runs_here() {
  return kBuiltForSm90a && cached_device_attr<cudaDevAttrComputeCapabilityMajor>() == 9 &&
         cached_device_attr<cudaDevAttrComputeCapabilityMinor>() == 0;
}

template <typename T, typename Cfg>
void launch_mma(const at::Tensor& x2, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& vals,
                const T* bias, at::Tensor& y, int M, int N, int K, bool gelu, cudaStream_t stream) {
  const int num_m_tiles = (M + Cfg::BM - 1) / Cfg::BM;
  const int num_block_rows = (N + Cfg::BLOCK - 1) / Cfg::BLOCK;
  const int64_t grid = static_cast<int64_t>(num_m_tiles) * num_block_rows;
  BSBERT_CHECK(grid < (int64_t{1} << 31), "bsr_linear: problem too large for one launch (", num_m_tiles,
              " M tiles x ", num_block_rows, " block rows)");
  auto kernel = bsr_linear_mma_kernel<T, Cfg>;
  if (Cfg::kSmemBytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  }
  kernel<<<static_cast<unsigned>(grid), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(
      reinterpret_cast<const T*>(x2.data_ptr()), crow.data_ptr<int>(), col.data_ptr<int>(),
      reinterpret_cast<const T*>(vals.data_ptr()), bias, reinterpret_cast<T*>(y.data_ptr()), M, N, K,
      num_m_tiles, num_block_rows, gelu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the first configuration of the list that is the requested (block, rows, warps); true if one was.
template <typename T, typename... Cfgs>
bool launch_matching(CfgList<Cfgs...>, int block, int bm, int warps, const at::Tensor& x2, const at::Tensor& crow,
                     const at::Tensor& col, const at::Tensor& vals, const T* bias, at::Tensor& y, int M, int N,
                     int K, bool gelu, cudaStream_t stream) {
  auto try_one = [&](auto cfg) {
    using Cfg = decltype(cfg);
    if (block != Cfg::BLOCK || bm != Cfg::BM || warps != Cfg::WARPS_M * Cfg::WARPS_N) return false;
    launch_mma<T, Cfg>(x2, crow, col, vals, bias, y, M, N, K, gelu, stream);
    return true;
  };
  return (try_one(Cfgs{}) || ...);
}

// " block 16: 64x4, ..." for the error message.
template <typename... Cfgs>
std::string config_names(CfgList<Cfgs...>) {
  std::string s;
  ((s += msg(" block ", Cfgs::BLOCK, ": ", Cfgs::BM, "x", Cfgs::WARPS_M * Cfgs::WARPS_N, ";")), ...);
  return s;
}

template <typename... Slabs>
std::string config_names_slab(const char* prefix, CfgList<Slabs...>) {
  std::string s;
  ((s += msg(" ", prefix, Slabs::BM, "x", Slabs::WARPS, ";")), ...);
  return s;
}

template <typename T>
void dispatch_mma(const at::Tensor& x2, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& vals,
                  const at::Tensor* bias_t, at::Tensor& y, int M, int N, int K, int block, bool gelu) {
  const T* bias = bias_t ? reinterpret_cast<const T*>(bias_t->data_ptr()) : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count();
  const int64_t block_rows = (N + block - 1) / block;
  // Block 32: the x-slab kernel (64 rows x 8 warps) when its slab fits in shared memory and there are at
  // least 32 (64-row M tile, block row) units per SM, i.e. ~4 block rows per warp. On the H200 (fp16,
  // benchmarks/results/gpu-h200.md, stop 11) that rule picks it exactly where it beat the default tile:
  // M = 12288 with N = 1024 or 4096 and M = 3072 with N = 4096 (1.17-1.84x at densities 1/0.5/0.25);
  // at M = 3072, N = 1024 (12 units per SM) it was slower at density 0.25.
  // Otherwise 128-row tiles unless that leaves fewer than ~2 CTAs per SM; then 64-row tiles (more CTAs).
  // BSBERT_CUDA_BSR_TILE=<rows>x<warps> (e.g. 128x8) or slab<rows>x<warps> forces a configuration.
  const bool small = ((M + 127) / 128) * block_rows < 2 * static_cast<int64_t>(sms);
  int bm = small ? 64 : 128, warps = 4;
  const char* env = std::getenv("BSBERT_CUDA_BSR_TILE");
  bool slab = block == 32 && ((M + Slab64x8::BM - 1) / Slab64x8::BM) * block_rows >= 32 * static_cast<int64_t>(sms) &&
              Slab64x8::smem_bytes(K) <= max_smem_optin();
  if (slab) bm = Slab64x8::BM, warps = Slab64x8::WARPS;
  bool wgslab = false;
  if (env != nullptr) {
    wgslab = std::strncmp(env, "wgslab", 6) == 0;
    slab = !wgslab && std::strncmp(env, "slab", 4) == 0;
    int used = 0;
    const char* spec = wgslab ? env + 6 : slab ? env + 4 : env;
    if (std::sscanf(spec, "%dx%d%n", &bm, &warps, &used) != 2 || spec[used] != '\0') bm = -1;
  }
  if (wgslab) {
    BSBERT_CHECK(wgmma_runs_here(), "bsr_linear (CUDA): BSBERT_CUDA_BSR_TILE='", env, "' needs Hopper wgmma: an "
                 "extension built for sm_90a (BSBERT_CUDA_ARCH_LIST or TORCH_CUDA_ARCH_LIST naming 9.0a) and a "
                 "GPU of compute capability 9.0; this build ", kBuiltForSm90a ? "has" : "has no",
                 " sm_90a code and this GPU is ", cached_device_attr<cudaDevAttrComputeCapabilityMajor>(), ".",
                 cached_device_attr<cudaDevAttrComputeCapabilityMinor>());
  }
  const bool ok = wgslab ? block == 32 && launch_matching_slab<T, true>(AllWgSlabConfigs{}, bm, warps, x2, crow,
                                                                        col, vals, bias, y, M, N, K, gelu, stream)
                  : slab ? block == 32 && launch_matching_slab<T, false>(AllSlabConfigs{}, bm, warps, x2, crow, col,
                                                                         vals, bias, y, M, N, K, gelu, stream)
                         : launch_matching<T>(AllBsrConfigs{}, block, bm, warps, x2, crow, col, vals, bias, y, M, N,
                                              K, gelu, stream);
  BSBERT_CHECK(ok, "bsr_linear (CUDA): no tile configuration for block ", block,
               env ? msg(" and BSBERT_CUDA_BSR_TILE='", env, "'") : std::string(),
               " (rows x warps:", config_names(AllBsrConfigs{}), " block 32 x-slab:",
               config_names_slab("slab", AllSlabConfigs{}), " block 32 Hopper x-slab:",
               config_names_slab("wgslab", AllWgSlabConfigs{}), ")");
}

bool aligned16(const at::Tensor& t) { return (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16) == 0; }

at::Tensor bsr_linear_cuda(const at::Tensor& x, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                           const at::Tensor& packed_values, const std::optional<at::Tensor>& bias,
                           int64_t out_features, int64_t in_features, int64_t block, bool gelu) {
  BSBERT_CHECK(x.is_cuda(), "bsr_linear (CUDA): x must be a CUDA tensor, got device ", x.device());
  const auto dtype = x.scalar_type();
  BSBERT_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "bsr_linear (CUDA): x dtype ", dtype, " is not supported (use float16, bfloat16 or float32)");
  BSBERT_CHECK(block == 16 || block == 32 || block == 64, "bsr_linear (CUDA): block must be 16, 32 or 64, got ",
              block);
  BSBERT_CHECK(out_features >= 0 && in_features >= 0, "bsr_linear (CUDA): out_features and in_features must be "
              "non-negative, got ", out_features, " and ", in_features);
  BSBERT_CHECK(out_features < (int64_t{1} << 31) && in_features < (int64_t{1} << 31),
              "bsr_linear (CUDA): out_features/in_features too large");
  BSBERT_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "bsr_linear (CUDA): x must have last dimension "
              "in_features=", in_features, ", got shape ", x.sizes());
  const int64_t nbr = (out_features + block - 1) / block;
  for (const auto* p : {&crow_indices, &col_indices}) {
    const char* name = p == &crow_indices ? "crow_indices" : "col_indices";
    BSBERT_CHECK(p->device() == x.device(), "bsr_linear (CUDA): ", name, " must be on ", x.device(), ", got ",
                p->device());
    BSBERT_CHECK(p->scalar_type() == at::kInt, "bsr_linear (CUDA): ", name, " must be int32, got ",
                p->scalar_type());
    BSBERT_CHECK(p->dim() == 1, "bsr_linear (CUDA): ", name, " must be 1-D, got shape ", p->sizes());
    BSBERT_CHECK(p->is_contiguous(), "bsr_linear (CUDA): ", name, " must be contiguous");
  }
  BSBERT_CHECK(crow_indices.numel() == nbr + 1, "bsr_linear (CUDA): crow_indices must have ceil(out_features/"
              "block)+1 = ", nbr + 1, " entries, got ", crow_indices.numel());
  const int64_t nnzb = col_indices.numel();
  BSBERT_CHECK(packed_values.device() == x.device(), "bsr_linear (CUDA): packed_values must be on ", x.device(),
              ", got ", packed_values.device());
  BSBERT_CHECK(packed_values.scalar_type() == dtype, "bsr_linear (CUDA): packed_values dtype ",
              packed_values.scalar_type(), " must match x dtype ", dtype);
  BSBERT_CHECK(packed_values.dim() == 3 && packed_values.size(0) == nnzb && packed_values.size(1) == block &&
                  packed_values.size(2) == block,
              "bsr_linear (CUDA): packed_values must have shape [nnz_blocks=", nnzb, ", ", block, ", ", block,
              "] (natural BSR values), got ", packed_values.sizes());
  BSBERT_CHECK(packed_values.is_contiguous(), "bsr_linear (CUDA): packed_values must be contiguous");
  const at::Tensor* bias_p = nullptr;
  if (bias.has_value() && bias->defined()) {
    BSBERT_CHECK(bias->device() == x.device(), "bsr_linear (CUDA): bias must be on ", x.device(), ", got ",
                bias->device());
    BSBERT_CHECK(bias->scalar_type() == dtype, "bsr_linear (CUDA): bias dtype ", bias->scalar_type(),
                " must match x dtype ", dtype);
    BSBERT_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "bsr_linear (CUDA): bias must have shape [",
                out_features, "], got ", bias->sizes());
    bias_p = &*bias;
  }

  c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = in_features, N = out_features;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  // M from the leading sizes: reshape({-1, K}) is ambiguous (an error) for K = 0
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor x2 = x.reshape({M, K}).contiguous();
  at::Tensor y = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return y.view(out_shape);
  at::Tensor bias_c;
  if (bias_p) {
    bias_c = bias_p->contiguous();
    bias_p = &bias_c;
  }
  if (K == 0) {  // no inputs: y = bias (then GELU), as on the CPU; the kernels assume K > 0
    if (bias_p) {
      y.copy_(bias_p->unsqueeze(0).expand({M, N}));
    } else {
      y.zero_();
    }
    return (gelu ? at::gelu(y) : y).view(out_shape);
  }

  if (dtype == at::kFloat) {
    const int threads = 256;
    const int64_t blocks = (M * N + threads - 1) / threads;
    BSBERT_CHECK(blocks < (int64_t{1} << 31), "bsr_linear (CUDA): problem too large for the fp32 kernel");
    bsr_linear_f32_kernel<<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x2.data_ptr<float>(), crow_indices.data_ptr<int>(), col_indices.data_ptr<int>(),
        packed_values.data_ptr<float>(), bias_p ? bias_p->data_ptr<float>() : nullptr, y.data_ptr<float>(), M,
        static_cast<int>(N), static_cast<int>(K), static_cast<int>(block), gelu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y.view(out_shape);
  }

  // Rows are int in the launch math and the kernels (m0 + r, M + BM - 1 with BM <= 256): keep those sums
  // inside int's range, not only M itself.
  BSBERT_CHECK(M <= (int64_t{1} << 31) - 1 - 256, "bsr_linear (CUDA): too many rows (", M, "; at most 2^31 - 257)");
  // The tensor-core kernel copies x in aligned 16-byte chunks: rows must be 8-element aligned. When K is
  // not a multiple of 8 the (rare) fallback pads x's rows with zeros; the padding is never multiplied into
  // y because W's padded columns are zero and only the logical K inputs exist in x.
  int64_t Kp = K;
  if (K % 8 != 0 || !aligned16(x2)) {
    Kp = (K + 7) / 8 * 8;
    at::Tensor xp = at::zeros({M, Kp}, x2.options());
    xp.narrow(1, 0, K).copy_(x2);
    x2 = xp;
  }
  at::Tensor vals = aligned16(packed_values) ? packed_values : packed_values.clone();
  if (dtype == at::kHalf) {
    dispatch_mma<__half>(x2, crow_indices, col_indices, vals, bias_p, y, static_cast<int>(M),
                         static_cast<int>(N), static_cast<int>(Kp), static_cast<int>(block), gelu);
  } else {
    dispatch_mma<__nv_bfloat16>(x2, crow_indices, col_indices, vals, bias_p, y, static_cast<int>(M),
                                static_cast<int>(N), static_cast<int>(Kp), static_cast<int>(block), gelu);
  }
  return y.view(out_shape);
}
#endif  // BSBERT_KERNELS_ONLY

}  // namespace

#ifndef BSBERT_KERNELS_ONLY
// Empty if this build's block-sparse kernels can run on CUDA device `device`, else why not (a GPU whose
// architecture the build has no code for: its first launch would fail inside patch's measurement).
std::string bsr_linear_image_problem(int64_t device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return kernel_image_problem(reinterpret_cast<const void*>(&bsr_linear_mma_kernel<__half, Cfg32x64>));
}
#endif

}  // namespace cuda
}  // namespace bsbert

#ifndef BSBERT_KERNELS_ONLY
TORCH_LIBRARY_IMPL(bsbert, CUDA, m) { m.impl("bsr_linear", &bsbert::cuda::bsr_linear_cuda); }
#endif
