// AVX-512 instantiation of the add + LayerNorm row kernel (add_layer_norm_kernel.h): 16 floats per
// register, row tails through lane masks. Needs avx512f/bw/vl (Isa::kAvx512 or better).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/add_layer_norm.h"
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

#include "cpu/add_layer_norm_kernel.h"

}  // namespace

void add_layer_norm_rows_avx512(const AddLayerNormArgs& a, int64_t r0, int64_t r1, float* h) {
  add_layer_norm_rows_dispatch<VRow512>(a, r0, r1, h);
}

}  // namespace cpu
}  // namespace bsbert

BSBERT_TARGET_POP()

#endif  // x86-64 (elsewhere the portable kernel is the only one: see add_layer_norm.cpp)
