// Portable instantiation of the add + LayerNorm row kernel (add_layer_norm_kernel.h), on the 8-float
// wrapper of simd_rows_portable.h. Also the reference path for BSBERT_CPU_ISA=portable.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/add_layer_norm.h"

namespace bsbert {
namespace cpu {
namespace {

#include "cpu/simd_rows_portable.h"

#include "cpu/add_layer_norm_kernel.h"

}  // namespace

void add_layer_norm_rows_portable(const AddLayerNormArgs& a, int64_t r0, int64_t r1, float* h) {
  add_layer_norm_rows_dispatch<VRowPortable>(a, r0, r1, h);
}

}  // namespace cpu
}  // namespace bsbert
