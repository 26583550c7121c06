// AVX512-BF16 instantiation of the block-sparse GEMM for bf16 weights and activations: vdpbf16ps
// multiplies a pair of bf16 k values and adds both products into an fp32 accumulator, so one
// instruction does the work of two FMAs of the widening path (bsr_linear_avx512.cpp) and the bf16
// ceiling is twice the fp32 one. fp32 inputs never come here (they take the avx512 unit).
//
// Numerics: products of bf16 values are exact in fp32; vdpbf16ps rounds once per pair (to nearest even)
// and treats denormal inputs/outputs as zero, which is within bf16's own error. The result is rounded
// to bf16 once, in the epilogue (vcvtneps2bf16: nearest even, denormals to zero).
#include <cstdint>
#include <cstring>
#include "cpu/avx512_intrinsics.h"

#include "cpu/bsr_linear.h"
#include "cpu/isa_target.h"

#if defined(__x86_64__) || defined(_M_X64)
BSBERT_TARGET_PUSH("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace bsbert {
namespace cpu {
namespace {

#include "cpu/simd_avx512.h"

struct VAvx512Bf16 : VAvx512 {
  // Outputs rounded by vcvtneps2bf16 (round to nearest even, one instruction) instead of VAvx512's
  // integer sequence: the same bf16 for every normal value; denormal results become zero (as the dot
  // products already treat them) and NaNs stay NaNs with their sign. 0.5-1.8% faster GEMMs (hot,
  // single thread, M = 64 / 72, BERT shapes), in every cell measured.
  static BSB_AVX512_INLINE void store_bf16(uint16_t* p, reg v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
  }
  static BSB_AVX512_INLINE void store_bf16_n(uint16_t* p, reg v, int n) {
    _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), (__m256i)_mm512_cvtneps_pbh(v));
  }
  // the bf16 pair at p (a 32-bit word of a packed x panel) in all 16 lanes
  static BSB_AVX512_INLINE reg bcast_word(const float* p) { return _mm512_set1_ps(*p); }
  static BSB_AVX512_INLINE reg dot_bf16(reg acc, reg a, reg b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
};

#include "cpu/bsr_linear_kernel.h"

constexpr int kMr = 12;  // 12x32 register tile: 24 accumulators + 2 weight vectors + 1 broadcast

// Panel of MRP rows of bf16 x as 32-bit k-pairs: xp[cb][p][r] = (x[r, 2p], x[r, 2p+1]), zero beyond K.
// MRP = kMr for the tiles, M (<= kBsrGemvRows, one panel) for the GEMV kernel.
template <int MRP>
void pack_pairs(const BsrLinearArgs& a, int64_t p0, int64_t p1, float* xp) {
  const int64_t kpad_words = (a.K + a.block - 1) / a.block * a.block / 2;
  const int64_t full_words = a.K / 2;  // pairs with both elements inside K
  const uint16_t* x = static_cast<const uint16_t*>(a.xraw);
  for (int64_t p = p0; p < p1; ++p) {
    const void* src[MRP];
    int64_t m0;
    int rows;
    panel_rows(a, p, MRP, &m0, &rows);
    for (int r = 0; r < MRP; ++r) src[r] = r < rows ? static_cast<const void*>(x + (m0 + r) * a.ldx) : nullptr;
    float* dst = xp + p * kpad_words * MRP;
    pack_words_avx512<MRP>(src, full_words, kpad_words, dst);
    if (a.K % 2) {  // odd K: the last pair is (x[r, K-1], 0); reading a whole word would pass column K
      for (int r = 0; r < MRP; ++r) {
        const uint32_t lo = src[r] ? static_cast<const uint16_t*>(src[r])[a.K - 1] : 0;
        std::memcpy(dst + full_words * MRP + r, &lo, 4);
      }
    }
  }
}

}  // namespace

void bsr_tile_avx512bf16(const BsrLinearArgs& a, int64_t m0, int64_t m1, int64_t rb, float* c) {
  tile_dispatch<VAvx512Bf16, kMr, kMr, 2, kWDot>(a, m0, m1, rb, c);
}
void bsr_pack_avx512bf16(const BsrLinearArgs& a, int64_t p0, int64_t p1, float* xp) {
  pack_pairs<kMr>(a, p0, p1, xp);
}
// bf16 only (fp32 takes the avx512 unit): M <= kBsrGemvRows rows as one panel of k-pairs, then dot products.
void bsr_gemv_pack_avx512bf16(const BsrLinearArgs& a, float* xv) {
  static_assert(kBsrGemvRows == 3, "bsr_gemv_pack_avx512bf16: one case per row count");
  if (a.M == 1) return pack_pairs<1>(a, 0, 1, xv);
  if (a.M == 2) return pack_pairs<2>(a, 0, 1, xv);
  pack_pairs<3>(a, 0, 1, xv);
}
void bsr_gemv_avx512bf16(const BsrLinearArgs& a, int64_t rb, float* c) { gemv_dispatch<VAvx512Bf16, kWDot>(a, rb, c); }

}  // namespace cpu
}  // namespace bsbert

BSBERT_TARGET_POP()

namespace bsbert {
namespace cpu {
int bsr_mr_avx512bf16() { return kMr; }
}  // namespace cpu
}  // namespace bsbert

#else  // not x86-64: never selected (effective_isa() is portable there)
namespace bsbert {
namespace cpu {
void bsr_tile_avx512bf16(const BsrLinearArgs& a, int64_t m0, int64_t m1, int64_t rb, float* c) {
  bsr_tile_portable(a, m0, m1, rb, c);
}
void bsr_pack_avx512bf16(const BsrLinearArgs& a, int64_t p0, int64_t p1, float* xp) {
  bsr_pack_portable(a, p0, p1, xp);
}
int bsr_mr_avx512bf16() { return bsr_mr_portable(true); }
void bsr_gemv_pack_avx512bf16(const BsrLinearArgs& a, float* xv) { bsr_gemv_pack_portable(a, xv); }
void bsr_gemv_avx512bf16(const BsrLinearArgs& a, int64_t rb, float* c) { bsr_gemv_portable(a, rb, c); }
}  // namespace cpu
}  // namespace bsbert
#endif
