// AVX-512 instantiation of the add + LayerNorm row kernel (add_layer_norm_kernel.h): 16 floats per
// register, row tails through lane masks. Needs avx512f/bw/vl (Isa::kAvx512 or better).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/add_layer_norm.h"
#include "cpu/isa_target.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

BSBERT_TARGET_PUSH("avx512f,avx512bw,avx512vl,avx2,fma")
// GCC 12 warns about its own intrinsics (_mm512_undefined_* inside cvtepu16_epi32 and friends).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace bsbert {
namespace cpu {
namespace {

#include "cpu/simd_avx512.h"

// The shared AVX-512 wrapper plus the masked row tails and bf16 loads the row kernel needs.
struct VAln512 : VAvx512 {
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

#include "cpu/add_layer_norm_kernel.h"

}  // namespace

void add_layer_norm_rows_avx512(const AddLayerNormArgs& a, int64_t r0, int64_t r1, float* h) {
  add_layer_norm_rows_dispatch<VAln512>(a, r0, r1, h);
}

}  // namespace cpu
}  // namespace bsbert

BSBERT_TARGET_POP()

#endif  // x86-64 (elsewhere the portable kernel is the only one: see add_layer_norm.cpp)
