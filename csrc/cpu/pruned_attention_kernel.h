// Flash-attention style forward for one (sequence, head, query tile), templated over a SIMD wrapper V
// (W floats per register: zero/load/store/set1/bcast/fma/add/sub/mul/max/hmax/hsum/round/pow2i).
// Included by pruned_attention_{portable,avx2,avx512,avx512bf16}.cpp inside an anonymous namespace,
// after V.
//
// Per task: Q rows are widened and pre-multiplied by scale (KP = 1; the scores stay in natural units and
// the softmax takes e^x by range reduction, see expv), then for each step of kc keys: scores S = Q K^T
// with an MRS x (NVK*W) register tile over packed K^T panels (key bias and running max applied as the
// tile is stored), then the online softmax (running max / sum, 4 rows side by side; the previous
// context is rescaled when the max grows), then ctx += P V with an MR x (NV*W) register tile. Panels
// without a key to attend to are skipped in both products. Rows of the tile beyond the sequence are zeros
// (finite scores), never written out.
//
// Template parameters: MRS x NVK = score tile; (MRA, NVA) > (MRB, NVB) > (MRC, NVC) = P V tiles tried
// in that order for the remaining context columns (wide first). KP: values per 32-bit element along
// the reduction dimension of both products. KP = 1: fp32 FMAs (bf16 input widened). KP = 2: bf16 dot
// products (bf16 input only; V provides dot_bf16, exp2_bf16 and store_bf16_sum): K^T, V, Q and P hold
// bf16 pairs (two consecutive values of the reduction dimension in one 32-bit word), so each product
// runs half the steps. Then Q is not pre-scaled (scaling before rounding to bf16 would add an error):
// the score tile scales the fp32 scores by scale x log2(e) as it stores them (a base-2 softmax). P is
// rounded to bf16 and the running sum adds the rounded values, so the normalised weights of a row still sum to 1.

// The including file provides <algorithm>, <cmath>, <cstdint>, <cstring> and <limits> (headers
// cannot be included here: this file is read inside a namespace).

template <class V, int MRS, int NVK, int MRA, int NVA, int MRB, int NVB, int MRC, int NVC, int KP = 1>
struct AttnKernel {
  using reg = typename V::reg;
  static constexpr int W = V::W;
  static constexpr int P = NVK * W;  // keys per K^T panel
  static_assert(KP == 1 || KP == 2, "KP: 1 (fp32 values) or 2 (bf16 pairs) per 32-bit element");
  static_assert(KP == 1 || P % (2 * W) == 0, "KP = 2: P is converted two registers (W key pairs) at a time");

  static constexpr AttnGeometry geometry() { return {P, lcm(lcm(MRS, MRA), lcm(MRB, MRC))}; }
  static AttnPath path() { return {&pack, &task, geometry()}; }

  static constexpr int lcm(int a, int b) {
    int x = a, y = b;
    while (y) {
      const int t = x % y;
      x = y;
      y = t;
    }
    return a / x * b;
  }

  // n values from fp32 or bf16 src (bf16 widened exactly: it is the top half of an fp32), times mul.
  static void load_row(const void* src, bool bf16, int64_t n, float mul, float* dst) {
    if (bf16) {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t u = static_cast<uint32_t>(s[i]) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        dst[i] = f * mul;
      }
    } else {
      const float* s = static_cast<const float*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = s[i] * mul;
    }
  }

  // fp32 -> bf16 rounding to nearest even; NaN stays a (quiet) NaN.
  static void store_row_bf16(const float* src, int64_t n, float mul, uint16_t* dst) {
    for (int64_t i = 0; i < n; ++i) {
      const float f = src[i] * mul;
      uint32_t u;
      std::memcpy(&u, &f, 4);
      dst[i] = f != f ? uint16_t(0x7fc0) : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }

  static const char* token(const AttnArgs& a, int64_t b, int64_t j, int64_t col) {
    const int64_t esz = a.bf16 ? 2 : 4;
    return static_cast<const char*>(a.qkv) + (a.qkv_off[b] + j * a.ld_qkv + col) * esz;
  }

  // The cache lines of one token row's D values at col (a head's Q, K or V), for a later read. Token
  // rows are ld_qkv apart (several KiB: every row of a head is on another page, which the hardware
  // prefetchers do not follow), so without this each row read in pack and task waits on L3 or memory.
  // Loc: the __builtin_prefetch locality (3: into L1, 2: into L2).
  template <int Loc = 3>
  static void prefetch_row(const AttnArgs& a, int64_t b, int64_t j, int64_t col) {
    const char* p = token(a, b, j, col);
    const int64_t bytes = a.D * (a.bf16 ? 2 : 4);
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, Loc);
  }

  static int64_t lpad(const AttnArgs& a, int64_t b) { return a.ws_off[b + 1] - a.ws_off[b]; }
  // 32-bit elements (fp32 values or bf16 pairs) before K^T / V of (b, h) in a.kt / a.v.
  static int64_t head_ws(const AttnArgs& a, int64_t b, int64_t h) {
    return (a.ws_off[b] * a.H + h * lpad(a, b)) * a.D / KP;
  }

  // One token row (n values) into n / KP 32-bit elements: widened fp32 times mul, or (KP = 2) the bf16
  // pairs as they are (no rounding: the words are copied bit for bit).
  static void load_elems(const void* src, bool bf16, int64_t n, float mul, float* dst) {
    if constexpr (KP == 2) {
      // (a loop of fixed-size copies vectorises; a variable-size memcpy is a call per 128-byte row)
      const char* w = static_cast<const char*>(src);
      for (int64_t i = 0; i < n / 2; ++i) std::memcpy(dst + i, w + 4 * i, 4);
    } else {
      load_row(src, bf16, n, mul, dst);
    }
  }

  // V rows of keys k0 and k0 + 1 (nullptr: padding, zeros) as one row of D pairs (KP = 2).
  // (Branches outside the loops: the common case vectorises.)
  static void interleave_pair(const uint16_t* v0, const uint16_t* v1, int64_t D, float* dst) {
    uint32_t* w = reinterpret_cast<uint32_t*>(dst);
    if (v0 && v1) {
      for (int64_t d = 0; d < D; ++d) w[d] = uint32_t(v0[d]) | uint32_t(v1[d]) << 16;
    } else if (v0) {
      for (int64_t d = 0; d < D; ++d) w[d] = v0[d];
    } else {
      std::memset(w, 0, D * sizeof(uint32_t));  // (v1 is never set without v0: keys are in order)
    }
  }

  // K^T panels: W keys at a time are loaded into rows of blk (D / KP elements, zero-padded to a
  // multiple of W), then W x W blocks are transposed in registers (V::transpose) and stored as W
  // consecutive keys of W rows of the panel. V: rows of D fp32 values, or (KP = 2) rows of D pairs,
  // one per two keys.
  static void pack(const AttnArgs& a, int64_t b, int64_t h, int64_t p0, int64_t p1) {
    const int64_t D = a.D, L = a.len[b], DE = D / KP, DEpad = (DE + W - 1) / W * W;
    float* kt = a.kt + head_ws(a, b, h);
    float* vv = a.v + head_ws(a, b, h);
    const uint8_t* live = a.live + a.ws_off[b] / P;
    alignas(64) float blk[W * kAttnMaxHeadDim];  // W key rows (D checked by the caller)
    for (int64_t p = p0; p < p1; ++p) {
      if (!live[p]) continue;  // never read: the products skip dead panels
      float* ktp = kt + p * DE * P;
      for (int g = 0; g < NVK; ++g) {
        for (int jj = 0; jj < W; ++jj) {
          const int64_t key = p * P + g * W + jj;
          if (a.pf_rows > 0 && key + a.pf_rows < L) {
            prefetch_row(a, b, key + a.pf_rows, (a.H + h) * D);
            prefetch_row(a, b, key + a.pf_rows, (2 * a.H + h) * D);
            // and the head's Q rows into L2, for the query tiles that follow the pack
            if (a.pf_q) prefetch_row<2>(a, b, key + a.pf_rows, h * D);
          }
          float* br = blk + jj * DEpad;
          if (key < L)
            load_elems(token(a, b, key, (a.H + h) * D), a.bf16, D, 1.f, br);
          else
            std::memset(br, 0, DE * sizeof(float));
          std::memset(br + DE, 0, (DEpad - DE) * sizeof(float));
          if constexpr (KP == 1) {
            float* vr = vv + key * D;
            if (key < L)
              load_row(token(a, b, key, (2 * a.H + h) * D), a.bf16, D, 1.f, vr);
            else
              std::memset(vr, 0, D * sizeof(float));
          } else if (jj % 2 == 0) {
            auto vrow = [&](int64_t k) {
              return k < L ? reinterpret_cast<const uint16_t*>(token(a, b, k, (2 * a.H + h) * D)) : nullptr;
            };
            interleave_pair(vrow(key), vrow(key + 1), D, vv + key / 2 * D);
          }
        }
        for (int64_t d0 = 0; d0 < DE; d0 += W) {
          reg r[W];
          for (int jj = 0; jj < W; ++jj) r[jj] = V::load(blk + jj * DEpad + d0);
          V::transpose(r);
          for (int dd = 0; dd < W && d0 + dd < DE; ++dd) V::store(ktp + (d0 + dd) * P + g * W, r[dd]);
        }
      }
    }
  }

  // e^x for x <= 0, for the fp32 path: n = round(x log2 e), r = x - n ln2_hi - n ln2_lo (Cody-Waite: ln2_hi
  // has 9 significant bits, so n ln2_hi is exact for |n| <= 127 even where V's fma rounds twice, as the
  // portable one does), a polynomial for e^r on [-ln2/2, ln2/2], and exponent bits for 2^n. Why not 2^x on
  // scores pre-scaled by log2(e) (the bf16 path's way, and this path's before stop 30): multiplying by
  // log2(e) rounds every score, an error of |score| x 2^-24 in the exponent, where |score| is the raw score
  // (hundreds at large logits). At large logits (d = 256, scale 1, inputs of std 3) that made the weights up
  // to 3.2x torch SDPA's error, where SDPA's power-of-two scale is exact. Here the only rounding before the
  // exponential is the subtraction of the row's max, as in SDPA.
  // Clamped at -127 ln2 (n = -127: pow2i gives the all-zero pattern, so masked keys, -inf, are exactly 0).
  // A NaN stays NaN (x is max's second operand: maxps, and the portable max, return it when either is
  // NaN), so a NaN or infinite score makes the row NaN as in torch's softmax; clamped, it was a weight of
  // 0, and a row whose query held a NaN came out as zeros. The polynomial: degree 6, fitted to e^r's
  // relative error on [-0.354, 0.354] (a little past ln2/2), 2.2e-8 with these fp32 coefficients; one FMA
  // fewer than a degree-7 Taylor series, which paid for half of the range reduction's cost (stop 30).
  static inline reg expv(reg x) {
    constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    x = V::max(V::set1(-88.0296919311f), x);
    const reg n = V::round(V::mul(x, V::set1(1.44269504089f)));
    reg r = V::fma(n, V::set1(-ln2_hi), x);
    r = V::fma(n, V::set1(-ln2_lo), r);
    reg p = V::set1(0.0013834481360390782f);
    p = V::fma(p, r, V::set1(0.00837648194283247f));
    p = V::fma(p, r, V::set1(0.0416683591902256f));
    p = V::fma(p, r, V::set1(0.1666640043258667f));
    p = V::fma(p, r, V::set1(0.49999991059303284f));
    p = V::fma(p, r, V::set1(1.f));
    p = V::fma(p, r, V::set1(1.f));
    return V::mul(p, V::pow2i(n));
  }

  // Both products: acc += a * b (fp32), or the sum over the bf16 pairs of a and b.
  static inline reg madd(reg a, reg b, reg acc) {
    if constexpr (KP == 2)
      return V::dot_bf16(acc, a, b);
    else
      return V::fma(a, b, acc);
  }

  // acc[r][:] = q[r][d0:d1] . K^T panel rows d0..d1 (32-bit elements), for MRS rows of q.
  static inline void dot_range(const float* q, const float* ktp, int64_t D, int64_t d0, int64_t d1,
                               reg (&acc)[MRS][NVK]) {
#pragma GCC unroll 16
    for (int r = 0; r < MRS; ++r)
#pragma GCC unroll 4
      for (int n = 0; n < NVK; ++n) acc[r][n] = V::zero();
    for (int64_t d = d0; d < d1; ++d) {
      reg k[NVK];
#pragma GCC unroll 4
      for (int n = 0; n < NVK; ++n) k[n] = V::load(ktp + d * P + n * W);
#pragma GCC unroll 16
      for (int r = 0; r < MRS; ++r) {
        const reg qb = V::bcast(q + r * D + d);
#pragma GCC unroll 4
        for (int n = 0; n < NVK; ++n) acc[r][n] = madd(qb, k[n], acc[r][n]);
      }
    }
  }

  // Elements of a score's dot product summed in one chain; longer ones run in chunks added at the end.
  // torch's fp32 GEMMs block the reduction the same way, and one chain of 256 products (head_dim 256)
  // had 1.4x their rounding error, which the softmax's exponential amplifies at large logits (stop 30).
  static constexpr int64_t kDotChunk = 128;

  // s[r][0:P] (row stride lds) = q[r][:] . K^T panel (times sscale for KP = 2: Q is not pre-scaled)
  // + kb[0:P] (key bias: -inf where masked), for MRS rows of q (row stride D, D / KP elements); the
  // running max of row r's scores, lane by lane, in mx[r][0:W]. Done here, while the scores are in
  // registers, rather than in another pass over s.
  static inline void score_tile(const float* q, const float* ktp, int64_t D, const float* kb, float sscale,
                                float* s, int64_t lds, float* mx) {
    const int64_t DE = D / KP;
    reg acc[MRS][NVK];
    dot_range(q, ktp, D, 0, std::min(DE, kDotChunk), acc);
    for (int64_t d0 = kDotChunk; d0 < DE; d0 += kDotChunk) {  // (head_dim > 128 only)
      reg part[MRS][NVK];
      dot_range(q, ktp, D, d0, std::min(DE, d0 + kDotChunk), part);
#pragma GCC unroll 16
      for (int r = 0; r < MRS; ++r)
#pragma GCC unroll 4
        for (int n = 0; n < NVK; ++n) acc[r][n] = V::add(acc[r][n], part[r][n]);
    }
    reg kbv[NVK];
#pragma GCC unroll 4
    for (int n = 0; n < NVK; ++n) kbv[n] = V::load(kb + n * W);
    [[maybe_unused]] const reg sc = V::set1(sscale);
#pragma GCC unroll 16
    for (int r = 0; r < MRS; ++r) {
      reg m = V::load(mx + r * W);
#pragma GCC unroll 4
      for (int n = 0; n < NVK; ++n) {
        reg x;
        if constexpr (KP == 2)
          x = V::fma(acc[r][n], sc, kbv[n]);
        else
          x = V::add(acc[r][n], kbv[n]);
        V::store(s + r * lds + n * W, x);
        m = V::max(m, x);
      }
      V::store(mx + r * W, m);
    }
  }

  // ctx[r][c0 : c0 + NV*W] += sum over the live panels [pa, pb) of p[r][key] * V[key][c0 : ...].
  // KP = 2: p[r] holds bf16 key pairs, V rows of D pairs (one row per two keys).
  template <int MR, int NV>
  static inline void pv_tile(const float* p, int64_t lds, const float* v, int64_t D, int64_t c0,
                             const uint8_t* live, int64_t pa, int64_t pb, float* ctx) {
    reg acc[MR][NV];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) acc[r][n] = V::load(ctx + r * D + c0 + n * W);
    for (int64_t pp = pa; pp < pb; ++pp) {
      if (!live[pp]) continue;
      const float* pcol = p + (pp - pa) * P / KP;
      const float* vrow = v + pp * P / KP * D + c0;
      for (int j = 0; j < P / KP; ++j) {
        reg vr[NV];
#pragma GCC unroll 4
        for (int n = 0; n < NV; ++n) vr[n] = V::load(vrow + j * D + n * W);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          const reg pr = V::bcast(pcol + r * lds + j);
#pragma GCC unroll 4
          for (int n = 0; n < NV; ++n) acc[r][n] = madd(pr, vr[n], acc[r][n]);
        }
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) V::store(ctx + r * D + c0 + n * W, acc[r][n]);
  }

  // Runs the widest P V tile that fits the remaining columns over rows [0, rows).
  static void pv_step(const float* p, int64_t lds, const float* v, int64_t D, const uint8_t* live, int64_t pa,
                      int64_t pb, float* ctx, int64_t rows) {
    int64_t c0 = 0;
    for (; c0 + NVA * W <= D; c0 += NVA * W)
      for (int64_t r = 0; r < rows; r += MRA)
        pv_tile<MRA, NVA>(p + r * lds, lds, v, D, c0, live, pa, pb, ctx + r * D);
    for (; c0 + NVB * W <= D; c0 += NVB * W)
      for (int64_t r = 0; r < rows; r += MRB)
        pv_tile<MRB, NVB>(p + r * lds, lds, v, D, c0, live, pa, pb, ctx + r * D);
    for (; c0 + NVC * W <= D; c0 += NVC * W)
      for (int64_t r = 0; r < rows; r += MRC)
        pv_tile<MRC, NVC>(p + r * lds, lds, v, D, c0, live, pa, pb, ctx + r * D);
  }

  // Online softmax over one step of keys for G rows (row stride lds; G chains side by side, so that
  // the reductions at the ends of a row overlap other rows' work): s (n scores from score_tile, -inf
  // where masked; their max lane by lane in mx, row stride W) becomes e^(s - new max) (KP = 1, natural
  // units): n fp32 values in place, or (KP = 2, base 2) exp2(s - new max) as n bf16 values in the first
  // half of the row (written behind the reads).
  // alpha[g]: the factor that rescales what row g accumulated so far.
  template <int G>
  static inline void softmax_step(float* s, int64_t lds, const float* mx, int64_t n, float* m, float* l,
                                  float* alpha) {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    reg sub[G], sum[G];
    float m_new[G];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      m_new[g] = std::max(m[g], V::hmax(V::load(mx + g * W)));
      // Nothing to attend to yet: subtracting 0 keeps exp(-inf) = 0 (not exp(-inf - -inf) = NaN).
      const float ref = m_new[g] == kNegInf ? 0.f : m_new[g];
      alpha[g] = m[g] == kNegInf ? 0.f : (KP == 2 ? std::exp2(m[g] - ref) : std::exp(m[g] - ref));
      sub[g] = V::set1(ref);
      sum[g] = V::zero();
    }
    if constexpr (KP == 2) {
      // P only needs bf16 precision: V's shorter exp2; the sum adds the rounded values.
      for (int64_t j = 0; j < n; j += 2 * W) {
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) {
          float* sg = s + g * lds;
          const reg e0 = V::exp2_bf16(V::sub(V::load(sg + j), sub[g]));
          const reg e1 = V::exp2_bf16(V::sub(V::load(sg + j + W), sub[g]));
          sum[g] = V::store_bf16_sum(reinterpret_cast<uint16_t*>(sg) + j, e0, e1, sum[g]);
        }
      }
    } else {
      for (int64_t j = 0; j < n; j += W) {
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) {
          float* sg = s + g * lds;
          const reg e = expv(V::sub(V::load(sg + j), sub[g]));
          V::store(sg + j, e);
          sum[g] = V::add(sum[g], e);
        }
      }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      l[g] = l[g] * alpha[g] + V::hsum(sum[g]);
      m[g] = m_new[g];
    }
  }

  static void task(const AttnArgs& a, int64_t b, int64_t h, int64_t i0, float* scratch) {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    const int64_t D = a.D, L = a.len[b], kc = a.kc;
    const int rows_unit = geometry().rows;
    const int64_t rows = std::min<int64_t>(a.mq, L - i0);
    const int64_t rows_pad = (rows + rows_unit - 1) / rows_unit * rows_unit;
    const int64_t npan = lpad(a, b) / P;
    const uint8_t* live = a.live + a.ws_off[b] / P;
    const float* kbias = a.kbias + a.ws_off[b];
    const float* kt = a.kt + head_ws(a, b, h);
    const float* vv = a.v + head_ws(a, b, h);

    // Scratch: q [rows_pad][D], ctx [rows_pad][D], s [rows_pad][kc], running max m and sum l, the
    // step's max lane by lane mx [rows_pad][W]. (KP = 2: q rows hold D / KP pairs, P rows kc / KP
    // pairs, at the same row strides.)
    float* q = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t(63));
    float* ctx = q + rows_pad * D;
    float* s = ctx + rows_pad * D;
    float* m = s + rows_pad * kc;
    float* l = m + rows_pad;
    float* mx = l + rows_pad;
    for (int64_t r = 0; r < rows_pad; ++r) {
      if (a.pf_rows > 0 && r + a.pf_rows < rows) prefetch_row(a, b, i0 + r + a.pf_rows, h * D);
      if (r < rows)
        load_elems(token(a, b, i0 + r, h * D), a.bf16, D, a.scale, q + r * D);  // (KP = 2 ignores it)
      else
        std::memset(q + r * D, 0, D / KP * sizeof(float));
      m[r] = kNegInf;
      l[r] = 0.f;
    }
    std::memset(ctx, 0, rows_pad * D * sizeof(float));

    const int64_t step = kc / P;
    for (int64_t pa = 0; pa < npan; pa += step) {
      const int64_t pb = std::min(npan, pa + step);
      bool any = false;
      for (int64_t pp = pa; pp < pb; ++pp) any |= live[pp] != 0;
      if (!any) continue;
      for (int64_t r = 0; r < rows_pad; ++r) V::store(mx + r * W, V::set1(kNegInf));
      for (int64_t pp = pa; pp < pb; ++pp) {
        float* sp = s + (pp - pa) * P;
        if (!live[pp]) {
          for (int64_t r = 0; r < rows_pad; ++r)
            for (int j = 0; j < P; ++j) sp[r * kc + j] = kNegInf;
          continue;
        }
        for (int64_t r = 0; r < rows_pad; r += MRS)
          score_tile(q + r * D, kt + pp * D / KP * P, D, kbias + pp * P, a.scale_log2, sp + r * kc, kc,
                     mx + r * W);
      }
      const int64_t n = (pb - pa) * P;
      constexpr int G = geometry().rows % 4 == 0 ? 4 : 2;  // rows per softmax_step (divides rows_pad)
      static_assert(geometry().rows % G == 0, "rows_pad is a multiple of the softmax row group");
      for (int64_t r = 0; r < rows_pad; r += G) {
        float alpha[G];
        softmax_step<G>(s + r * kc, kc, mx + r * W, n, m + r, l + r, alpha);
        for (int g = 0; g < G; ++g) {
          if (alpha[g] != 1.f) {
            const reg al = V::set1(alpha[g]);
            float* c = ctx + (r + g) * D;
            for (int64_t d = 0; d < D; d += W) V::store(c + d, V::mul(V::load(c + d), al));
          }
        }
      }
      pv_step(s, kc, vv, D, live, pa, pb, ctx, rows_pad);
    }

    // Normalise; a row with nothing to attend to (l = 0) gets zeros.
    const int64_t esz = a.bf16 ? 2 : 4;
    for (int64_t r = 0; r < rows; ++r) {
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      char* dst = static_cast<char*>(a.out) + (a.out_off[b] + (i0 + r) * a.ld_out + h * D) * esz;
      if (a.bf16) {
        store_row_bf16(ctx + r * D, D, inv, reinterpret_cast<uint16_t*>(dst));
      } else {
        float* o = reinterpret_cast<float*>(dst);
        for (int64_t d = 0; d < D; ++d) o[d] = ctx[r * D + d] * inv;
      }
    }
  }
};
