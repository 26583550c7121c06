// The block-sparse GEMM micro-kernel and tile driver, written once over a tiny SIMD wrapper `V`.
//
// Included by each per-ISA translation unit (bsr_linear_portable.cpp, bsr_linear_avx2.cpp,
// bsr_linear_avx512.cpp) *inside an anonymous namespace*, after that unit has defined its wrapper and
// switched its target ISA (#pragma GCC target). Internal linkage keeps the differently-compiled copies
// apart (no ODR clash between the AVX2 and AVX-512 instantiations).
//
// The wrapper V provides:
//   reg, W (lanes), zero(), load/store (unaligned fp32), bcast(const float*), set1(float),
//   fma(a, b, c) = a*b + c, add, mul, min, max, div,
//   load_pairs(const int32_t* p, reg& lo, reg& hi): W bf16 pairs -> even (lo) and odd (hi) elements,
//   store_bf16(uint16_t* p, reg v): round-to-nearest-even fp32 -> bf16, W values.
//
// Computation of one task (output rows [m0, m1) x block row rb), see BsrLinearArgs in bsr_linear.h:
//   for each group of up to KC/b blocks of the block row (K blocking: the group's slice of the packed
//   weight, KC x NR floats per column chunk, stays in L1 while it is reused by every row tile):
//     for each NR-column chunk of the block (NR = NV * W, divides the block):
//       for each MR-row register tile: acc[MR][NV] (+)= x[rows, group k's] @ Wt[group k's, chunk]
//   then the epilogue adds the bias, applies GELU and writes the valid columns (N tail) in y's dtype.
// The k loop of a block stops at K (the last block column may be partial): x is never read at or
// beyond column K; the packed weights are zero-padded, so a partial block needs no other care.

#define BSB_INLINE inline __attribute__((always_inline))

constexpr int kKc = 256;  // k values per weight group (L1 blocking)

// Where a register tile goes: partial sums to the scratch c (ldc = block), or, after the last group
// of blocks of a column chunk that is entirely inside N, + bias, GELU and straight into y.
struct TileOut {
  float* c;
  bool acc_in;         // start from the partial sums in c
  bool to_y;           // last group and all NR columns valid: epilogue + store to y
  const float* bias;   // bias of the chunk's first column (padded vector) or nullptr
  bool gelu;
  void* y;             // element (row 0, chunk column 0) of y
  int64_t ldy;
  bool y_bf16;
  bool pf_w;           // prefetch the next block's weights (first row tile of a chunk)
};

template <class V>
BSB_INLINE typename V::reg gelu(typename V::reg v);

template <class V, int MR, int MRP, int NV, bool WB>
BSB_INLINE void ukernel(const float* __restrict xpanel, const int32_t* __restrict cols, int nblk,
                        const void* __restrict wg, int b, int n0, const TileOut& o) {
  float* __restrict c = o.c;
  const int ldc = b;
  const bool acc_in = o.acc_in;
  // xpanel: packed activations of MRP rows, [block column][k][MRP] (see pack_x); MR <= MRP rows used.
  using R = typename V::reg;
  constexpr int W = V::W;
  R acc[MR][NV];
  if (acc_in) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = V::load(c + r * ldc + v * W);
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  }
  const int64_t bsz = static_cast<int64_t>(b) * b;
  const int64_t xblk = static_cast<int64_t>(b) * MRP;

  for (int j = 0; j < nblk; ++j) {
    const float* xb = xpanel + cols[j] * xblk;
    if (j + 1 < nblk) {  // the next block of x panels is scattered (sparse columns): fetch it early
      const char* nx = reinterpret_cast<const char*>(xpanel + cols[j + 1] * xblk);
      for (int64_t off = 0; off < xblk * 4; off += 64) __builtin_prefetch(nx + off, 0, 3);
      if (o.pf_w) {  // first row tile of the chunk: the weights still come from L2/L3
        // fp32: rows of b floats; bf16: pair rows of b int32 pairs; column n0 at n0 * 4 bytes in both
        const char* nw = static_cast<const char*>(wg) + (j + 1) * bsz * (WB ? 2 : 4) + n0 * 4;
        const int64_t row_bytes = static_cast<int64_t>(b) * 4;
        const int rows = WB ? b / 2 : b;
        for (int k = 0; k < rows; ++k) __builtin_prefetch(nw + k * row_bytes, 0, 3);
      }
    }
    if constexpr (!WB) {
      // fp32 layout [k][n]: row k of the block holds W[n, k] for n = 0..b-1.
      const float* bp = static_cast<const float*>(wg) + j * bsz + n0;
#pragma GCC unroll 2
      for (int k = 0; k < b; ++k) {
        R bv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) bv[v] = V::load(bp + v * W);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          const R av = V::bcast(xb + r);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(av, bv[v], acc[r][v]);
        }
        bp += b;
        xb += MRP;
      }
    } else {
      // bf16 layout [k/2][n][2], read as int32 pairs: pair row p holds (W[n, 2p], W[n, 2p+1]).
      const int32_t* bp = static_cast<const int32_t*>(wg) + j * (bsz / 2) + n0;
      for (int k = 0; k < b; k += 2) {
        R lo[NV], hi[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) V::load_pairs(bp + v * W, lo[v], hi[v]);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          const R a0 = V::bcast(xb + r);
          const R a1 = V::bcast(xb + MRP + r);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) {
            acc[r][v] = V::fma(a0, lo[v], acc[r][v]);
            acc[r][v] = V::fma(a1, hi[v], acc[r][v]);
          }
        }
        bp += b;
        xb += 2 * MRP;
      }
    }
  }
  if (!o.to_y) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) V::store(c + r * ldc + v * W, acc[r][v]);
    return;
  }
  if (o.bias) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const R bv = V::load(o.bias + v * W);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) acc[r][v] = V::add(acc[r][v], bv);
    }
  }
  if (o.gelu) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = gelu<V>(acc[r][v]);
  }
  if (o.y_bf16) {
    uint16_t* y = static_cast<uint16_t*>(o.y);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) V::store_bf16(y + r * o.ldy + v * W, acc[r][v]);
  } else {
    float* y = static_cast<float*>(o.y);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) V::store(y + r * o.ldy + v * W, acc[r][v]);
  }
}

// Row-tail dispatch: runs ukernel<R> when rows == R, else tries R - 1.
template <class V, int R, int MRP, int NV, bool WB>
struct RowTail {
  static BSB_INLINE void run(int rows, const float* xpanel, const int32_t* cols, int nblk,
                             const void* wg, int b, int n0, const TileOut& o) {
    if (rows == R)
      ukernel<V, R, MRP, NV, WB>(xpanel, cols, nblk, wg, b, n0, o);
    else
      RowTail<V, R - 1, MRP, NV, WB>::run(rows, xpanel, cols, nblk, wg, b, n0, o);
  }
};
template <class V, int MRP, int NV, bool WB>
struct RowTail<V, 0, MRP, NV, WB> {
  static BSB_INLINE void run(int, const float*, const int32_t*, int, const void*, int, int,
                             const TileOut&) {}
};

// Packs activation rows [p0*MRP, p1*MRP) into micro-panels: xp[p][cb][k][r] = x[p*MRP + r, cb*b + k]
// (fp32; zero where the row is >= M or the column is >= K), so the micro-kernel's broadcasts of one k
// are MRP consecutive floats and a block of a panel is one contiguous b*MRP run. x is never read at or
// beyond column K or row M.
template <int MRP, bool XB>
void pack_x_impl(const BsrLinearArgs& a, int64_t p0, int64_t p1, float* xp) {
  const int b = a.block;
  const int64_t nbc = (a.K + b - 1) / b;
  const int64_t pstride = nbc * b * MRP;
  for (int64_t p = p0; p < p1; ++p) {
    float* dst = xp + p * pstride;
    const int64_t m0 = p * MRP;
    const int rows = (a.M - m0) < MRP ? static_cast<int>(a.M - m0) : MRP;
    for (int64_t k0 = 0; k0 < nbc * b; k0 += 8) {
      const int64_t kn = (a.K - k0) < 8 ? (a.K - k0) : 8;
      float tmp[8][MRP];
      for (int r = 0; r < MRP; ++r) {
        if (r < rows && kn == 8) {
          if constexpr (XB) {
            const uint16_t* src = static_cast<const uint16_t*>(a.xraw) + (m0 + r) * a.ldx + k0;
            for (int kk = 0; kk < 8; ++kk) {
              const uint32_t u = static_cast<uint32_t>(src[kk]) << 16;
              __builtin_memcpy(&tmp[kk][r], &u, 4);
            }
          } else {
            const float* src = a.x + (m0 + r) * a.ldx + k0;
            for (int kk = 0; kk < 8; ++kk) tmp[kk][r] = src[kk];
          }
        } else {
          for (int kk = 0; kk < 8; ++kk) {
            float v = 0.f;
            if (r < rows && kk < kn) {
              if constexpr (XB) {
                const uint32_t u = static_cast<uint32_t>(
                                       static_cast<const uint16_t*>(a.xraw)[(m0 + r) * a.ldx + k0 + kk])
                                   << 16;
                __builtin_memcpy(&v, &u, 4);
              } else {
                v = a.x[(m0 + r) * a.ldx + k0 + kk];
              }
            }
            tmp[kk][r] = v;
          }
        }
      }
      __builtin_memcpy(dst + k0 * MRP, &tmp[0][0], sizeof(tmp));
    }
  }
}

// erf(x) as a rational approximation on [-4, 4] (odd degree-13 / even degree-8 polynomials, the
// coefficients Eigen and XLA use for float); max abs error ~1e-7, |x| >= 4 gives +-1 exactly in fp32.
template <class V>
BSB_INLINE typename V::reg erf_approx(typename V::reg xin) {
  using R = typename V::reg;
  const R x = V::min(V::max(xin, V::set1(-4.f)), V::set1(4.f));
  const R x2 = V::mul(x, x);
  R p = V::fma(x2, V::set1(-2.72614225801306e-10f), V::set1(2.77068142495902e-08f));
  p = V::fma(x2, p, V::set1(-2.10102402082508e-06f));
  p = V::fma(x2, p, V::set1(-5.69250639462346e-05f));
  p = V::fma(x2, p, V::set1(-7.34990630326855e-04f));
  p = V::fma(x2, p, V::set1(-2.95459980854025e-03f));
  p = V::fma(x2, p, V::set1(-1.60960333262415e-02f));
  p = V::mul(x, p);
  R q = V::fma(x2, V::set1(-1.45660718464996e-05f), V::set1(-2.13374055278905e-04f));
  q = V::fma(x2, q, V::set1(-1.68282697438203e-03f));
  q = V::fma(x2, q, V::set1(-7.37332916720468e-03f));
  q = V::fma(x2, q, V::set1(-1.42647390514189e-02f));
  return V::div(p, q);
}

// BERT's exact GELU: 0.5 * v * (1 + erf(v / sqrt(2))).
template <class V>
BSB_INLINE typename V::reg gelu(typename V::reg v) {
  const auto e = erf_approx<V>(V::mul(v, V::set1(0.70710678118654752f)));
  return V::mul(V::mul(v, V::set1(0.5f)), V::add(e, V::set1(1.f)));
}

BSB_INLINE uint16_t f32_to_bf16_scalar(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Epilogue from the scratch c for columns [nstart, nvalid) of the block row (N tail chunk, empty rows).
template <class V>
void epilogue(const BsrLinearArgs& a, int64_t m0, int64_t m1, int64_t rb, const float* c, int nstart) {
  using R = typename V::reg;
  constexpr int W = V::W;
  const int b = a.block;
  const int64_t n_begin = rb * b;
  const int64_t nrem = a.N - n_begin;
  const int nvalid = nrem < b ? static_cast<int>(nrem) : b;
  const float* bias = a.bias ? a.bias + n_begin : nullptr;  // padded: whole block readable
  for (int64_t m = m0; m < m1; ++m) {
    const float* cr = c + (m - m0) * b;
    for (int n = nstart; n < nvalid; n += W) {
      R v = V::load(cr + n);  // n + W <= b: the scratch row is b wide
      if (bias) v = V::add(v, V::load(bias + n));
      if (a.gelu) v = gelu<V>(v);
      if (n + W <= nvalid) {
        if (a.y_bf16)
          V::store_bf16(static_cast<uint16_t*>(a.y) + m * a.ldy + n_begin + n, v);
        else
          V::store(static_cast<float*>(a.y) + m * a.ldy + n_begin + n, v);
      } else {  // N tail: only the valid columns
        alignas(64) float tmp[W];
        V::store(tmp, v);
        const int cnt = nvalid - n;
        if (a.y_bf16) {
          uint16_t* yp = static_cast<uint16_t*>(a.y) + m * a.ldy + n_begin + n;
          for (int i = 0; i < cnt; ++i) yp[i] = f32_to_bf16_scalar(tmp[i]);
        } else {
          float* yp = static_cast<float*>(a.y) + m * a.ldy + n_begin + n;
          for (int i = 0; i < cnt; ++i) yp[i] = tmp[i];
        }
      }
    }
  }
}

template <class V, int MR, int NV, bool WB>
void tile(const BsrLinearArgs& a, int64_t m0, int64_t m1, int64_t rb, float* c) {
  // m0 is a multiple of MR (= the packing stride of a.xp).
  constexpr int NR = NV * V::W;
  const int b = a.block;
  const int64_t s = a.crow[rb];
  const int nblk = static_cast<int>(a.crow[rb + 1] - s);
  const int64_t n_begin = rb * b;
  const int nvalid = (a.N - n_begin) < b ? static_cast<int>(a.N - n_begin) : b;
  const int nfull = nvalid / NR * NR;  // columns in chunks that are entirely inside N
  const int64_t bsz = static_cast<int64_t>(b) * b;
  const int64_t pstride = (a.K + b - 1) / b * b * MR;
  const int kcb = kKc / b > 0 ? kKc / b : 1;
  const int esize = a.y_bf16 ? 2 : 4;
  if (nblk == 0) {
    const int64_t total = (m1 - m0) * b;
    for (int64_t i = 0; i < total; ++i) c[i] = 0.f;
    epilogue<V>(a, m0, m1, rb, c, 0);
    return;
  }
  for (int j0 = 0; j0 < nblk; j0 += kcb) {
    const int j1 = (j0 + kcb < nblk) ? j0 + kcb : nblk;
    const void* wg = a.w_bf16
                         ? static_cast<const void*>(static_cast<const uint16_t*>(a.w) + (s + j0) * bsz)
                         : static_cast<const void*>(static_cast<const float*>(a.w) + (s + j0) * bsz);
    const int32_t* cols = a.col + s + j0;
    for (int n0 = 0; n0 < nvalid; n0 += NR) {
      TileOut o;
      o.acc_in = j0 > 0;
      o.to_y = j1 == nblk && n0 < nfull;
      o.bias = a.bias ? a.bias + n_begin + n0 : nullptr;
      o.gelu = a.gelu;
      o.ldy = a.ldy;
      o.y_bf16 = a.y_bf16;
      int64_t m = m0;
      for (; m < m1; m += MR) {
        o.c = c + (m - m0) * b + n0;
        o.y = static_cast<char*>(a.y) + (m * a.ldy + n_begin + n0) * esize;
        const float* xpanel = a.xp + (m / MR) * pstride;
        o.pf_w = m == m0;
        if (m + MR <= m1)
          ukernel<V, MR, MR, NV, WB>(xpanel, cols, j1 - j0, wg, b, n0, o);
        else
          RowTail<V, MR - 1, MR, NV, WB>::run(static_cast<int>(m1 - m), xpanel, cols, j1 - j0, wg, b,
                                              n0, o);
      }
    }
  }
  if (nfull < nvalid) epilogue<V>(a, m0, m1, rb, c, nfull);
}

// Picks the instantiation: NV column vectors (NR = NV * W must divide the block), MR rows per dtype.
template <int MR32, int MR16>
void pack_dispatch(const BsrLinearArgs& a, int64_t p0, int64_t p1, float* xp) {
  if (a.w_bf16)
    pack_x_impl<MR16, true>(a, p0, p1, xp);
  else
    pack_x_impl<MR32, false>(a, p0, p1, xp);
}

template <class V, int MR32, int MR16, int NVMAX>
void tile_dispatch(const BsrLinearArgs& a, int64_t m0, int64_t m1, int64_t rb, float* c) {
  constexpr int W = V::W;
  const bool nv_full = a.block >= NVMAX * W;
  if (a.w_bf16) {
    if (nv_full)
      tile<V, MR16, NVMAX, true>(a, m0, m1, rb, c);
    else
      tile<V, MR16, 1, true>(a, m0, m1, rb, c);
  } else {
    if (nv_full)
      tile<V, MR32, NVMAX, false>(a, m0, m1, rb, c);
    else
      tile<V, MR32, 1, false>(a, m0, m1, rb, c);
  }
}
