#pragma once
#include <string>
#include <vector>

// Runtime ISA detection for the CPU kernels: the extension is compiled once (portable baseline) and
// picks AVX-512 / AVX2+FMA code paths at run time, so one wheel serves every x86-64 machine.
namespace bsbert {
namespace cpu {
enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
Isa best_isa();
const char* best_isa_name();
// BSBERT_CPU_ISA=portable|avx2|avx512|avx512_bf16 caps the level (for tests and comparisons).
Isa effective_isa();
// True in the emulated AVX-512 test build (setup.py BSBERT_EMULATE_AVX512=1, avx512_intrinsics.h): the
// AVX-512 levels run through SIMDe on any AVX2+FMA CPU, for correctness tests only.
bool isa_emulated();

// Instruction peak (isa_peak.cpp): per-thread GFLOP/s of register-only multiply-add chains, all of
// torch's threads at once for `seconds`; kind "fp32" (FMA) or "bf16" (vdpbf16ps). Throws on a CPU level
// without that instruction. cpu_peak_instruction names the instruction timed.
std::vector<double> cpu_peak_gflops(const std::string& kind, double seconds);
std::string cpu_peak_instruction(const std::string& kind);
}  // namespace cpu
}  // namespace bsbert
