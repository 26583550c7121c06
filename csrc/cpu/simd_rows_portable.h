// The portable row-kernel wrapper: an 8-float struct whose lane loops the compiler vectorises for the
// baseline ISA (SSE2 on x86-64, NEON on aarch64) or runs scalar, for the kernels that walk whole rows
// (add_layer_norm_kernel.h, head_logits_kernel.h). Include it inside an anonymous namespace.

struct VRowPortable {
  static constexpr int W = 8;
  struct reg {
    float v[W];
  };
  template <class F>
  static inline reg each(F f) {
    reg r;
    for (int i = 0; i < W; ++i) r.v[i] = f(i);
    return r;
  }
  static inline reg zero() { return set1(0.f); }
  static inline reg set1(float f) { return each([&](int) { return f; }); }
  static inline reg add(const reg& a, const reg& b) { return each([&](int i) { return a.v[i] + b.v[i]; }); }
  static inline reg sub(const reg& a, const reg& b) { return each([&](int i) { return a.v[i] - b.v[i]; }); }
  // Two roundings: std::fma is a libm call without hardware FMA (baseline x86-64), which would stop
  // the vectorisation; the difference to the fused SIMD paths is one fp32 rounding.
  static inline reg fma(const reg& a, const reg& b, const reg& c) {
    return each([&](int i) { return a.v[i] * b.v[i] + c.v[i]; });
  }
  static inline float hsum(const reg& a) {
    float s = 0.f;
    for (int i = 0; i < W; ++i) s += a.v[i];
    return s;
  }
  static inline reg load(const float* p) { return each([&](int i) { return p[i]; }); }
  static inline reg load_n(const float* p, int n) { return each([&](int i) { return i < n ? p[i] : 0.f; }); }
  static inline void store(float* p, const reg& a) { store_n(p, a, W); }
  static inline void store_n(float* p, const reg& a, int n) {
    for (int i = 0; i < n; ++i) p[i] = a.v[i];
  }
  static inline reg keep_n(const reg& a, int n) { return each([&](int i) { return i < n ? a.v[i] : 0.f; }); }
  static inline float widen(uint16_t h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  // Round to nearest even; NaN -> quiet NaN.
  static inline uint16_t narrow(float f) {
    if (std::isnan(f)) return 0x7fc0;
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  static inline reg load_bf16(const uint16_t* p) { return load_bf16_n(p, W); }
  static inline reg load_bf16_n(const uint16_t* p, int n) {
    return each([&](int i) { return i < n ? widen(p[i]) : 0.f; });
  }
  static inline void store_bf16(uint16_t* p, const reg& a) { store_bf16_n(p, a, W); }
  static inline void store_bf16_n(uint16_t* p, const reg& a, int n) {
    for (int i = 0; i < n; ++i) p[i] = narrow(a.v[i]);
  }
};
