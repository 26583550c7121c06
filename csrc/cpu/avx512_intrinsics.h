// The intrinsics header of the AVX-512 translation units. A normal build includes <immintrin.h>.
//
// An emulated build (setup.py: BSBERT_EMULATE_AVX512=1, for tests only) runs the AVX-512 kernels on a CPU
// without AVX-512: SIMDe (header-only, Debian/Ubuntu package libsimde-dev) implements the _mm512_*
// intrinsics with portable code and maps the Intel names onto its own; the few it lacks (SIMDe 0.7.4)
// are emulated_avx512_extra.h. isa_target.h then compiles the AVX-512 regions for AVX2 only, so not one
// AVX-512 instruction is emitted, and isa.cpp reports avx512_bf16 on any AVX2+FMA CPU. Why: the CI
// machines have no AVX-512, and without this the AVX-512 kernels (the ones a Zen 4/5 or Xeon user runs)
// would only ever be compiled, never executed. Speed means nothing in such a build; correctness does.
#pragma once

#if defined(BSBERT_EMULATE_AVX512)
// SIMDe builds its 512-bit operations from native 256-bit ones when the compiler targets AVX2+FMA (setup.py
// compiles the emulated build with -mavx2 -mfma; a target pragma would not do: GCC's C++ front end does
// not update __AVX2__ for it): then _mm512_fmadd_ps is two real FMAs, one rounding as on the hardware,
// instead of a multiply and an add.
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#if !defined(SIMDE_X86_FMA_NATIVE) || !defined(SIMDE_X86_AVX2_NATIVE)
#error "emulated AVX-512: SIMDe did not see AVX2+FMA; its fmadd would round twice"
#endif
#if defined(SIMDE_X86_AVX512F_NATIVE)
#error "emulated AVX-512: SIMDe saw native AVX-512 (the emulated build must not emit AVX-512 code)"
#endif
#include "cpu/emulated_avx512_extra.h"
#else
#include <immintrin.h>
#endif
