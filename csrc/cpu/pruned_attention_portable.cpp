// Portable instantiation of the CPU attention kernel (pruned_attention_kernel.h) over an 8-float
// struct the compiler vectorises for the baseline ISA (SSE2 on x86-64, NEON on aarch64) or runs scalar.
// Used where neither AVX2+FMA nor AVX-512 is available, or when BSBERT_CPU_ISA=portable.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <cstdint>

#include "cpu/pruned_attention.h"

namespace bsbert {
namespace cpu {
namespace {

struct Lanes8 {
  struct reg {
    float v[8];
  };
  static constexpr int W = 8;
  template <class F>
  static inline reg map(F f) {
    reg r;
    for (int i = 0; i < W; ++i) r.v[i] = f(i);
    return r;
  }
  static inline reg zero() { return set1(0.f); }
  static inline reg set1(float x) { return map([&](int) { return x; }); }
  static inline reg load(const float* p) { return map([&](int i) { return p[i]; }); }
  static inline reg bcast(const float* p) { return set1(*p); }
  static inline void store(float* p, const reg& a) {
    for (int i = 0; i < W; ++i) p[i] = a.v[i];
  }
  // a*b + c with separate rounding (the baseline has no FMA instruction; std::fma would be a call).
  static inline reg fma(const reg& a, const reg& b, const reg& c) {
    return map([&](int i) { return a.v[i] * b.v[i] + c.v[i]; });
  }
  static inline reg add(const reg& a, const reg& b) { return map([&](int i) { return a.v[i] + b.v[i]; }); }
  static inline reg sub(const reg& a, const reg& b) { return map([&](int i) { return a.v[i] - b.v[i]; }); }
  static inline reg mul(const reg& a, const reg& b) { return map([&](int i) { return a.v[i] * b.v[i]; }); }
  static inline reg max(const reg& a, const reg& b) {
    return map([&](int i) { return a.v[i] > b.v[i] ? a.v[i] : b.v[i]; });
  }
  static inline float hmax(const reg& a) {
    float m = a.v[0];
    for (int i = 1; i < W; ++i) m = a.v[i] > m ? a.v[i] : m;
    return m;
  }
  static inline float hsum(const reg& a) {
    float s = 0.f;
    for (int i = 0; i < W; ++i) s += a.v[i];
    return s;
  }
  static inline reg round(const reg& a) { return map([&](int i) { return std::nearbyint(a.v[i]); }); }
  // 2^n for integral n in [-127, 127] through the exponent field (n = -127 gives +0). A NaN or infinite
  // n (from a NaN or infinite score, see expv in pruned_attention_kernel.h) gives 1 rather than a
  // float-to-int conversion of it (undefined in C++): the polynomial it multiplies is NaN then.
  static inline reg pow2i(const reg& n) {
    return map([&](int i) {
      const int32_t e = n.v[i] >= -127.f && n.v[i] <= 127.f ? static_cast<int32_t>(n.v[i]) : 0;
      const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    });
  }
  static inline void transpose(reg (&r)[8]) {
    for (int i = 0; i < W; ++i)
      for (int j = i + 1; j < W; ++j) std::swap(r[i].v[j], r[j].v[i]);
  }
};

#include "cpu/pruned_attention_kernel.h"

using Kernel = AttnKernel<Lanes8, 4, 1, 4, 2, 4, 1, 4, 1>;

}  // namespace

AttnPath attn_path_portable() { return Kernel::path(); }

}  // namespace cpu
}  // namespace bsbert
