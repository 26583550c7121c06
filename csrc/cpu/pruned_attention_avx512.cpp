// AVX-512 instantiation of the CPU attention kernel (pruned_attention_kernel.h): 16-wide __m512.
// Score tile 12 x 32 keys (24 accumulators + 2 K^T vectors + 1 broadcast of the 32 zmm); P V tiles
// 6 rows x 64 columns, 12 x 32, 12 x 16. Needs avx512f (Isa::kAvx512 or better).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <cstdint>
#include "cpu/avx512_intrinsics.h"

#include "cpu/pruned_attention.h"
#include "cpu/isa_target.h"

#if defined(__x86_64__) || defined(_M_X64)
BSBERT_TARGET_PUSH("avx512f,avx512bw,avx512vl,avx2,fma")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// GCC 12 reports the self-initialised _mm512_undefined_ps() inside its own intrinsics (max, reduce)
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace bsbert {
namespace cpu {
namespace {

#include "cpu/pruned_attention_zmm.h"
#include "cpu/pruned_attention_kernel.h"

using Kernel = AttnKernel<Zmm, 12, 2, 6, 4, 12, 2, 12, 1>;

}  // namespace

AttnPath attn_path_avx512() { return Kernel::path(); }

}  // namespace cpu
}  // namespace bsbert

BSBERT_TARGET_POP()

#else  // not x86-64: never selected (effective_isa() is portable there)
namespace bsbert {
namespace cpu {
AttnPath attn_path_avx512() { return attn_path_portable(); }
}  // namespace cpu
}  // namespace bsbert
#endif
