// AVX2 + FMA instantiation of the head-logits row kernel (head_logits_kernel.h): 8 floats per register.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/head_logits.h"
#include "cpu/isa_target.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

BSBERT_TARGET_PUSH("avx2,fma")

namespace bsbert {
namespace cpu {
namespace {

#include "cpu/simd_avx2.h"

#include "cpu/simd_rows_avx2.h"

#include "cpu/head_logits_kernel.h"

}  // namespace

void head_logits_rows_avx2(const HeadLogitsArgs& a, int64_t m0, int64_t m1) {
  head_logits_rows_dispatch<VRow256>(a, m0, m1);
}

}  // namespace cpu
}  // namespace bsbert

BSBERT_TARGET_POP()

#endif  // x86-64 (elsewhere the portable kernel is the only one: see head_logits.cpp)
