// AVX512-BF16 instantiation of the CPU attention kernel (pruned_attention_kernel.h, KP = 2) for bf16
// qkv: both products use vdpbf16ps, which adds the two products of a pair of bf16 values into each
// fp32 lane, so one instruction does the work of two FMAs of the widening path
// (pruned_attention_avx512.cpp, still used for fp32 and under BSBERT_CPU_ISA=avx512). Same tiles.
//
// Numerics: Q, K and V are the bf16 inputs themselves (no extra rounding); the products of bf16
// values are exact in fp32 and vdpbf16ps rounds once per pair (denormals flush to zero, far below
// bf16's own error). The softmax stays fp32 (scores, running max and sum, context); the only extra
// rounding is P (exp2 of the scores, in [0, 1]) to bf16 before P V, as flash-attention does on GPUs.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <cstdint>
#include <immintrin.h>

#include "cpu/pruned_attention.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"))), apply_to = function)
#endif

namespace bsbert {
namespace cpu {
namespace {

#include "cpu/pruned_attention_zmm.h"

struct ZmmBf16 : Zmm {
  // acc + a.even * b.even + a.odd * b.odd per lane (a, b: 16 bf16 pairs)
  static BSB_AVX512_INLINE reg dot_bf16(reg acc, reg a, reg b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
  // Stores v rounded to bf16 (nearest even) at p; returns the rounded values as fp32.
  static BSB_AVX512_INLINE reg store_bf16_rounded(uint16_t* p, reg v) {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
};

#include "cpu/pruned_attention_kernel.h"

using Kernel = AttnKernel<ZmmBf16, 12, 2, 6, 4, 12, 2, 12, 1, 2>;

}  // namespace

AttnPath attn_path_avx512bf16() { return Kernel::path(); }

}  // namespace cpu
}  // namespace bsbert

#if defined(__clang__)
#pragma clang attribute pop
#endif
#pragma GCC pop_options

#else  // not x86-64: never selected (effective_isa() is portable there)
namespace bsbert {
namespace cpu {
AttnPath attn_path_avx512bf16() { return attn_path_portable(); }
}  // namespace cpu
}  // namespace bsbert
#endif
