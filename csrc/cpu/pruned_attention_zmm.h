// The AVX-512 wrapper of the CPU attention kernel (pruned_attention_kernel.h), shared by the avx512
// and avx512_bf16 translation units. Include it inside an anonymous namespace, after
// `#pragma GCC target(...avx512f,avx512bw,avx512vl...)` (like simd_avx512.h, which it includes).

#include "cpu/simd_avx512.h"

// The GEMM's AVX-512 wrapper plus what the softmax needs.
struct Zmm : VAvx512 {
  static inline float hmax(reg a) { return _mm512_reduce_max_ps(a); }
  static inline reg round(reg a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // 2^n for integral n in [-127, 127] through the exponent field (n = -127 gives +0).
  static inline reg pow2i(reg n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static inline void transpose(reg (&r)[16]) { transpose16x16(r); }
};
