// Portable instantiation of the head-logits row kernel (head_logits_kernel.h), on the 8-float wrapper of
// simd_rows_portable.h. Also the reference path for BSBERT_CPU_ISA=portable.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/head_logits.h"

namespace bsbert {
namespace cpu {
namespace {

#include "cpu/simd_rows_portable.h"

#include "cpu/head_logits_kernel.h"

}  // namespace

void head_logits_rows_portable(const HeadLogitsArgs& a, int64_t m0, int64_t m1) {
  head_logits_rows_dispatch<VRowPortable>(a, m0, m1);
}

}  // namespace cpu
}  // namespace bsbert
