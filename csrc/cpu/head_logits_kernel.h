// Row kernel of bsbert::head_logits, written once over a row wrapper V (simd_rows_*.h) and included by
// each ISA translation unit (head_logits_{portable,avx2,avx512}.cpp) inside its anonymous namespace,
// after its V. No include guard on purpose: every ISA instantiates its own copy.
//
// Each output is one dot product of an x row with a weight row: fp32 products summed in four vector
// accumulators (then across lanes), plus the bias, rounded once to the output dtype. The x row is read
// N times, from L1 after the first (N is a task head's 1-3 outputs).

#include "cpu/row_io.h"

template <class V, class T>
void head_logits_rows_t(const HeadLogitsArgs& a, int64_t m0, int64_t m1) {
  using reg = typename V::reg;
  using Io = RowIo<V>;
  constexpr int W = V::W;
  const int64_t K = a.K, kfull = K / W * W;
  const int tail = static_cast<int>(K - kfull);
  const T* bias = static_cast<const T*>(a.bias);
  for (int64_t m = m0; m < m1; ++m) {
    const T* x = static_cast<const T*>(a.x) + m * a.ldx;
    for (int64_t n = 0; n < a.N; ++n) {
      const T* w = static_cast<const T*>(a.w) + n * K;
      reg s0 = V::zero(), s1 = V::zero(), s2 = V::zero(), s3 = V::zero();
      int64_t k = 0;
      for (; k + 4 * W <= kfull; k += 4 * W) {
        s0 = V::fma(Io::ld(x + k), Io::ld(w + k), s0);
        s1 = V::fma(Io::ld(x + k + W), Io::ld(w + k + W), s1);
        s2 = V::fma(Io::ld(x + k + 2 * W), Io::ld(w + k + 2 * W), s2);
        s3 = V::fma(Io::ld(x + k + 3 * W), Io::ld(w + k + 3 * W), s3);
      }
      for (; k < kfull; k += W) s0 = V::fma(Io::ld(x + k), Io::ld(w + k), s0);
      if (tail) s1 = V::fma(Io::ld_n(x + k, tail), Io::ld_n(w + k, tail), s1);  // missing lanes: 0 * 0
      float s = V::hsum(V::add(V::add(s0, s1), V::add(s2, s3)));
      if (bias) s += Io::get(bias[n]);
      Io::put(static_cast<T*>(a.y) + n * a.ldy + m, s);
    }
  }
}

template <class V>
void head_logits_rows_dispatch(const HeadLogitsArgs& a, int64_t m0, int64_t m1) {
  if (a.bf16)
    head_logits_rows_t<V, uint16_t>(a, m0, m1);
  else
    head_logits_rows_t<V, float>(a, m0, m1);
}
