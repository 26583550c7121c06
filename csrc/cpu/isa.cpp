#include "cpu/isa.h"

#include <cstdlib>
#include <cstring>

namespace bsbert {
namespace cpu {

bool isa_emulated() {
#if defined(BSBERT_EMULATE_AVX512)
  return true;
#else
  return false;
#endif
}

Isa best_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
#if defined(BSBERT_EMULATE_AVX512)
  // the emulated AVX-512 code is compiled for AVX2+FMA (isa_target.h)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx512Bf16;
  return Isa::kPortable;
#endif
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    if (__builtin_cpu_supports("avx512bf16")) return Isa::kAvx512Bf16;
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

Isa effective_isa() {
  Isa isa = best_isa();
  const char* cap = std::getenv("BSBERT_CPU_ISA");
  if (cap == nullptr) return isa;
  Isa want = isa;
  if (!std::strcmp(cap, "portable")) want = Isa::kPortable;
  else if (!std::strcmp(cap, "avx2")) want = Isa::kAvx2;
  else if (!std::strcmp(cap, "avx512")) want = Isa::kAvx512;
  else if (!std::strcmp(cap, "avx512_bf16")) want = Isa::kAvx512Bf16;
  return static_cast<int>(want) < static_cast<int>(isa) ? want : isa;
}

const char* best_isa_name() {
  switch (effective_isa()) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

}  // namespace cpu
}  // namespace bsbert
