// bsbert::pruned_attention / pruned_attention_varlen for the CUDA dispatch key: a FlashAttention-2-style
// forward (non-causal) for head_dim 32 or 64, fp16/bf16, fp32 accumulation and online softmax.
//
// qkv's last dimension is laid out (3, H, D): q | k | v, head-major, read in place with the tensor's batch
// and token strides (no transpose copy). One CTA = 64 queries of one (sequence, head), 4 warps x 16 query
// rows. Key/value tiles of 64 keys are double-buffered in shared memory with cp.async (XOR-swizzled rows);
// S = Q K^T and O += P V run on mma.sync.m16n8k16 with ldmatrix(.trans) operands, P stays in registers.
// Keys beyond the sequence length or with key_padding_mask == false get -inf; a query whose keys are all
// masked outputs zeros. Output: [.., H * D] laid out (H, D), contiguous.
//
// -DBSBERT_KERNELS_ONLY compiles the kernels alone (no torch, no host code) for tests/test_cuda_sass.py.
#include "cuda/mma_utils.cuh"

#ifndef BSBERT_KERNELS_ONLY
#include <ATen/core/Tensor.h>  // (not ATen/ATen.h: every op's header, parsed again per architecture)
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <algorithm>
#include <cmath>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/cuda_host_utils.h"
#include "check.h"
#endif

namespace bsbert {
namespace cuda {
namespace {

constexpr int kBr = 64;       // queries per CTA
constexpr int kBc = 64;       // keys per tile
constexpr int kWarps = 4;     // 16 query rows per warp
constexpr int kThreads = kWarps * 32;

template <typename T>
struct AttnParams {
  const T* qkv;
  T* out;
  const uint8_t* mask;        // [B, S] bool (true = attend) or nullptr
  const int* cu_seqlens;      // [B + 1] or nullptr (padded form)
  int64_t qkv_batch_stride;   // elements (0 for varlen)
  int64_t qkv_token_stride;   // elements
  int64_t out_batch_stride;
  int64_t out_token_stride;
  int64_t mask_batch_stride;
  int64_t mask_token_stride;
  int seqlen;                 // padded form: S
  int total_tokens;           // varlen form: T (sequence bounds from cu_seqlens are clamped to [0, T])
  int num_heads;
  float scale_log2;           // scale * kLog2e: the softmax runs in base 2 (exp2f)
};

// log2(e): the kernel takes the scale in base-2 units; the host check must compute the same product.
constexpr double kLog2e = 1.4426950408889634;

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) pruned_attention_fwd_kernel(const AttnParams<T> p) {
  static_assert(D == 32 || D == 64, "head_dim must be 32 or 64");
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int KD = D / 16;      // k16 steps over the head dim
  constexpr int NS = kBc / 8;     // n8 tiles of S per warp
  constexpr int ND = D / 8;       // n8 tiles of O per warp
  using Swz = Swizzle<D>;
  using Ty = MmaType<T>;

  __shared__ __align__(128) T sQ[kBr * D];
  __shared__ __align__(128) T sK[2][kBc * D];
  __shared__ __align__(128) T sV[2][kBc * D];
  __shared__ float sBias[2][kBc];  // 0 (attend) or -inf (masked / beyond the sequence)

  const int b = blockIdx.z, h = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int start = 0, L = p.seqlen;
  if (p.cu_seqlens != nullptr) {
    // cu_seqlens' values are not checked on the host (a sync per call); clamped, a bad one cannot make
    // this CTA read or write outside qkv and out
    const int s0 = min(max(p.cu_seqlens[b], 0), p.total_tokens);
    const int s1 = min(max(p.cu_seqlens[b + 1], s0), p.total_tokens);
    start = s0;
    L = s1 - s0;
  }
  const T* base = p.qkv + b * p.qkv_batch_stride + static_cast<int64_t>(start) * p.qkv_token_stride;
  const T* qg = base + h * D;
  const T* kg = base + (p.num_heads + h) * D;
  const T* vg = base + (2 * p.num_heads + h) * D;
  T* og = p.out + b * p.out_batch_stride + static_cast<int64_t>(start) * p.out_token_stride + h * D;
  const uint8_t* mg = p.mask ? p.mask + b * p.mask_batch_stride : nullptr;
  const int n_tiles = (L + kBc - 1) / kBc;

  auto load_rows = [&](T* dst, const T* src, int row0) {
#pragma unroll
    for (int c = tid; c < kBc * kChunks; c += kThreads) {
      const int r = c / kChunks, ch = c % kChunks;
      const bool ok = row0 + r < L;
      const T* s = ok ? src + static_cast<int64_t>(row0 + r) * p.qkv_token_stride + ch * 8 : src;
      cp_async_16(smem_u32(dst + Swz::chunk_offset(r, ch)), s, ok);
    }
  };
  auto load_kv = [&](int buf, int tile) {
    const int k0 = tile * kBc;
    load_rows(sK[buf], kg, k0);
    load_rows(sV[buf], vg, k0);
    if (tid < kBc) {
      const int key = k0 + tid;
      bool ok = key < L;
      if (ok && mg != nullptr) ok = mg[key * p.mask_token_stride] != 0;
      sBias[buf][tid] = ok ? 0.f : -INFINITY;
    }
  };

  // A CTA normally handles one query tile; the loop keeps the result correct if max_seqlen was too small.
  for (int q0 = blockIdx.x * kBr; q0 < L; q0 += gridDim.x * kBr) {
    load_rows(sQ, qg, q0);
    load_kv(0, 0);
    cp_async_commit();

    float o[ND][4];
#pragma unroll
    for (int j = 0; j < ND; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[j][e] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    uint32_t qa[KD][4];

    for (int t = 0; t < n_tiles; ++t) {
      const int buf = t & 1;
      if (t + 1 < n_tiles) {
        load_kv(buf ^ 1, t + 1);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      if (t == 0) {
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
          const int r = warp * 16 + (lane & 15);
          ldmatrix_x4(qa[kk], smem_u32(sQ + Swz::chunk_offset(r, kk * 2 + (lane >> 4))));
        }
      }
      // ---- S = Q K^T (16 x 64 per warp) ----
      float s[NS][4];
#pragma unroll
      for (int j = 0; j < NS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
        for (int j = 0; j < NS / 2; ++j) {
          const int r = j * 16 + (lane & 7) + ((lane >> 4) << 3);
          uint32_t kb[4];
          ldmatrix_x4(kb, smem_u32(sK[buf] + Swz::chunk_offset(r, kk * 2 + ((lane >> 3) & 1))));
          mma_16816<T>(s[2 * j], qa[kk], kb);
          mma_16816<T>(s[2 * j + 1], qa[kk], kb + 2);
        }
      }
      // ---- scale, mask, online softmax (rows lane/4 and lane/4 + 8 of the warp's 16) ----
      float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        const int c = j * 8 + (lane & 3) * 2;
        const float b0 = sBias[buf][c], b1 = sBias[buf][c + 1];
        s[j][0] = s[j][0] * p.scale_log2 + b0;
        s[j][1] = s[j][1] * p.scale_log2 + b1;
        s[j][2] = s[j][2] * p.scale_log2 + b0;
        s[j][3] = s[j][3] * p.scale_log2 + b1;
        mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      }
      float alpha[2], mu[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mu[i] = mx[i] == -INFINITY ? 0.f : mx[i];  // all keys so far masked: keep p = 0, no NaN
        alpha[i] = exp2f(m_run[i] - mu[i]);         // m_run = -inf -> 0
        m_run[i] = mx[i];
        l_run[i] *= alpha[i];
      }
#pragma unroll
      for (int j = 0; j < ND; ++j) {
        o[j][0] *= alpha[0];
        o[j][1] *= alpha[0];
        o[j][2] *= alpha[1];
        o[j][3] *= alpha[1];
      }
      uint32_t pa[kBc / 16][4];
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        const float p0 = exp2f(s[j][0] - mu[0]), p1 = exp2f(s[j][1] - mu[0]);
        const float p2 = exp2f(s[j][2] - mu[1]), p3 = exp2f(s[j][3] - mu[1]);
        l_run[0] += p0 + p1;
        l_run[1] += p2 + p3;
        pa[j / 2][(j & 1) * 2 + 0] = Ty::pack(p0, p1);
        pa[j / 2][(j & 1) * 2 + 1] = Ty::pack(p2, p3);
      }
      // ---- O += P V ----
#pragma unroll
      for (int kt = 0; kt < kBc / 16; ++kt) {
#pragma unroll
        for (int d2 = 0; d2 < ND / 2; ++d2) {
          const int r = kt * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, smem_u32(sV[buf] + Swz::chunk_offset(r, d2 * 2 + (lane >> 4))));
          mma_16816<T>(o[2 * d2], pa[kt], vb);
          mma_16816<T>(o[2 * d2 + 1], pa[kt], vb + 2);
        }
      }
      __syncthreads();  // buffer `buf` (and sQ) may be overwritten from here on
    }

    // ---- normalise and store ----
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
      l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
      l_run[i] = l_run[i] > 0.f ? 1.f / l_run[i] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = q0 + warp * 16 + (lane >> 2) + i * 8;
      if (row >= L) continue;
      T* dst = og + static_cast<int64_t>(row) * p.out_token_stride + (lane & 3) * 2;
#pragma unroll
      for (int j = 0; j < ND; ++j) {
        *reinterpret_cast<uint32_t*>(dst + j * 8) = Ty::pack(o[j][2 * i] * l_run[i], o[j][2 * i + 1] * l_run[i]);
      }
    }
  }
}

#ifdef BSBERT_KERNELS_ONLY
}  // namespace
// Instantiates every attention kernel (SASS/resource checks); never called.
void* const pruned_attention_kernels_for_sass[] = {
    (void*)&pruned_attention_fwd_kernel<__half, 32>, (void*)&pruned_attention_fwd_kernel<__half, 64>,
    (void*)&pruned_attention_fwd_kernel<__nv_bfloat16, 32>, (void*)&pruned_attention_fwd_kernel<__nv_bfloat16, 64>};
namespace {
#else
// The grid's z axis (sequences) holds at most 65535 blocks: a larger batch is launched in slices, each with
// its pointers moved to its first sequence (padded form: qkv, out and mask by their batch strides; varlen:
// cu_seqlens, whose token offsets stay absolute). One launch for every batch up to 65535.
constexpr int64_t kMaxGridZ = 65535;

template <typename T>
void launch_attention(const AttnParams<T>& p, int head_dim, int grid_x, int heads, int64_t batch) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxGridZ) {
    AttnParams<T> slice = p;
    slice.qkv += b0 * p.qkv_batch_stride;
    slice.out += b0 * p.out_batch_stride;
    if (slice.mask != nullptr) slice.mask += b0 * p.mask_batch_stride;
    if (slice.cu_seqlens != nullptr) slice.cu_seqlens += b0;
    const dim3 grid(grid_x, heads, static_cast<unsigned>(std::min(kMaxGridZ, batch - b0)));
    if (head_dim == 64) {
      pruned_attention_fwd_kernel<T, 64><<<grid, kThreads, 0, stream>>>(slice);
    } else {
      pruned_attention_fwd_kernel<T, 32><<<grid, kThreads, 0, stream>>>(slice);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void check_common(const char* op, const at::Tensor& qkv, int64_t num_heads, int64_t head_dim, int64_t want_dim,
                  double scale) {
  // as the CPU op; the kernel takes scale x log2(e) as a float, so that must be finite too (an infinite one
  // made every output NaN)
  BSBERT_CHECK(std::isfinite(scale), op, " (CUDA): scale must be finite, got ", scale);
  BSBERT_CHECK(std::isfinite(static_cast<float>(scale * kLog2e)), op, " (CUDA): scale ", scale,
              " is too large: scale x log2(e) overflows fp32");
  BSBERT_CHECK(qkv.is_cuda(), op, " (CUDA): qkv must be a CUDA tensor, got device ", qkv.device());
  BSBERT_CHECK(qkv.scalar_type() == at::kHalf || qkv.scalar_type() == at::kBFloat16, op,
              " (CUDA): qkv dtype ", qkv.scalar_type(),
              " is not supported by the CUDA kernel (use float16 or bfloat16)");
  BSBERT_CHECK(head_dim == 32 || head_dim == 64, op, " (CUDA): head_dim must be 32 or 64, got ", head_dim);
  BSBERT_CHECK(num_heads > 0 && num_heads <= 65535, op, " (CUDA): num_heads must be in [1, 65535], got ",
              num_heads);
  BSBERT_CHECK(qkv.dim() == want_dim, op, " (CUDA): qkv must be ", want_dim, "-D, got shape ", qkv.sizes());
  BSBERT_CHECK(qkv.size(-1) == 3 * num_heads * head_dim, op, " (CUDA): qkv last dimension must be 3 * num_heads"
              " * head_dim = ", 3 * num_heads * head_dim, ", got ", qkv.size(-1));
}

// cp.async reads 16-byte chunks: rows must start 16-byte aligned and the last dim must be dense.
bool rows_aligned(const at::Tensor& t) {
  if (t.stride(-1) != 1 || !is_aligned16(t.data_ptr())) return false;
  for (int d = 0; d < t.dim() - 1; ++d)
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  return true;
}

template <typename T>
AttnParams<T> make_params(const at::Tensor& qkv, at::Tensor& out, int64_t num_heads, double scale) {
  AttnParams<T> p{};
  p.qkv = reinterpret_cast<const T*>(qkv.data_ptr());
  p.out = reinterpret_cast<T*>(out.data_ptr());
  p.num_heads = static_cast<int>(num_heads);
  p.scale_log2 = static_cast<float>(scale * kLog2e);
  return p;
}

// Builds the params for qkv's dtype, lets the caller fill the layout-specific fields, launches.
template <typename Fill>
void launch_for_dtype(const at::Tensor& qkv, at::Tensor& out, int64_t num_heads, int64_t head_dim, double scale,
                      int grid_x, int64_t batch, Fill&& fill) {
  if (qkv.scalar_type() == at::kHalf) {
    auto p = make_params<__half>(qkv, out, num_heads, scale);
    fill(p);
    launch_attention(p, static_cast<int>(head_dim), grid_x, static_cast<int>(num_heads), batch);
  } else {
    auto p = make_params<__nv_bfloat16>(qkv, out, num_heads, scale);
    fill(p);
    launch_attention(p, static_cast<int>(head_dim), grid_x, static_cast<int>(num_heads), batch);
  }
}

at::Tensor pruned_attention_cuda(const at::Tensor& qkv_in, const std::optional<at::Tensor>& key_padding_mask,
                                 int64_t num_heads, int64_t head_dim, double scale) {
  check_common("pruned_attention", qkv_in, num_heads, head_dim, 3, scale);
  const int64_t B = qkv_in.size(0), S = qkv_in.size(1);
  BSBERT_CHECK(S < (int64_t{1} << 31), "pruned_attention (CUDA): sequence too long");
  c10::cuda::CUDAGuard guard(qkv_in.device());
  // (clone, not contiguous(): a contiguous qkv that starts off a 16-byte boundary would come back as is)
  at::Tensor qkv = rows_aligned(qkv_in) ? qkv_in : qkv_in.clone(at::MemoryFormat::Contiguous);
  at::Tensor mask;
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    mask = *key_padding_mask;
    BSBERT_CHECK(mask.device() == qkv.device(), "pruned_attention (CUDA): key_padding_mask must be on ",
                qkv.device(), ", got ", mask.device());
    BSBERT_CHECK(mask.scalar_type() == at::kBool, "pruned_attention (CUDA): key_padding_mask must be bool "
                "(true = attend), got ", mask.scalar_type());
    BSBERT_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == S, "pruned_attention (CUDA): "
                "key_padding_mask must have shape [", B, ", ", S, "], got ", mask.sizes());
  }
  at::Tensor out = at::empty({B, S, num_heads * head_dim}, qkv.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || S == 0) return out;
  auto fill = [&](auto& p) {
    p.qkv_batch_stride = qkv.stride(0);
    p.qkv_token_stride = qkv.stride(1);
    p.out_batch_stride = out.stride(0);
    p.out_token_stride = out.stride(1);
    if (mask.defined()) {
      p.mask = reinterpret_cast<const uint8_t*>(mask.data_ptr());
      p.mask_batch_stride = mask.stride(0);
      p.mask_token_stride = mask.stride(1);
    }
    p.seqlen = static_cast<int>(S);
  };
  const int grid_x = static_cast<int>(std::min<int64_t>((S + kBr - 1) / kBr, 65535));
  launch_for_dtype(qkv, out, num_heads, head_dim, scale, grid_x, B, fill);
  return out;
}

at::Tensor pruned_attention_varlen_cuda(const at::Tensor& qkv_in, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                        int64_t num_heads, int64_t head_dim, double scale) {
  check_common("pruned_attention_varlen", qkv_in, num_heads, head_dim, 2, scale);
  BSBERT_CHECK(cu_seqlens.device() == qkv_in.device(), "pruned_attention_varlen (CUDA): cu_seqlens must be on ",
              qkv_in.device(), ", got ", cu_seqlens.device());
  BSBERT_CHECK(cu_seqlens.scalar_type() == at::kInt, "pruned_attention_varlen (CUDA): cu_seqlens must be int32, "
              "got ", cu_seqlens.scalar_type());
  BSBERT_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, "pruned_attention_varlen (CUDA): cu_seqlens "
              "must be 1-D [batch + 1], got shape ", cu_seqlens.sizes());
  BSBERT_CHECK(cu_seqlens.is_contiguous(), "pruned_attention_varlen (CUDA): cu_seqlens must be contiguous");
  BSBERT_CHECK(max_seqlen >= 0 && max_seqlen < (int64_t{1} << 31), "pruned_attention_varlen (CUDA): "
              "max_seqlen must be in [0, 2^31), got ", max_seqlen);
  const int64_t B = cu_seqlens.numel() - 1, T = qkv_in.size(0);
  BSBERT_CHECK(T < (int64_t{1} << 31), "pruned_attention_varlen (CUDA): too many tokens (", T, ")");
  c10::cuda::CUDAGuard guard(qkv_in.device());
  // (clone, not contiguous(): a contiguous qkv that starts off a 16-byte boundary would come back as is)
  at::Tensor qkv = rows_aligned(qkv_in) ? qkv_in : qkv_in.clone(at::MemoryFormat::Contiguous);
  // Every token belongs to a sequence when cu_seqlens[B] == T (the documented contract); zeros make the
  // result deterministic for tokens outside all sequences should a caller break it.
  at::Tensor out = at::zeros({T, num_heads * head_dim}, qkv.options().memory_format(at::MemoryFormat::Contiguous));
  // (max_seqlen only sizes the grid: a CTA loops over the query tiles of a longer sequence, so even 0 works)
  if (B == 0 || T == 0) return out;
  auto fill = [&](auto& p) {
    p.qkv_batch_stride = 0;
    p.qkv_token_stride = qkv.stride(0);
    p.out_batch_stride = 0;
    p.out_token_stride = out.stride(0);
    p.cu_seqlens = cu_seqlens.data_ptr<int>();
    p.seqlen = 0;
    p.total_tokens = static_cast<int>(T);
  };
  const int grid_x = static_cast<int>(std::clamp<int64_t>((max_seqlen + kBr - 1) / kBr, 1, 65535));
  launch_for_dtype(qkv, out, num_heads, head_dim, scale, grid_x, B, fill);
  return out;
}
#endif  // BSBERT_KERNELS_ONLY

}  // namespace

#ifndef BSBERT_KERNELS_ONLY
// Empty if this build's attention kernel can run on CUDA device `device`, else why not.
std::string attention_image_problem(int64_t device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return kernel_image_problem(reinterpret_cast<const void*>(&pruned_attention_fwd_kernel<__half, 64>));
}
#endif

}  // namespace cuda
}  // namespace bsbert

#ifndef BSBERT_KERNELS_ONLY
TORCH_LIBRARY_IMPL(bsbert, CUDA, m) {
  m.impl("pruned_attention", &bsbert::cuda::pruned_attention_cuda);
  m.impl("pruned_attention_varlen", &bsbert::cuda::pruned_attention_varlen_cuda);
}
#endif
