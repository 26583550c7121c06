// AVX2 + FMA instantiation of the add + LayerNorm row kernel (add_layer_norm_kernel.h): 8 floats per
// register. fp32 tails use masked loads/stores; bf16 tails go through an 8-lane stack buffer
// (AVX2 has no 16-bit masked moves).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/add_layer_norm.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#endif

namespace bsbert {
namespace cpu {
namespace {

struct VAln256 {
  using reg = __m256;
  static constexpr int W = 8;
  static inline __m256i lanes(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg set1(float f) { return _mm256_set1_ps(f); }
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline float hsum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline reg load_n(const float* p, int n) { return _mm256_maskload_ps(p, lanes(n)); }
  static inline void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
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
  // Round to nearest even, NaN -> quiet NaN; the 32-bit results fit 16 bits, so the unsigned
  // saturating pack only moves them (it packs within 128-bit halves: hence the unpack).
  static inline void store_bf16(uint16_t* p, reg v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i t = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, odd), _mm256_set1_epi32(0x7fff)), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    t = _mm256_blendv_epi8(t, _mm256_set1_epi32(0x7fc0), nan);
    const __m256i packed = _mm256_packus_epi32(t, t);
    const __m128i out = _mm_unpacklo_epi64(_mm256_castsi256_si128(packed), _mm256_extracti128_si256(packed, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), out);
  }
  static inline void store_bf16_n(uint16_t* p, reg v, int n) {
    uint16_t buf[W];
    store_bf16(buf, v);
    std::memcpy(p, buf, sizeof(uint16_t) * n);
  }
};

#include "cpu/add_layer_norm_kernel.h"

}  // namespace

void add_layer_norm_rows_avx2(const AddLayerNormArgs& a, int64_t r0, int64_t r1, float* h) {
  add_layer_norm_rows_dispatch<VAln256>(a, r0, r1, h);
}

}  // namespace cpu
}  // namespace bsbert

#if defined(__clang__)
#pragma clang attribute pop
#endif
#pragma GCC pop_options

#endif  // x86-64 (elsewhere the portable kernel is the only one: see add_layer_norm.cpp)
