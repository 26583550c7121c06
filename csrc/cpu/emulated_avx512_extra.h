// The AVX-512 intrinsics bsbert's kernels use that SIMDe 0.7.4 does not provide (or provides with other
// numerics than the hardware), for the emulated test build only (avx512_intrinsics.h explains it).
//
// Each follows the Intel SDM pseudo-code of its instruction, lane by lane, on plain arrays (memcpy in and
// out, so it does not depend on how SIMDe lays out its types). What matters for a faithful emulation:
//  - masked loads and stores touch only the selected lanes' memory (the kernels rely on it at row ends,
//    and the guard-page tests check it);
//  - the bf16 conversions are the hardware's: round to nearest even, denormal inputs and outputs become
//    signed zeros, NaNs stay quiet NaNs with their sign and top payload bits;
//  - the reductions add and compare in the same tree order as GCC's own _mm512_reduce_{add,max}_ps, so
//    an emulated result has the bits a native build gives;
//  - vscalefps is x * 2^floor(y) rounded once (SIMDe's flushes denormal inputs to zero first);
//  - vdpbf16ps adds the odd pair's product, then the even pair's, each rounded once, denormal inputs and
//    outputs flushed to zero (SIMDe adds both products first and keeps denormals).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace bsbert_emulated_avx512 {

template <class T, int N>
struct Lanes {
  T v[N];
};
template <class T, int N, class V>
inline Lanes<T, N> lanes_of(const V& reg) {
  static_assert(sizeof(V) == sizeof(T) * N, "register and lane array differ in size");
  Lanes<T, N> l;
  std::memcpy(l.v, &reg, sizeof(V));
  return l;
}
template <class V, class T, int N>
inline V reg_of(const Lanes<T, N>& l) {
  static_assert(sizeof(V) == sizeof(T) * N, "register and lane array differ in size");
  V reg;
  std::memcpy(&reg, l.v, sizeof(V));
  return reg;
}

inline uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// SDM "convert_fp32_to_bfloat16": zero/denormal -> signed zero, Inf kept, NaN -> quiet NaN (bit 6 set),
// normal -> round to nearest even.
inline uint16_t fp32_to_bf16(float f) {
  const uint32_t u = bits(f);
  const uint32_t exponent = (u >> 23) & 0xffu;
  if (exponent == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);
  if (exponent == 0xffu) {
    if ((u & 0x7fffffu) == 0) return static_cast<uint16_t>(u >> 16);
    return static_cast<uint16_t>((u >> 16) | 0x40u);
  }
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float flush_denormal(float f) {
  return std::fpclassify(f) == FP_SUBNORMAL ? std::copysign(0.f, f) : f;
}
inline float bf16_to_fp32(uint16_t h) { return from_bits(static_cast<uint32_t>(h) << 16); }

// MAXPS: the second operand unless the first is greater (a NaN in either gives the second).
inline float max_ps_lane(float a, float b) { return a > b ? a : b; }

// Masked 16-lane load (zeros elsewhere) and store: only the selected lanes' memory is touched.
template <class V, class T>
inline V masked_load(uint16_t k, const void* p) {
  Lanes<T, 16> r{};
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) std::memcpy(&r.v[i], static_cast<const T*>(p) + i, sizeof(T));
  return reg_of<V>(r);
}
template <class T, class V>
inline void masked_store(void* p, uint16_t k, const V& reg) {
  const auto l = lanes_of<T, 16>(reg);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) std::memcpy(static_cast<T*>(p) + i, &l.v[i], sizeof(T));
}

}  // namespace bsbert_emulated_avx512

#define BSB_EMU_FN static inline __attribute__((always_inline))

BSB_EMU_FN simde__m512 bsbert_emu_mm512_maskz_loadu_ps(simde__mmask16 k, const void* p) {
  return bsbert_emulated_avx512::masked_load<simde__m512, float>(k, p);
}
BSB_EMU_FN void bsbert_emu_mm512_mask_storeu_ps(void* p, simde__mmask16 k, simde__m512 a) {
  bsbert_emulated_avx512::masked_store<float>(p, k, a);
}
BSB_EMU_FN simde__m256i bsbert_emu_mm256_maskz_loadu_epi16(simde__mmask16 k, const void* p) {
  return bsbert_emulated_avx512::masked_load<simde__m256i, uint16_t>(k, p);
}
BSB_EMU_FN void bsbert_emu_mm256_mask_storeu_epi16(void* p, simde__mmask16 k, simde__m256i a) {
  bsbert_emulated_avx512::masked_store<uint16_t>(p, k, a);
}

// VPMOVDW: truncate each 32-bit lane to its low 16 bits.
BSB_EMU_FN simde__m256i bsbert_emu_mm512_cvtepi32_epi16(simde__m512i a) {
  const auto l = bsbert_emulated_avx512::lanes_of<uint32_t, 16>(a);
  bsbert_emulated_avx512::Lanes<uint16_t, 16> r;
  for (int i = 0; i < 16; ++i) r.v[i] = static_cast<uint16_t>(l.v[i]);
  return bsbert_emulated_avx512::reg_of<simde__m256i>(r);
}
// VPMOVZXWD: zero-extend 16-bit lanes to 32 bits.
BSB_EMU_FN simde__m512i bsbert_emu_mm512_cvtepu16_epi32(simde__m256i a) {
  const auto l = bsbert_emulated_avx512::lanes_of<uint16_t, 16>(a);
  bsbert_emulated_avx512::Lanes<uint32_t, 16> r;
  for (int i = 0; i < 16; ++i) r.v[i] = l.v[i];
  return bsbert_emulated_avx512::reg_of<simde__m512i>(r);
}
// VCVTPS2DQ under the default MXCSR (round to nearest even); NaN and out-of-range give 0x80000000.
BSB_EMU_FN simde__m512i bsbert_emu_mm512_cvtps_epi32(simde__m512 a) {
  const auto l = bsbert_emulated_avx512::lanes_of<float, 16>(a);
  bsbert_emulated_avx512::Lanes<int32_t, 16> r;
  for (int i = 0; i < 16; ++i) {
    const float t = std::nearbyint(l.v[i]);
    r.v[i] = (t >= -2147483648.f && t < 2147483648.f) ? static_cast<int32_t>(t) : std::numeric_limits<int32_t>::min();
  }
  return bsbert_emulated_avx512::reg_of<simde__m512i>(r);
}

// VCVTNEPS2BF16 (16 lanes) and VCVTNE2PS2BF16 (b in the low 16 bf16 lanes, a in the high 16).
BSB_EMU_FN simde__m256bh bsbert_emu_mm512_cvtneps_pbh(simde__m512 a) {
  const auto l = bsbert_emulated_avx512::lanes_of<float, 16>(a);
  bsbert_emulated_avx512::Lanes<uint16_t, 16> r;
  for (int i = 0; i < 16; ++i) r.v[i] = bsbert_emulated_avx512::fp32_to_bf16(l.v[i]);
  return bsbert_emulated_avx512::reg_of<simde__m256bh>(r);
}
BSB_EMU_FN simde__m512bh bsbert_emu_mm512_cvtne2ps_pbh(simde__m512 a, simde__m512 b) {
  const auto la = bsbert_emulated_avx512::lanes_of<float, 16>(a);
  const auto lb = bsbert_emulated_avx512::lanes_of<float, 16>(b);
  bsbert_emulated_avx512::Lanes<uint16_t, 32> r;
  for (int i = 0; i < 16; ++i) {
    r.v[i] = bsbert_emulated_avx512::fp32_to_bf16(lb.v[i]);
    r.v[16 + i] = bsbert_emulated_avx512::fp32_to_bf16(la.v[i]);
  }
  return bsbert_emulated_avx512::reg_of<simde__m512bh>(r);
}

// VSHUFF32X4: 128-bit lanes a[imm[1:0]], a[imm[3:2]], b[imm[5:4]], b[imm[7:6]].
BSB_EMU_FN simde__m512 bsbert_emu_mm512_shuffle_f32x4(simde__m512 a, simde__m512 b, int imm) {
  const auto la = bsbert_emulated_avx512::lanes_of<float, 16>(a);
  const auto lb = bsbert_emulated_avx512::lanes_of<float, 16>(b);
  bsbert_emulated_avx512::Lanes<float, 16> r;
  for (int q = 0; q < 4; ++q) {
    const float* src = (q < 2 ? la.v : lb.v) + 4 * ((imm >> (2 * q)) & 3);
    for (int j = 0; j < 4; ++j) r.v[4 * q + j] = src[j];
  }
  return bsbert_emulated_avx512::reg_of<simde__m512>(r);
}

// GCC 12's _mm512_reduce_add_ps: halves of 256, then 128 bits, then (0,1)+(2,3), then lane 0 + lane 1.
BSB_EMU_FN float bsbert_emu_mm512_reduce_add_ps(simde__m512 a) {
  const auto l = bsbert_emulated_avx512::lanes_of<float, 16>(a);
  float t8[8], t4[4], t2[2];
  for (int i = 0; i < 8; ++i) t8[i] = l.v[8 + i] + l.v[i];
  for (int i = 0; i < 4; ++i) t4[i] = t8[4 + i] + t8[i];
  for (int i = 0; i < 2; ++i) t2[i] = t4[i] + t4[i + 2];
  return t2[0] + t2[1];
}
// GCC 12's _mm512_reduce_max_ps: max_ps(high, low) on 256 then 128 bits, then with lanes (2,3,0,1),
// then with lanes (1,0,1,0); lane 0.
BSB_EMU_FN float bsbert_emu_mm512_reduce_max_ps(simde__m512 a) {
  using bsbert_emulated_avx512::max_ps_lane;
  const auto l = bsbert_emulated_avx512::lanes_of<float, 16>(a);
  float t8[8], t4[4], u[4];
  for (int i = 0; i < 8; ++i) t8[i] = max_ps_lane(l.v[8 + i], l.v[i]);
  for (int i = 0; i < 4; ++i) t4[i] = max_ps_lane(t8[4 + i], t8[i]);
  const int s1[4] = {2, 3, 0, 1};
  for (int i = 0; i < 4; ++i) u[i] = max_ps_lane(t4[i], t4[s1[i]]);
  return max_ps_lane(u[0], u[1]);
}

// VREDUCEPS: src - round(2^M src) 2^-M, M = imm[7:4], rounding imm[1:0] (imm[2] = MXCSR's, i.e. nearest).
// A NaN stays NaN; an infinity gives +0 (SDM special cases).
BSB_EMU_FN simde__m512 bsbert_emu_mm512_reduce_ps(simde__m512 a, int imm) {
  const auto l = bsbert_emulated_avx512::lanes_of<float, 16>(a);
  bsbert_emulated_avx512::Lanes<float, 16> r;
  const int m = (imm >> 4) & 0xf;
  const int mode = (imm & 4) ? 0 : (imm & 3);
  for (int i = 0; i < 16; ++i) {
    const float x = l.v[i];
    if (std::isnan(x)) {
      r.v[i] = x + x;
      continue;
    }
    if (std::isinf(x)) {
      r.v[i] = 0.f;
      continue;
    }
    const double s = std::ldexp(static_cast<double>(x), m);  // exact: a float times a power of two
    double t;
    switch (mode) {
      case 1: t = std::floor(s); break;
      case 2: t = std::ceil(s); break;
      case 3: t = std::trunc(s); break;
      default: t = s - std::remainder(s, 1.0); break;  // nearest, ties to even
    }
    r.v[i] = static_cast<float>(static_cast<double>(x) - std::ldexp(t, -m));
  }
  return bsbert_emulated_avx512::reg_of<simde__m512>(r);
}

// VSCALEFPS: a * 2^floor(b), rounded once; NaN in either gives NaN.
BSB_EMU_FN simde__m512 bsbert_emu_mm512_scalef_ps(simde__m512 a, simde__m512 b) {
  const auto la = bsbert_emulated_avx512::lanes_of<float, 16>(a);
  const auto lb = bsbert_emulated_avx512::lanes_of<float, 16>(b);
  bsbert_emulated_avx512::Lanes<float, 16> r;
  for (int i = 0; i < 16; ++i) {
    const float x = la.v[i], y = lb.v[i];
    if (std::isnan(x) || std::isnan(y)) {
      r.v[i] = std::isnan(x) ? x + x : y + y;
      continue;
    }
    const float e = std::floor(y);
    // ldexpf is exact up to one final rounding (denormal results included); clamp the exponent to where
    // the result is certainly 0 or Inf, so that the cast to int is defined.
    const int n = e < -400.f ? -400 : (e > 400.f ? 400 : static_cast<int>(e));
    r.v[i] = std::ldexp(x, n);
  }
  return bsbert_emulated_avx512::reg_of<simde__m512>(r);
}

// VDPBF16PS (SDM): acc += a.odd * b.odd, then acc += a.even * b.even, each an FMA with denormal inputs
// as zero, the result flushed to zero, round to nearest even (the products of bf16 values are exact).
BSB_EMU_FN simde__m512 bsbert_emu_mm512_dpbf16_ps(simde__m512 src, simde__m512bh a, simde__m512bh b) {
  using bsbert_emulated_avx512::bf16_to_fp32;
  using bsbert_emulated_avx512::flush_denormal;
  const auto acc = bsbert_emulated_avx512::lanes_of<float, 16>(src);
  const auto la = bsbert_emulated_avx512::lanes_of<uint16_t, 32>(a);
  const auto lb = bsbert_emulated_avx512::lanes_of<uint16_t, 32>(b);
  bsbert_emulated_avx512::Lanes<float, 16> r;
  for (int i = 0; i < 16; ++i) {
    float t = flush_denormal(acc.v[i]);
    for (int half : {1, 0}) {
      const float x = flush_denormal(bf16_to_fp32(la.v[2 * i + half]));
      const float y = flush_denormal(bf16_to_fp32(lb.v[2 * i + half]));
      t = flush_denormal(std::fma(x, y, t));
    }
    r.v[i] = t;
  }
  return bsbert_emulated_avx512::reg_of<simde__m512>(r);
}

#undef BSB_EMU_FN

#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps(k, p) bsbert_emu_mm512_maskz_loadu_ps(k, p)
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps(p, k, a) bsbert_emu_mm512_mask_storeu_ps(p, k, a)
#undef _mm256_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16(k, p) bsbert_emu_mm256_maskz_loadu_epi16(k, p)
#undef _mm256_mask_storeu_epi16
#define _mm256_mask_storeu_epi16(p, k, a) bsbert_emu_mm256_mask_storeu_epi16(p, k, a)
#undef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16(a) bsbert_emu_mm512_cvtepi32_epi16(a)
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32(a) bsbert_emu_mm512_cvtepu16_epi32(a)
#undef _mm512_cvtps_epi32
#define _mm512_cvtps_epi32(a) bsbert_emu_mm512_cvtps_epi32(a)
#undef _mm512_cvtneps_pbh
#define _mm512_cvtneps_pbh(a) bsbert_emu_mm512_cvtneps_pbh(a)
#undef _mm512_cvtne2ps_pbh
#define _mm512_cvtne2ps_pbh(a, b) bsbert_emu_mm512_cvtne2ps_pbh(a, b)
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps(a) bsbert_emu_mm512_reduce_add_ps(a)
#undef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps(a) bsbert_emu_mm512_reduce_max_ps(a)
#undef _mm512_reduce_ps
#define _mm512_reduce_ps(a, imm) bsbert_emu_mm512_reduce_ps(a, imm)
#undef _mm512_scalef_ps
#define _mm512_scalef_ps(a, b) bsbert_emu_mm512_scalef_ps(a, b)
#undef _mm512_dpbf16_ps
#define _mm512_dpbf16_ps(src, a, b) bsbert_emu_mm512_dpbf16_ps(src, a, b)
#undef _mm512_shuffle_f32x4
#define _mm512_shuffle_f32x4(a, b, imm) bsbert_emu_mm512_shuffle_f32x4(a, b, imm)
