// AVX-512 instantiation of the block-sparse GEMM (16-wide __m512): the same template as the AVX2 and
// portable paths (bsr_linear_kernel.h), only the wrapper differs. Needs avx512f/bw/vl (Isa::kAvx512 or
// better); bf16 weights are widened with integer shifts, so avx512_bf16 is not required.
#include <cstdint>
#include <immintrin.h>

#include "cpu/bsr_linear.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
// GCC 12 warns about its own intrinsics (_mm512_undefined_* inside set1/cvtepi32_epi16).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))), apply_to = function)
#endif

namespace bsbert {
namespace cpu {
namespace {

struct VAvx512 {
  using reg = __m512;
  static constexpr int W = 16;
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static inline reg bcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline reg set1(float f) { return _mm512_set1_ps(f); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static inline reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static inline reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static inline void load_pairs(const int32_t* p, reg& lo, reg& hi) {
    const __m512i r = _mm512_loadu_si512(p);
    lo = _mm512_castsi512_ps(_mm512_slli_epi32(r, 16));
    hi = _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  static inline void store_bf16(uint16_t* p, reg v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
};

#include "cpu/bsr_linear_kernel.h"

}  // namespace

// 12x32 fp32 register tile (24 accumulators + 2 + 1 of the 32 zmm); bf16: 8x32 (16 + 4 + 2).
void bsr_tile_avx512(const BsrLinearArgs& a, int64_t m0, int64_t m1, int64_t rb, float* c) {
  tile_dispatch<VAvx512, 12, 8, 2>(a, m0, m1, rb, c);
}
void bsr_pack_avx512(const BsrLinearArgs& a, int64_t p0, int64_t p1, float* xp) {
  pack_dispatch<12, 8>(a, p0, p1, xp);
}

}  // namespace cpu
}  // namespace bsbert

#if defined(__clang__)
#pragma clang attribute pop
#endif
#pragma GCC pop_options

namespace bsbert {
namespace cpu {
int bsr_mr_avx512(bool w_bf16) { return w_bf16 ? 8 : 12; }
}  // namespace cpu
}  // namespace bsbert

#else
namespace bsbert {
namespace cpu {
void bsr_tile_avx512(const BsrLinearArgs& a, int64_t m0, int64_t m1, int64_t rb, float* c) {
  bsr_tile_portable(a, m0, m1, rb, c);
}
int bsr_mr_avx512(bool w_bf16) { return bsr_mr_portable(w_bf16); }
void bsr_pack_avx512(const BsrLinearArgs& a, int64_t p0, int64_t p1, float* xp) {
  bsr_pack_portable(a, p0, p1, xp);
}
}  // namespace cpu
}  // namespace bsbert
#endif
