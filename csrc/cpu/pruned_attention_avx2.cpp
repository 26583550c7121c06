// AVX2+FMA instantiation of the CPU attention kernel (pruned_attention_kernel.h): 8-wide __m256 and
// 16 ymm registers, so smaller tiles: scores 6 x 16 keys (12 accumulators), P V 6 x 16 columns.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <cstdint>
#include <immintrin.h>

#include "cpu/pruned_attention.h"
#include "cpu/isa_target.h"

#if defined(__x86_64__) || defined(_M_X64)
BSBERT_TARGET_PUSH("avx2,fma")

namespace bsbert {
namespace cpu {
namespace {

#include "cpu/simd_avx2.h"

// The shared AVX2 wrapper plus what the softmax needs.
struct Ymm : VAvx2 {
  static inline __m128 fold(reg a, __m128 (*op)(__m128, __m128)) {
    __m128 x = op(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = op(x, _mm_movehl_ps(x, x));
    return op(x, _mm_shuffle_ps(x, x, 1));
  }
  static inline float hmax(reg a) {
    return _mm_cvtss_f32(fold(a, [](__m128 x, __m128 y) { return _mm_max_ps(x, y); }));
  }
  static inline reg round(reg a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // 2^n for integral n in [-127, 127] through the exponent field (n = -127 gives +0).
  static inline reg pow2i(reg n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  // In-place 8 x 8 transpose: 4 x 4 blocks inside 128-bit lanes (unpack, shuffle), then the lanes.
  static inline void transpose(reg (&r)[8]) {
    reg t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4i + c], lane k: column 4k + c of rows 4i .. 4i + 3
    for (int i = 0; i < 2; ++i) {
      u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
      u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
      u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    for (int c = 0; c < 4; ++c) {
      r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
      r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
  }
};

#include "cpu/pruned_attention_kernel.h"

using Kernel = AttnKernel<Ymm, 6, 2, 6, 2, 6, 2, 6, 1>;

}  // namespace

AttnPath attn_path_avx2() { return Kernel::path(); }

}  // namespace cpu
}  // namespace bsbert

BSBERT_TARGET_POP()

#else  // not x86-64: never selected (effective_isa() is portable there)
namespace bsbert {
namespace cpu {
AttnPath attn_path_avx2() { return attn_path_portable(); }
}  // namespace cpu
}  // namespace bsbert
#endif
