// Loads and stores of a row kernel's element type (fp32 or bf16) through a row wrapper V
// (simd_rows_*.h), so that a kernel is written once over T: add_layer_norm_kernel.h, head_logits_kernel.h.
// Include it inside the includer's anonymous namespace, after its V (like those kernels).
#pragma once

template <class V>
struct RowIo {
  using reg = typename V::reg;
  static inline reg ld(const float* p) { return V::load(p); }
  static inline reg ld(const uint16_t* p) { return V::load_bf16(p); }
  static inline reg ld_n(const float* p, int n) { return V::load_n(p, n); }
  static inline reg ld_n(const uint16_t* p, int n) { return V::load_bf16_n(p, n); }
  static inline void st(float* p, reg v) { V::store(p, v); }
  static inline void st(uint16_t* p, reg v) { V::store_bf16(p, v); }
  static inline void st_n(float* p, reg v, int n) { V::store_n(p, v, n); }
  static inline void st_n(uint16_t* p, reg v, int n) { V::store_bf16_n(p, v, n); }
  // one element, widened to fp32 / rounded to nearest even (NaN -> quiet NaN)
  static inline float get(float v) { return v; }
  static inline float get(uint16_t v) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
  static inline void put(float* p, float v) { *p = v; }
  static inline void put(uint16_t* p, float v) {
    uint32_t u;
    __builtin_memcpy(&u, &v, 4);
    *p = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0)
                                         : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};
