// AVX-512 instantiation of the block-sparse GEMM (16-wide __m512): the same template as the AVX2 and
// portable paths (bsr_linear_kernel.h), only the wrapper differs. Needs avx512f/bw/vl (Isa::kAvx512 or
// better); bf16 weights are widened with integer shifts here, so avx512_bf16 is not required (CPUs that
// have it take bsr_linear_avx512bf16.cpp for bf16 instead).
#include <cstdint>
#include "cpu/avx512_intrinsics.h"

#include "cpu/bsr_linear.h"
#include "cpu/isa_target.h"

#if defined(__x86_64__) || defined(_M_X64)
BSBERT_TARGET_PUSH("avx512f,avx512bw,avx512vl,avx2,fma")
// GCC 12 warns about its own intrinsics (_mm512_undefined_* inside set1/cvtepi32_epi16).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace bsbert {
namespace cpu {
namespace {

#include "cpu/simd_avx512.h"
#include "cpu/bsr_linear_kernel.h"

}  // namespace

// 12x32 fp32 register tile (24 accumulators + 2 + 1 of the 32 zmm); bf16: 8x32 (16 + 4 + 2).
void bsr_tile_avx512(const BsrLinearArgs& a, int64_t m0, int64_t m1, int64_t rb, float* c) {
  tile_dispatch<VAvx512, 12, 8, 2>(a, m0, m1, rb, c);
}
// fp32 x: each 12-row panel is a register transpose of 16x16 word tiles (simd_avx512.h); bf16 x
// (widened while packing) takes the generic packer.
void bsr_gemv_pack_avx512(const BsrLinearArgs& a, float* xv) { gemv_pack(a, xv); }
void bsr_gemv_avx512(const BsrLinearArgs& a, int64_t rb, float* c) { gemv_dispatch<VAvx512>(a, rb, c); }
void bsr_pack_avx512(const BsrLinearArgs& a, int64_t p0, int64_t p1, float* xp) {
  if (a.w_bf16) {
    pack_dispatch<12, 8>(a, p0, p1, xp);
    return;
  }
  constexpr int MRP = 12;
  const int64_t kpad = (a.K + a.block - 1) / a.block * a.block;
  for (int64_t p = p0; p < p1; ++p) {
    const void* src[MRP];
    int64_t m0;
    int rows;
    panel_rows(a, p, MRP, &m0, &rows);
    for (int r = 0; r < MRP; ++r) src[r] = r < rows ? static_cast<const void*>(a.x + (m0 + r) * a.ldx) : nullptr;
    pack_words_avx512<MRP>(src, a.K, kpad, xp + p * kpad * MRP);
  }
}

}  // namespace cpu
}  // namespace bsbert

BSBERT_TARGET_POP()

namespace bsbert {
namespace cpu {
int bsr_mr_avx512(bool w_bf16) { return w_bf16 ? 8 : 12; }
}  // namespace cpu
}  // namespace bsbert

#else
namespace bsbert {
namespace cpu {
void bsr_tile_avx512(const BsrLinearArgs& a, int64_t m0, int64_t m1, int64_t rb, float* c) {
  bsr_tile_portable(a, m0, m1, rb, c);
}
int bsr_mr_avx512(bool w_bf16) { return bsr_mr_portable(w_bf16); }
void bsr_gemv_pack_avx512(const BsrLinearArgs& a, float* xv) { bsr_gemv_pack_portable(a, xv); }
void bsr_gemv_avx512(const BsrLinearArgs& a, int64_t rb, float* c) { bsr_gemv_portable(a, rb, c); }
void bsr_pack_avx512(const BsrLinearArgs& a, int64_t p0, int64_t p1, float* xp) {
  bsr_pack_portable(a, p0, p1, xp);
}
}  // namespace cpu
}  // namespace bsbert
#endif
