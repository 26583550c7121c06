// The AVX2 row-kernel wrapper: VAvx2 (simd_avx2.h) plus row tails and bf16 loads, for the kernels that
// walk whole rows (add_layer_norm_kernel.h, head_logits_kernel.h). fp32 tails use masked loads/stores;
// bf16 tails go through an 8-lane stack buffer (AVX2 has no 16-bit masked moves).
//
// Include it *inside an anonymous namespace*, after simd_avx2.h and `BSBERT_TARGET_PUSH("avx2,fma")`.

struct VRow256 : VAvx2 {
  static inline __m256i lanes(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline reg load_n(const float* p, int n) { return _mm256_maskload_ps(p, lanes(n)); }
  static inline void store_n(float* p, reg v, int n) { _mm256_maskstore_ps(p, lanes(n), v); }
  static inline reg keep_n(reg v, int n) { return _mm256_and_ps(v, _mm256_castsi256_ps(lanes(n))); }
  static inline reg load_bf16(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline reg load_bf16_n(const uint16_t* p, int n) {
    uint16_t buf[W] = {};
    std::memcpy(buf, p, sizeof(uint16_t) * n);
    return load_bf16(buf);
  }
  static inline void store_bf16_n(uint16_t* p, reg v, int n) {
    uint16_t buf[W];
    store_bf16(buf, v);
    std::memcpy(p, buf, sizeof(uint16_t) * n);
  }
};
