// Row kernel of bsbert::add_layer_norm, written once over a vector type V and included by each ISA
// translation unit (add_layer_norm_{portable,avx2,avx512}.cpp) inside its anonymous namespace, after
// its V. No include guard on purpose: every ISA instantiates its own copy.
//
// V provides: reg, W (floats per reg), zero, set1, add, sub, fma(a, b, c) = a*b + c, hsum;
// load/store of W floats and of W bf16 values (load_bf16 / store_bf16, round to nearest even);
// the tail forms load_n / load_bf16_n (lanes >= n read as 0), store_n / store_bf16_n (only n lanes
// written) and keep_n (lanes >= n set to 0).
//
// Each row is read from memory once: pass 1 adds x + residual into the fp32 scratch row (which stays
// in L1 for BERT widths) and sums it; pass 2 sums the deviations from that mean and their squares over
// the scratch row (the corrected two-pass form: no cancellation when |mean| >> std, unlike
// E[h^2] - E[h]^2, and the mean's own fp32 rounding is corrected); pass 3 normalises, scales and
// writes y. Four accumulators per sum hide the add latency.

#include "cpu/row_io.h"

// Pulls the next row's x and residual towards L1 while pass 2 works on L1 data only (the load ports
// are idle there): 5-9% at BERT sizes when the inputs come from L2/L3.
template <int kBytes>
inline void prefetch_pair(const void* x, const void* r) {
  for (int c = 0; c < kBytes; c += 64) {
    __builtin_prefetch(static_cast<const char*>(x) + c, 0, 3);
    __builtin_prefetch(static_cast<const char*>(r) + c, 0, 3);
  }
}

template <class V, class T>
void add_layer_norm_rows_t(const AddLayerNormArgs& a, const float* gamma, const float* beta, int64_t r0,
                           int64_t r1, float* h) {
  using reg = typename V::reg;
  using Io = RowIo<V>;
  constexpr int W = V::W;
  const int64_t N = a.N;
  const int64_t nfull = N / W * W;
  const int tail = static_cast<int>(N - nfull);
  const float inv_n = 1.0f / static_cast<float>(N);
  for (int64_t row = r0; row < r1; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * a.ldx;
    const T* r = static_cast<const T*>(a.residual) + row * a.ldr;
    T* y = static_cast<T*>(a.y) + row * a.ldy;

    reg s0 = V::zero(), s1 = V::zero(), s2 = V::zero(), s3 = V::zero();
    int64_t i = 0;
    for (; i + 4 * W <= nfull; i += 4 * W) {
      const reg v0 = V::add(Io::ld(x + i), Io::ld(r + i));
      const reg v1 = V::add(Io::ld(x + i + W), Io::ld(r + i + W));
      const reg v2 = V::add(Io::ld(x + i + 2 * W), Io::ld(r + i + 2 * W));
      const reg v3 = V::add(Io::ld(x + i + 3 * W), Io::ld(r + i + 3 * W));
      V::store(h + i, v0);
      V::store(h + i + W, v1);
      V::store(h + i + 2 * W, v2);
      V::store(h + i + 3 * W, v3);
      s0 = V::add(s0, v0);
      s1 = V::add(s1, v1);
      s2 = V::add(s2, v2);
      s3 = V::add(s3, v3);
    }
    for (; i < nfull; i += W) {
      const reg v = V::add(Io::ld(x + i), Io::ld(r + i));
      V::store(h + i, v);
      s0 = V::add(s0, v);
    }
    if (tail) {  // missing lanes load as 0 + 0: they add nothing to the sum
      const reg v = V::add(Io::ld_n(x + i, tail), Io::ld_n(r + i, tail));
      V::store(h + i, v);
      s1 = V::add(s1, v);
    }
    const float mean = V::hsum(V::add(V::add(s0, s1), V::add(s2, s3))) * inv_n;

    // Pass 2 sums the deviations d = h - mean as well as d^2: the fp32 mean is off by up to half an
    // ulp of |mean|, which is not small next to the std when |mean| >> std; sum(d) / N measures that
    // offset (h - mean is exact there), and var = E[d^2] - E[d]^2 (the corrected two-pass form).
    const reg m = V::set1(mean);
    reg q0 = V::zero(), q1 = V::zero(), q2 = V::zero(), q3 = V::zero();
    s0 = s1 = s2 = s3 = V::zero();
    i = 0;
    const bool more = row + 1 < r1;
    for (; i + 4 * W <= nfull; i += 4 * W) {
      if (more) prefetch_pair<4 * W * sizeof(T)>(x + a.ldx + i, r + a.ldr + i);
      const reg d0 = V::sub(V::load(h + i), m), d1 = V::sub(V::load(h + i + W), m);
      const reg d2 = V::sub(V::load(h + i + 2 * W), m), d3 = V::sub(V::load(h + i + 3 * W), m);
      s0 = V::add(s0, d0);
      s1 = V::add(s1, d1);
      s2 = V::add(s2, d2);
      s3 = V::add(s3, d3);
      q0 = V::fma(d0, d0, q0);
      q1 = V::fma(d1, d1, q1);
      q2 = V::fma(d2, d2, q2);
      q3 = V::fma(d3, d3, q3);
    }
    for (; i < nfull; i += W) {
      const reg d = V::sub(V::load(h + i), m);
      s0 = V::add(s0, d);
      q0 = V::fma(d, d, q0);
    }
    if (tail) {  // here the missing lanes would be 0 - mean: zero them
      const reg d = V::keep_n(V::sub(V::load(h + i), m), tail);
      s1 = V::add(s1, d);
      q1 = V::fma(d, d, q1);
    }
    const float shift = V::hsum(V::add(V::add(s0, s1), V::add(s2, s3))) * inv_n;
    // clamp rounding below 0, but let a NaN through: rows past ~1e19 overflow d^2 and shift^2 to Inf, and
    // std::max(0, Inf - Inf) made var 0, rstd 1/sqrt(eps) and the output huge finite values (3e36 at 1e30)
    // where torch's layer_norm gives NaN
    const float var_raw = V::hsum(V::add(V::add(q0, q1), V::add(q2, q3))) * inv_n - shift * shift;
    const float var = var_raw < 0.f ? 0.f : var_raw;
    // fp32 like torch's CPU layer_norm (eps is rounded to float there too).
    const float rstd = 1.0f / std::sqrt(var + static_cast<float>(a.eps));
    // (h - mean - shift) * rstd as (h - mean) * rstd - shift * rstd: one fma
    const reg rs = V::set1(rstd), off = V::set1(-shift * rstd);

    i = 0;
    for (; i < nfull; i += W) {
      const reg n = V::fma(V::sub(V::load(h + i), m), rs, off);
      Io::st(y + i, V::fma(n, V::load(gamma + i), V::load(beta + i)));
    }
    if (tail) {
      const reg n = V::fma(V::sub(V::load(h + i), m), rs, off);
      Io::st_n(y + i, V::fma(n, V::load_n(gamma + i, tail), V::load_n(beta + i, tail)), tail);
    }
  }
}

// bf16 gamma / beta are widened once per call of this function (per thread), into the scratch space
// behind the row: once per row in pass 3 would cost more, once per op call through torch too.
template <class V>
const float* widen_affine(const void* src, int64_t N, float* dst) {
  const uint16_t* p = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + V::W <= N; i += V::W) V::store(dst + i, V::load_bf16(p + i));
  if (i < N) V::store_n(dst + i, V::load_bf16_n(p + i, static_cast<int>(N - i)), static_cast<int>(N - i));
  return dst;
}

template <class V>
void add_layer_norm_rows_dispatch(const AddLayerNormArgs& a, int64_t r0, int64_t r1, float* scratch) {
  const int64_t row_floats = add_layer_norm_scratch(a.N) / 3;
  const float* gamma = static_cast<const float*>(a.gamma);
  const float* beta = static_cast<const float*>(a.beta);
  if (a.affine_bf16) {
    gamma = widen_affine<V>(a.gamma, a.N, scratch + row_floats);
    beta = widen_affine<V>(a.beta, a.N, scratch + 2 * row_floats);
  }
  if (a.bf16)
    add_layer_norm_rows_t<V, uint16_t>(a, gamma, beta, r0, r1, scratch);
  else
    add_layer_norm_rows_t<V, float>(a, gamma, beta, r0, r1, scratch);
}
