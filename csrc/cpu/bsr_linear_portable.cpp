// Portable instantiation of the block-sparse GEMM: the same template over an 8-float struct that the
// compiler vectorises for the baseline ISA (SSE2 on x86-64, NEON on aarch64) or runs scalar.
#include <cstdint>
#include <cstring>

#include "cpu/bsr_linear.h"

namespace bsbert {
namespace cpu {
namespace {

struct VPortable {
  struct reg {
    float v[8];
  };
  static constexpr int W = 8;
  static inline reg zero() {
    reg r;
    for (int i = 0; i < W; ++i) r.v[i] = 0.f;
    return r;
  }
  static inline reg load(const float* p) {
    reg r;
    for (int i = 0; i < W; ++i) r.v[i] = p[i];
    return r;
  }
  static inline void store(float* p, const reg& a) {
    for (int i = 0; i < W; ++i) p[i] = a.v[i];
  }
  static inline reg set1(float f) {
    reg r;
    for (int i = 0; i < W; ++i) r.v[i] = f;
    return r;
  }
  static inline reg bcast(const float* p) { return set1(*p); }
  // a*b + c with the intermediate rounding of separate multiply and add (no FMA on the baseline).
  static inline reg fma(const reg& a, const reg& b, const reg& c) {
    reg r;
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static inline reg add(const reg& a, const reg& b) {
    reg r;
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
  static inline reg mul(const reg& a, const reg& b) {
    reg r;
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
  static inline reg min(const reg& a, const reg& b) {
    reg r;
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] < b.v[i] ? a.v[i] : b.v[i];
    return r;
  }
  static inline reg max(const reg& a, const reg& b) {
    reg r;
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return r;
  }
  static inline reg div(const reg& a, const reg& b) {
    reg r;
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] / b.v[i];
    return r;
  }
  static inline void load_pairs(const int32_t* p, reg& lo, reg& hi) {
    for (int i = 0; i < W; ++i) {
      uint32_t u;
      std::memcpy(&u, p + i, 4);
      const uint32_t l = u << 16, h = u & 0xffff0000u;
      std::memcpy(&lo.v[i], &l, 4);
      std::memcpy(&hi.v[i], &h, 4);
    }
  }
  static inline void store_bf16(uint16_t* p, const reg& a);
};

#include "cpu/bsr_linear_kernel.h"

inline void VPortable::store_bf16(uint16_t* p, const reg& a) {
  for (int i = 0; i < W; ++i) p[i] = f32_to_bf16_scalar(a.v[i]);
}

}  // namespace

// 4x16 tile: 8 accumulators of 8 floats.
void bsr_tile_portable(const BsrLinearArgs& a, int64_t m0, int64_t m1, int64_t rb, float* c) {
  tile_dispatch<VPortable, 4, 4, 2>(a, m0, m1, rb, c);
}
void bsr_pack_portable(const BsrLinearArgs& a, int64_t p0, int64_t p1, float* xp) {
  pack_dispatch<4, 4>(a, p0, p1, xp);
}
int bsr_mr_portable(bool) { return 4; }
void bsr_gemv_pack_portable(const BsrLinearArgs& a, float* xv) { gemv_pack(a, xv); }
void bsr_gemv_portable(const BsrLinearArgs& a, int64_t rb, float* c) { gemv_dispatch<VPortable>(a, rb, c); }

}  // namespace cpu
}  // namespace bsbert
