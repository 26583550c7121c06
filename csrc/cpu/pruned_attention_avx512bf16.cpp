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
#include "cpu/avx512_intrinsics.h"

#include "cpu/pruned_attention.h"
#include "cpu/isa_target.h"

namespace bsbert {
namespace cpu {

#if defined(__x86_64__) || defined(_M_X64)
BSBERT_TARGET_PUSH("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// GCC 12 reports the self-initialised _mm512_undefined_ps() inside its own intrinsics (max, reduce)
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace {

#include "cpu/pruned_attention_zmm.h"

struct ZmmBf16 : Zmm {
  // acc + a.even * b.even + a.odd * b.odd per lane (a, b: 16 bf16 pairs)
  static BSB_AVX512_INLINE reg dot_bf16(reg acc, reg a, reg b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
  // 2^x for x <= 0 with a relative error of 7.5e-5 (bf16 keeps 8 bits: 2^-9 = 2e-3): f = x - floor(x)
  // in [0, 1) by vreduceps, a degree-3 polynomial fitted to 2^f there (relative minimax), times
  // 2^floor(x) by vscalefps. Clamping at -160 makes -inf (masked) exactly 0: 2^-160 underflows.
  static BSB_AVX512_INLINE reg exp2_bf16(reg x) {
    x = _mm512_max_ps(_mm512_set1_ps(-160.f), x);  // (x second: a NaN stays NaN, see expv)
    const reg f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    reg p = _mm512_set1_ps(0.07802406698465347f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.22606675326824188f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6958342790603638f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999250769615173f));
    return _mm512_scalef_ps(p, x);
  }
  // Stores e0, e1 rounded to bf16 (nearest even) at p[0:16], p[16:32]; returns sum + the rounded
  // values (added in pairs by a dot product with ones).
  static BSB_AVX512_INLINE reg store_bf16_sum(uint16_t* p, reg e0, reg e1, reg sum) {
    const __m512bh h = _mm512_cvtne2ps_pbh(e1, e0);
    _mm512_storeu_si512(p, (__m512i)h);
    return _mm512_dpbf16_ps(sum, h, (__m512bh)_mm512_set1_epi32(0x3f803f80));  // bf16 1.0 pairs
  }
};

#include "cpu/pruned_attention_kernel.h"

using Kernel = AttnKernel<ZmmBf16, 12, 2, 6, 4, 12, 2, 12, 1, 2>;

}  // namespace

AttnPath attn_path_avx512bf16() { return Kernel::path(); }

BSBERT_TARGET_POP()

#else  // not x86-64: never selected (effective_isa() is portable there)
AttnPath attn_path_avx512bf16() { return attn_path_portable(); }
#endif

}  // namespace cpu
}  // namespace bsbert
