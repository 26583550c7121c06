// AVX2 + FMA instantiation of the add + LayerNorm row kernel (add_layer_norm_kernel.h): 8 floats per
// register (the wrapper: simd_rows_avx2.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/add_layer_norm.h"
#include "cpu/isa_target.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

BSBERT_TARGET_PUSH("avx2,fma")

namespace bsbert {
namespace cpu {
namespace {

#include "cpu/simd_avx2.h"

#include "cpu/simd_rows_avx2.h"

#include "cpu/add_layer_norm_kernel.h"

}  // namespace

void add_layer_norm_rows_avx2(const AddLayerNormArgs& a, int64_t r0, int64_t r1, float* h) {
  add_layer_norm_rows_dispatch<VRow256>(a, r0, r1, h);
}

}  // namespace cpu
}  // namespace bsbert

BSBERT_TARGET_POP()

#endif  // x86-64 (elsewhere the portable kernel is the only one: see add_layer_norm.cpp)
