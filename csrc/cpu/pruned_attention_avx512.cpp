// AVX-512 instantiation of the CPU attention kernel (pruned_attention_kernel.h): 16-wide __m512.
// Score tile 12 x 32 keys (24 accumulators + 2 K^T vectors + 1 broadcast of the 32 zmm); P V tiles
// 6 rows x 64 columns, 12 x 32, 12 x 16. Needs avx512f (Isa::kAvx512 or better).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <cstdint>
#include <immintrin.h>

#include "cpu/pruned_attention.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))), apply_to = function)
#endif

namespace bsbert {
namespace cpu {
namespace {

struct Zmm {
  using reg = __m512;
  static constexpr int W = 16;
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static inline reg set1(float f) { return _mm512_set1_ps(f); }
  static inline reg bcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static inline float hmax(reg a) { return _mm512_reduce_max_ps(a); }
  static inline float hsum(reg a) { return _mm512_reduce_add_ps(a); }
  static inline reg round(reg a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // 2^n for integral n in [-127, 127] through the exponent field (n = -127 gives +0).
  static inline reg pow2i(reg n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  // In-place 16 x 16 transpose: 4 x 4 blocks inside 128-bit lanes (unpack, shuffle), then the 4 x 4
  // arrangement of lanes (two rounds of shuffle_f32x4).
  static inline void transpose(reg (&r)[16]) {
    reg t[16], u[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4i + c], lane k: column 4k + c of rows 4i .. 4i + 3
    for (int i = 0; i < 4; ++i) {
      u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
      u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
      u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    for (int c = 0; c < 4; ++c) {
      const reg v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xee);
      const reg v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
      const reg v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xee);
      r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
      r[4 + c] = _mm512_shuffle_f32x4(v0, v2, 0xdd);
      r[8 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
      r[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xdd);
    }
  }
};

#include "cpu/pruned_attention_kernel.h"

using Kernel = AttnKernel<Zmm, 12, 2, 6, 4, 12, 2, 12, 1>;

}  // namespace

AttnPath attn_path_avx512() { return Kernel::path(); }

}  // namespace cpu
}  // namespace bsbert

#if defined(__clang__)
#pragma clang attribute pop
#endif
#pragma GCC pop_options

#else  // not x86-64: never selected (effective_isa() is portable there)
namespace bsbert {
namespace cpu {
AttnPath attn_path_avx512() { return attn_path_portable(); }
}  // namespace cpu
}  // namespace bsbert
#endif
