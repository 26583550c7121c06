// The CPU's instruction peak for the GEMMs' inner instruction: every thread of torch's pool runs
// independent register-only multiply-add chains (no loads, no stores) for a fixed time, all threads at
// once, and reports its own rate. Why: the FLOP bound of `bsbert bench` is oneDNN's measured dense rate;
// this says how far that rate, and bsbert's GEMM, are from what the core can issue at all (with every
// thread busy, i.e. at the clock the machine gives a fully loaded core).
//
// Kinds: "fp32" times vfmadd*ps (zmm with AVX-512, ymm with AVX2+FMA; 2 FLOPs per lane), "bf16" times
// vdpbf16ps zmm (avx512_bf16; two products and two adds per fp32 lane: 64 FLOPs per instruction, the
// GEMM's FLOP count for the same work). BSBERT_CPU_ISA caps the level as for the kernels.
//
// One translation unit: the zmm loops (one template) and the ymm loop, each in its target region (a few
// instructions each; the kernels' one-unit-per-ISA layout exists for their larger shared templates).
#include "check.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/isa.h"
#include "cpu/isa_target.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
// The emulated AVX-512 build has no zmm instruction to time (and its zmm "registers" are SIMDe arrays).
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(BSBERT_EMULATE_AVX512)
#define BSB_PEAK_ZMM 1
#endif

namespace bsbert {
namespace cpu {
namespace {

// Independent accumulators per loop: enough to cover the multiply-add latency at two instructions a
// cycle (24 of the 32 zmm registers; 12 of AVX2's 16), leaving registers for the operands.
constexpr int kZmmChains = 24;
constexpr int kYmmChains = 12;
constexpr int64_t kBatch = 1 << 16;  // instructions per chain between clock reads (~0.4 ms at 4 GHz)
volatile float g_sink = 0.f;

#if defined(BSB_PEAK_ZMM)
// The empty asm makes an operand opaque each step, so the compiler can neither fold the chains nor move
// the loop out; the final sum keeps the accumulators live. tests/test_isa_peak.py reads the compiled loops
// back. Both zmm loops are one body in the avx512_bf16 region: the FMA one contains no bf16 instruction
// (the objdump test checks its loop is vfmadd only) and also runs on AVX-512 CPUs without bf16.
BSBERT_TARGET_PUSH("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's own _mm512_reduce_add_ps (as in the kernels)
struct DotBf16 {  // acc + a.even * b.even + a.odd * b.odd per lane (16 bf16 pairs)
  static __attribute__((always_inline)) inline __m512 step(__m512 acc, __m512 a, __m512 b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
};
struct FmaF32 {
  static __attribute__((always_inline)) inline __m512 step(__m512 acc, __m512 a, __m512 b) {
    return _mm512_fmadd_ps(acc, a, b);
  }
};

template <class Op>
__attribute__((always_inline)) inline float zmm_batch(int64_t steps, __m512 a, __m512 b) {
  __m512 acc[kZmmChains];
  for (int i = 0; i < kZmmChains; ++i) acc[i] = _mm512_set1_ps(0.f);
  for (int64_t s = 0; s < steps; ++s) {
#pragma GCC unroll 24
    for (int i = 0; i < kZmmChains; ++i) acc[i] = Op::step(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));
  }
  __m512 t = acc[0];
  for (int i = 1; i < kZmmChains; ++i) t = _mm512_add_ps(t, acc[i]);
  return _mm512_reduce_add_ps(t);
}

float dot_bf16_batch(int64_t steps) {  // 16 pairs of bf16 (1, 1) and (2^-7, 2^-7)
  return zmm_batch<DotBf16>(steps, _mm512_castsi512_ps(_mm512_set1_epi32(0x3f803f80)),
                            _mm512_castsi512_ps(_mm512_set1_epi32(0x3c003c00)));
}
float fma_zmm_batch(int64_t steps) {
  return zmm_batch<FmaF32>(steps, _mm512_set1_ps(0.999f), _mm512_set1_ps(1e-3f));
}
BSBERT_TARGET_POP()
#endif

#if defined(__x86_64__) || defined(_M_X64)
BSBERT_TARGET_PUSH("avx2,fma")
float fma_ymm_batch(int64_t steps) {
  __m256 acc[kYmmChains];
  for (int i = 0; i < kYmmChains; ++i) acc[i] = _mm256_set1_ps(0.f);
  __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-3f);
  for (int64_t s = 0; s < steps; ++s) {
#pragma GCC unroll 12
    for (int i = 0; i < kYmmChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
    __asm__ volatile("" : "+x"(a));
  }
  __m256 t = acc[0];
  for (int i = 1; i < kYmmChains; ++i) t = _mm256_add_ps(t, acc[i]);
  alignas(32) float v[8];
  _mm256_store_ps(v, t);
  return v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7];
}
BSBERT_TARGET_POP()
#endif

struct Loop {
  float (*batch)(int64_t steps);
  int chains;
  double flops_per_instruction;
  const char* instruction;
};

Loop select_loop(const std::string& kind) {
  BSBERT_CHECK(kind == "fp32" || kind == "bf16", "cpu_peak_gflops: kind must be 'fp32' or 'bf16', got '", kind,
               "'");
  const Isa isa = effective_isa();
  BSBERT_CHECK(!isa_emulated() || isa < Isa::kAvx512, "cpu_peak_gflops: this is the emulated AVX-512 test build ",
               "(BSBERT_EMULATE_AVX512): its AVX-512 level has no native instruction rate to measure");
#if defined(BSB_PEAK_ZMM)
  if (kind == "bf16") {
    BSBERT_CHECK(isa == Isa::kAvx512Bf16, "cpu_peak_gflops: 'bf16' times vdpbf16ps, which needs avx512_bf16; ",
                 "this CPU's level (after BSBERT_CPU_ISA) is ", best_isa_name());
    return {&dot_bf16_batch, kZmmChains, 64.0, "vdpbf16ps zmm"};
  }
  if (isa == Isa::kAvx512Bf16 || isa == Isa::kAvx512) return {&fma_zmm_batch, kZmmChains, 32.0, "vfmadd*ps zmm"};
#endif
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == Isa::kAvx2) return {&fma_ymm_batch, kYmmChains, 16.0, "vfmadd*ps ymm"};
#endif
  BSBERT_CHECK(false, "cpu_peak_gflops: no SIMD multiply-add to time at this CPU level (", best_isa_name(),
               "); the probe needs AVX2+FMA or AVX-512");
  return {};
}

}  // namespace

// Per-thread GFLOP/s of the kind's instruction, all of torch's threads running at once for `seconds`.
std::vector<double> cpu_peak_gflops(const std::string& kind, double seconds) {
  BSBERT_CHECK(seconds > 0 && seconds <= 60, "cpu_peak_gflops: seconds must be in (0, 60], got ",
               std::to_string(seconds));
  const Loop loop = select_loop(kind);
  const int64_t n = std::max<int64_t>(1, at::get_num_threads());
  std::vector<double> rate(n, 0.0);
  std::vector<float> sink(n, 0.f);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      using clock = std::chrono::steady_clock;
      sink[t] += loop.batch(kBatch / 8);  // warm-up: wakes the vector units and the clock up
      const auto t0 = clock::now();
      int64_t steps = 0;
      double elapsed = 0;
      do {
        sink[t] += loop.batch(kBatch);
        steps += kBatch;
        elapsed = std::chrono::duration<double>(clock::now() - t0).count();
      } while (elapsed < seconds);
      rate[t] = static_cast<double>(steps) * loop.chains * loop.flops_per_instruction / elapsed / 1e9;
    }
  });
  for (float s : sink) g_sink = g_sink + s;  // the sums are observed: the loops are not dead code
  return rate;
}

// The instruction cpu_peak_gflops(kind, ...) times here, e.g. "vdpbf16ps zmm".
std::string cpu_peak_instruction(const std::string& kind) { return select_loop(kind).instruction; }

}  // namespace cpu
}  // namespace bsbert
