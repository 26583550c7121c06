// The 8-wide AVX2+FMA SIMD wrapper shared by the AVX2 translation units of the CPU kernels
// (bsr_linear_avx2.cpp, pruned_attention_avx2.cpp, add_layer_norm_avx2.cpp); each kernel extends it
// with what only it needs.
//
// Include it *inside an anonymous namespace*, after `#pragma GCC target("avx2,fma")` (like
// simd_avx512.h): each includer gets its own internal-linkage copy compiled for AVX2.

struct VAvx2 {
  using reg = __m256;
  static constexpr int W = 8;
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static inline reg bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static inline reg set1(float f) { return _mm256_set1_ps(f); }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static inline reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static inline reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static inline float hsum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline void load_pairs(const int32_t* p, reg& lo, reg& hi) {
    const __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(r, 16));
    hi = _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  // fp32 -> bf16, round to nearest even (add 0x7fff plus the kept lsb, drop 16 bits); NaNs stay quiet NaNs.
  static inline void store_bf16(uint16_t* p, reg v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    __m256i pk = _mm256_packus_epi32(r, r);        // [r0..3 r0..3 | r4..7 r4..7] (16-bit)
    pk = _mm256_permute4x64_epi64(pk, 0x08);       // qwords 0, 2 -> low 128 bits
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(pk));
  }
};
