// AVX-512 instantiation of the head-logits row kernel (head_logits_kernel.h): 16 floats per register,
// row tails through lane masks. Needs avx512f/bw/vl (Isa::kAvx512 or better).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/head_logits.h"
#include "cpu/isa_target.h"

#if defined(__x86_64__) || defined(_M_X64)
#include "cpu/avx512_intrinsics.h"

BSBERT_TARGET_PUSH("avx512f,avx512bw,avx512vl,avx2,fma")
// GCC 12 warns about its own intrinsics (_mm512_undefined_* inside cvtepu16_epi32 and friends).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace bsbert {
namespace cpu {
namespace {

#include "cpu/simd_avx512.h"

#include "cpu/simd_rows_avx512.h"

#include "cpu/head_logits_kernel.h"

}  // namespace

void head_logits_rows_avx512(const HeadLogitsArgs& a, int64_t m0, int64_t m1) {
  head_logits_rows_dispatch<VRow512>(a, m0, m1);
}

}  // namespace cpu
}  // namespace bsbert

BSBERT_TARGET_POP()

#endif  // x86-64 (elsewhere the portable kernel is the only one: see head_logits.cpp)
