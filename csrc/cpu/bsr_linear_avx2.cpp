// AVX2 + FMA instantiation of the block-sparse GEMM (8-wide __m256). Everything after the target
// pragma is compiled for avx2/fma; only <immintrin.h>, <cstdint> and our plain header precede it, and
// all kernel code has internal linkage, so no AVX2 code can leak into the baseline paths.
#include <cstdint>
#include <immintrin.h>

#include "cpu/bsr_linear.h"
#include "cpu/isa_target.h"

#if defined(__x86_64__) || defined(_M_X64)
#define BSBERT_HAVE_AVX2_TU 1
BSBERT_TARGET_PUSH("avx2,fma")

namespace bsbert {
namespace cpu {
namespace {

#include "cpu/simd_avx2.h"

#include "cpu/bsr_linear_kernel.h"

}  // namespace

// 6x16 fp32 register tile (12 accumulators + 2 weight vectors + 1 broadcast of the 16 ymm);
// bf16 weights need lo/hi per vector: 4x16 (8 accumulators + 4 + 2).
void bsr_tile_avx2(const BsrLinearArgs& a, int64_t m0, int64_t m1, int64_t rb, float* c) {
  tile_dispatch<VAvx2, 6, 4, 2>(a, m0, m1, rb, c);
}
// fp32 x, full 6-row panels: 8 k at a time, 6 row vectors (+2 zero rows) transposed 8x8 in registers
// and stored as 8 runs of 6 floats. Tails (last rows, K % 8, block padding) and bf16 take the generic
// path.
void bsr_gemv_pack_avx2(const BsrLinearArgs& a, float* xv) { gemv_pack(a, xv); }
void bsr_gemv_avx2(const BsrLinearArgs& a, int64_t rb, float* c) { gemv_dispatch<VAvx2>(a, rb, c); }
void bsr_pack_avx2(const BsrLinearArgs& a, int64_t p0, int64_t p1, float* xp) {
  if (a.w_bf16) {
    pack_dispatch<6, 4>(a, p0, p1, xp);
    return;
  }
  constexpr int MRP = 6;
  const int b = a.block;
  const int64_t kpad = (a.K + b - 1) / b * b;
  const int64_t pstride = kpad * MRP;
  const int64_t k8 = a.K / 8 * 8;
  const __m256i mask6 = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
  for (int64_t p = p0; p < p1; ++p) {
    int64_t m0;
    int rows;
    panel_rows(a, p, MRP, &m0, &rows);
    if (rows < MRP) {
      pack_x_impl<MRP, false>(a, p, p + 1, xp);
      continue;
    }
    float* dst = xp + p * pstride;
    const float* src[MRP];
    for (int r = 0; r < MRP; ++r) src[r] = a.x + (m0 + r) * a.ldx;
    const __m256 z = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < k8; k0 += 8) {
      const __m256 r0 = _mm256_loadu_ps(src[0] + k0), r1 = _mm256_loadu_ps(src[1] + k0);
      const __m256 r2 = _mm256_loadu_ps(src[2] + k0), r3 = _mm256_loadu_ps(src[3] + k0);
      const __m256 r4 = _mm256_loadu_ps(src[4] + k0), r5 = _mm256_loadu_ps(src[5] + k0);
      const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
      const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
      const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
      const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
      const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
      const __m256 s4 = _mm256_shuffle_ps(t4, z, 0x44), s5 = _mm256_shuffle_ps(t4, z, 0xee);
      const __m256 s6 = _mm256_shuffle_ps(t5, z, 0x44), s7 = _mm256_shuffle_ps(t5, z, 0xee);
      float* d = dst + k0 * MRP;
      // column k = (r0[k] .. r5[k], 0, 0); each store spills 2 zeros into the next run, which the
      // next store overwrites; the last one is masked to stay inside the panel.
      _mm256_storeu_ps(d + 0 * MRP, _mm256_permute2f128_ps(s0, s4, 0x20));
      _mm256_storeu_ps(d + 1 * MRP, _mm256_permute2f128_ps(s1, s5, 0x20));
      _mm256_storeu_ps(d + 2 * MRP, _mm256_permute2f128_ps(s2, s6, 0x20));
      _mm256_storeu_ps(d + 3 * MRP, _mm256_permute2f128_ps(s3, s7, 0x20));
      _mm256_storeu_ps(d + 4 * MRP, _mm256_permute2f128_ps(s0, s4, 0x31));
      _mm256_storeu_ps(d + 5 * MRP, _mm256_permute2f128_ps(s1, s5, 0x31));
      _mm256_storeu_ps(d + 6 * MRP, _mm256_permute2f128_ps(s2, s6, 0x31));
      _mm256_maskstore_ps(d + 7 * MRP, mask6, _mm256_permute2f128_ps(s3, s7, 0x31));
    }
    for (int64_t k = k8; k < kpad; ++k)
      for (int r = 0; r < MRP; ++r) dst[k * MRP + r] = k < a.K ? src[r][k] : 0.f;
  }
}

}  // namespace cpu
}  // namespace bsbert

BSBERT_TARGET_POP()

namespace bsbert {
namespace cpu {
int bsr_mr_avx2(bool w_bf16) { return w_bf16 ? 4 : 6; }
}  // namespace cpu
}  // namespace bsbert

#else  // not x86-64: never selected (effective_isa() is portable there)
namespace bsbert {
namespace cpu {
void bsr_tile_avx2(const BsrLinearArgs& a, int64_t m0, int64_t m1, int64_t rb, float* c) {
  bsr_tile_portable(a, m0, m1, rb, c);
}
int bsr_mr_avx2(bool w_bf16) { return bsr_mr_portable(w_bf16); }
void bsr_gemv_pack_avx2(const BsrLinearArgs& a, float* xv) { bsr_gemv_pack_portable(a, xv); }
void bsr_gemv_avx2(const BsrLinearArgs& a, int64_t rb, float* c) { bsr_gemv_portable(a, rb, c); }
void bsr_pack_avx2(const BsrLinearArgs& a, int64_t p0, int64_t p1, float* xp) {
  bsr_pack_portable(a, p0, p1, xp);
}
}  // namespace cpu
}  // namespace bsbert
#endif
