// AVX-512 pieces shared by the avx512 and avx512_bf16 translation units of the block-sparse GEMM:
// the 16-wide SIMD wrapper that bsr_linear_kernel.h is written against, and the activation packer.
//
// Include it *inside an anonymous namespace*, after `#pragma GCC target(...avx512f,avx512bw,avx512vl...)`
// (like bsr_linear_kernel.h): each includer gets its own internal-linkage copy compiled for its ISA.

#define BSB_AVX512_INLINE inline __attribute__((always_inline))

struct VAvx512 {
  using reg = __m512;
  static constexpr int W = 16;
  static BSB_AVX512_INLINE reg zero() { return _mm512_setzero_ps(); }
  static BSB_AVX512_INLINE reg load(const float* p) { return _mm512_loadu_ps(p); }
  static BSB_AVX512_INLINE void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static BSB_AVX512_INLINE reg bcast(const float* p) { return _mm512_set1_ps(*p); }
  static BSB_AVX512_INLINE reg set1(float f) { return _mm512_set1_ps(f); }
  static BSB_AVX512_INLINE reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static BSB_AVX512_INLINE reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static BSB_AVX512_INLINE reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static BSB_AVX512_INLINE reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static BSB_AVX512_INLINE reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static BSB_AVX512_INLINE reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static BSB_AVX512_INLINE reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static BSB_AVX512_INLINE float hsum(reg a) { return _mm512_reduce_add_ps(a); }
  static BSB_AVX512_INLINE void load_pairs(const int32_t* p, reg& lo, reg& hi) {
    const __m512i r = _mm512_loadu_si512(p);
    lo = _mm512_castsi512_ps(_mm512_slli_epi32(r, 16));
    hi = _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  // fp32 -> bf16, round to nearest even (add 0x7fff plus the kept lsb, drop 16 bits); NaNs stay quiet NaNs.
  static BSB_AVX512_INLINE __m256i narrow(reg v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
  }
  static BSB_AVX512_INLINE void store_bf16(uint16_t* p, reg v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(v));
  }
};

// In-register transpose of a 16x16 matrix of 32-bit elements: r[i] holds row i on entry, column i on
// exit. Four shuffle stages (pairs of rows, quads within 128-bit lanes, then 128-bit lanes twice).
BSB_AVX512_INLINE void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4g + j], 128-bit lane L: column 4L + j of rows 4g .. 4g+3
  __m512 u[16];
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0xee);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xee);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xdd);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xdd);
    r[0 + j] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[4 + j] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(v0, w0, 0xdd);
    r[12 + j] = _mm512_shuffle_f32x4(v1, w1, 0xdd);
  }
}

// Packs one micro-panel: dst[k][MRP] = word k of row r (src[r] = row start, nullptr = a zero row), for
// k in [0, kpad); words at or beyond kw are zero. Masked loads never touch memory past word kw of a row
// (so x is never read beyond column K), masked stores write exactly MRP words per k.
template <int MRP>
void pack_words_avx512(const void* const src[MRP], int64_t kw, int64_t kpad, float* dst) {
  static_assert(MRP <= 16, "a panel is at most 16 rows");
  const __mmask16 rows_mask = static_cast<__mmask16>((1u << MRP) - 1);
  for (int64_t k0 = 0; k0 < kpad; k0 += 16) {
    const int64_t valid = kw - k0 >= 16 ? 16 : (kw > k0 ? kw - k0 : 0);
    const __mmask16 kmask = static_cast<__mmask16>((1u << valid) - 1);
    __m512 r[16];
    for (int i = 0; i < 16; ++i) {
      if (i < MRP && src[i] != nullptr)
        r[i] = _mm512_maskz_loadu_ps(kmask, static_cast<const float*>(src[i]) + k0);
      else
        r[i] = _mm512_setzero_ps();
    }
    transpose16x16(r);
    const int64_t kn = kpad - k0 < 16 ? kpad - k0 : 16;
    for (int64_t k = 0; k < kn; ++k) _mm512_mask_storeu_ps(dst + (k0 + k) * MRP, rows_mask, r[k]);
  }
}
