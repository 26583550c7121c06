// The AVX-512 row-kernel wrapper: VAvx512 (simd_avx512.h) plus masked row tails and bf16 loads, for the
// kernels that walk whole rows (add_layer_norm_kernel.h, head_logits_kernel.h).
//
// Include it *inside an anonymous namespace*, after simd_avx512.h and
// `BSBERT_TARGET_PUSH("avx512f,avx512bw,avx512vl,...")`: each includer gets its own copy for its ISA.

struct VRow512 : VAvx512 {
  static inline __mmask16 lanes(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static inline reg load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
  static inline void store_n(float* p, reg v, int n) { _mm512_mask_storeu_ps(p, lanes(n), v); }
  static inline reg keep_n(reg v, int n) { return _mm512_maskz_mov_ps(lanes(n), v); }
  // bf16 -> fp32 is exact: the 16 bits become the high half of the float.
  static inline reg widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static inline reg load_bf16(const uint16_t* p) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline reg load_bf16_n(const uint16_t* p, int n) { return widen(_mm256_maskz_loadu_epi16(lanes(n), p)); }
  static inline void store_bf16_n(uint16_t* p, reg v, int n) { _mm256_mask_storeu_epi16(p, lanes(n), narrow(v)); }
};
