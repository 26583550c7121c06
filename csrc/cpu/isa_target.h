// Compile the code between BSBERT_TARGET_PUSH("isa,list") and BSBERT_TARGET_POP() for those ISA
// extensions (GCC target pragma; clang's attribute push does the same), so one translation unit per
// ISA holds the wide-vector code and the baseline build stays runnable on any x86-64. Code outside
// the pair, and everything the TU includes before it, is compiled for the baseline.
#pragma once

#define BSBERT_PRAGMA(x) _Pragma(#x)
#if defined(BSBERT_EMULATE_AVX512)
// The emulated AVX-512 test build (avx512_intrinsics.h): every region, AVX-512 ones included, is compiled
// for AVX2+FMA, so the AVX-512 code runs through SIMDe on a CPU without AVX-512 (GCC only).
#define BSBERT_TARGET_PUSH(isa)   \
  BSBERT_PRAGMA(GCC push_options) \
  BSBERT_PRAGMA(GCC target("avx2,fma"))
#define BSBERT_TARGET_POP() BSBERT_PRAGMA(GCC pop_options)
#elif defined(__clang__)
#define BSBERT_TARGET_PUSH(isa)             \
  BSBERT_PRAGMA(GCC push_options)           \
  BSBERT_PRAGMA(GCC target(isa))            \
  BSBERT_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define BSBERT_TARGET_POP()             \
  BSBERT_PRAGMA(clang attribute pop)    \
  BSBERT_PRAGMA(GCC pop_options)
#else
#define BSBERT_TARGET_PUSH(isa)   \
  BSBERT_PRAGMA(GCC push_options) \
  BSBERT_PRAGMA(GCC target(isa))
#define BSBERT_TARGET_POP() BSBERT_PRAGMA(GCC pop_options)
#endif
