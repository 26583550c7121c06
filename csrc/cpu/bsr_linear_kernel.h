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
//   store_bf16(uint16_t* p, reg v): round-to-nearest-even fp32 -> bf16, W values (optionally
//   store_bf16_n(p, v, n) for the first n of them; else the tail rounds with f32_to_bf16_scalar),
//   and, only for the bf16 dot-product mode (kWDot): bcast_word(const float* p) (the 32-bit bf16 pair
//   at p in every lane) and dot_bf16(acc, a, b) = acc + a.even*b.even + a.odd*b.odd per lane.
//
// Weight modes (template parameter WM):
//   kWF32    fp32 weights and fp32 x panels, one FMA per k;
//   kWBf16   bf16 weights widened to fp32 in registers (x panels widened to fp32 when packed);
//   kWDot    bf16 weights and bf16 x panels of k-pairs, one dot-product instruction per two k's
//            (AVX512-BF16 vdpbf16ps): twice the FLOPs per instruction of the other two modes.
//
// Computation of one task (output rows [m0, m1) x block row rb), see BsrLinearArgs in bsr_linear.h:
//   for each group of up to KC/b blocks of the block row (K blocking: the group's slice of the packed
//   weight, KC x NR values per column chunk, stays in L1 (fp32) or L2 (bf16 dot products) while it is
//   reused by every row tile; see kKc):
//     for each NR-column chunk of the block (NR = NV * W, divides the block):
//       for each MR-row register tile: acc[MR][NV] (+)= x[rows, group k's] @ Wt[group k's, chunk]
//   then the epilogue adds the bias, applies GELU and writes the valid columns (N tail) in y's dtype.
// The k loop of a block stops at K (the last block column may be partial): x is never read at or
// beyond column K; the packed weights are zero-padded, so a partial block needs no other care.

#define BSB_INLINE inline __attribute__((always_inline))

// k values per weight group: the group's packed weights are reused by every row tile of the task.
// fp32 / widened bf16: 256 (32 KB of fp32 at block 32, in L1). bf16 dot products: 1024 (64 KB at
// block 32, reused from L2): four times fewer partial-sum round trips through the scratch and a
// next-group weight prefetch issued over a longer stretch of compute. Hot, 2 threads, block 32 (M = 128
// / 384): 1024x1024 dense 871 -> 921 / 922 -> 950 GFLOP/s, 4096x1024 at 0.64 835 -> 905 / 813 -> 824,
// 1024x4096 at 0.25 805 -> 874 / 797 -> 845; the bf16 seed-like model 2-5% faster at seq 128 and 384.
// (fp32 at 512 / 1024: within +-3% either way, so it stays.) BSBERT_BSR_KC overrides both (A/B runs).
constexpr int kKc = 256;
constexpr int kKcDot = 1024;

enum WMode { kWF32 = 0, kWBf16 = 1, kWDot = 2 };

// Local min/max: std:: templates instantiated here would be compiled for this unit's ISA and could be
// merged (same mangled name) with a baseline copy elsewhere.
BSB_INLINE int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
BSB_INLINE int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

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
  // Weights of the *next* group (or block row) to bring into L2 while this group is computed from
  // L1: pf_lines 64-byte lines from pf_next, spread over this call's blocks. Without it the first
  // row tile of every group waits on L3 (the packed weights of a layer do not fit in L2).
  const char* pf_next;
  int pf_lines;
};

template <class V>
BSB_INLINE typename V::reg gelu(typename V::reg v);

template <class V, int MR, int MRP, int NV, int WM>
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
  constexpr bool WB = WM != kWF32;
  const int64_t bsz = static_cast<int64_t>(b) * b;
  // floats (fp32 panels) or 32-bit bf16 pairs (dot mode) per block of a panel
  const int64_t xblk = static_cast<int64_t>(WM == kWDot ? b / 2 : b) * MRP;
  const int pf_per_blk = (o.pf_lines + nblk - 1) / nblk;

  for (int j = 0; j < nblk; ++j) {
    for (int l = j * pf_per_blk; l < (j + 1) * pf_per_blk && l < o.pf_lines; ++l)
      __builtin_prefetch(o.pf_next + l * 64, 0, 2);
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
    if constexpr (WM == kWDot) {
      // bf16 layout [k/2][n][2] as int32 pairs (as below); x panel: pair p of row r at xb[p * MRP + r]
      const float* bp = reinterpret_cast<const float*>(static_cast<const int32_t*>(wg) + j * (bsz / 2) + n0);
      for (int k = 0; k < b; k += 2) {
        R bv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) bv[v] = V::load(bp + v * W);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          const R av = V::bcast_word(xb + r);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[r][v] = V::dot_bf16(acc[r][v], av, bv[v]);
        }
        bp += b;
        xb += MRP;
      }
    } else if constexpr (!WB) {
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
template <class V, int R, int MRP, int NV, int WM>
struct RowTail {
  static BSB_INLINE void run(int rows, const float* xpanel, const int32_t* cols, int nblk,
                             const void* wg, int b, int n0, const TileOut& o) {
    if (rows == R)
      ukernel<V, R, MRP, NV, WM>(xpanel, cols, nblk, wg, b, n0, o);
    else
      RowTail<V, R - 1, MRP, NV, WM>::run(rows, xpanel, cols, nblk, wg, b, n0, o);
  }
};
template <class V, int MRP, int NV, int WM>
struct RowTail<V, 0, MRP, NV, WM> {
  static BSB_INLINE void run(int, const float*, const int32_t*, int, const void*, int, int,
                             const TileOut&) {}
};

// Packs activation panels [p0, p1) into micro-panels: xp[p][cb][k][r] = x[row0(p) + r, cb*b + k]
// (rows of panel p: panel_rows in bsr_linear.h)
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
    int64_t m0;
    int rows;
    panel_rows(a, p, MRP, &m0, &rows);
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
          if constexpr (requires { V::store_bf16_n(yp, v, cnt); })
            V::store_bf16_n(yp, v, cnt);  // the path's own rounding (e.g. vcvtneps2bf16) for the tail too
          else
            for (int i = 0; i < cnt; ++i) yp[i] = f32_to_bf16_scalar(tmp[i]);
        } else {
          float* yp = static_cast<float*>(a.y) + m * a.ldy + n_begin + n;
          for (int i = 0; i < cnt; ++i) yp[i] = tmp[i];
        }
      }
    }
  }
}

template <class V, int MR, int NV, int WM>
void tile(const BsrLinearArgs& a, int64_t m0, int64_t m1, int64_t rb, float* c) {
  // m0 is a multiple of MR (= the packing stride of a.xp), or 0 with balanced panels.
  constexpr int NR = NV * V::W;
  const int b = a.block;
  const int64_t s = a.crow[rb];
  const int nblk = static_cast<int>(a.crow[rb + 1] - s);
  const int64_t n_begin = rb * b;
  const int nvalid = (a.N - n_begin) < b ? static_cast<int>(a.N - n_begin) : b;
  const int nfull = nvalid / NR * NR;  // columns in chunks that are entirely inside N
  const int64_t bsz = static_cast<int64_t>(b) * b;
  const int64_t pstride = (a.K + b - 1) / b * b * MR / (WM == kWDot ? 2 : 1);
  const int kc = a.kc > 0 ? a.kc : (WM == kWDot ? kKcDot : kKc);
  const int kcb = kc / b > 0 ? kc / b : 1;
  const int esize = a.y_bf16 ? 2 : 4;
  const int wsize = WM == kWF32 ? 4 : 2;
  const int64_t w_end = static_cast<int64_t>(a.crow[(a.N + b - 1) / b]) * bsz * wsize;  // bytes
  // Balanced panels (run_row_tiles) cover rows [0, M) of this call: m0 = 0, m1 = M.
  const bool balanced = a.balanced_panels > 0;
  const int nrt = balanced ? static_cast<int>(a.balanced_panels)
                           : static_cast<int>((m1 - m0 + MR - 1) / MR);  // row tiles
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
      // The next kcb blocks' weights (this block row's next group, else the next block rows': the
      // packed blocks are stored in that order), split over row tiles 1.. of this chunk.
      const int64_t pf_begin = (s + j1) * bsz * wsize;
      const int64_t pf_bytes = imin(kcb * bsz * wsize, w_end - pf_begin);
      const int64_t pf_total = n0 == 0 && pf_bytes > 0 ? pf_bytes / 64 : 0;
      const int pf_per_tile = nrt > 1 ? static_cast<int>((pf_total + nrt - 2) / (nrt - 1)) : 0;
      for (int t = 0; t < nrt; ++t) {
        int64_t m;
        int rows;
        if (balanced) {
          balanced_panel_rows(a.M, a.balanced_panels, t, &m, &rows);
        } else {
          m = m0 + static_cast<int64_t>(t) * MR;
          rows = static_cast<int>(imin(MR, m1 - m));
        }
        o.c = c + (m - m0) * b + n0;
        o.y = static_cast<char*>(a.y) + (m * a.ldy + n_begin + n0) * esize;
        const float* xpanel = a.xp + (balanced ? t : m / MR) * pstride;
        o.pf_w = t == 0;
        const int64_t l0 = t == 0 ? pf_total : static_cast<int64_t>(t - 1) * pf_per_tile;
        o.pf_lines = static_cast<int>(imax(0, imin(pf_per_tile, pf_total - l0)));
        o.pf_next = static_cast<const char*>(a.w) + pf_begin + l0 * 64;
        if (rows == MR)
          ukernel<V, MR, MR, NV, WM>(xpanel, cols, j1 - j0, wg, b, n0, o);
        else
          RowTail<V, MR - 1, MR, NV, WM>::run(rows, xpanel, cols, j1 - j0, wg, b, n0, o);
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

// BF16 = kWBf16 (widen) or kWDot (dot products) for bf16 weights.
template <class V, int MR32, int MR16, int NVMAX, int BF16 = kWBf16>
void tile_dispatch(const BsrLinearArgs& a, int64_t m0, int64_t m1, int64_t rb, float* c) {
  constexpr int W = V::W;
  const bool nv_full = a.block >= NVMAX * W;
  if (a.w_bf16) {
    if (nv_full)
      tile<V, MR16, NVMAX, BF16>(a, m0, m1, rb, c);
    else
      tile<V, MR16, 1, BF16>(a, m0, m1, rb, c);
  } else {
    if (nv_full)
      tile<V, MR32, NVMAX, kWF32>(a, m0, m1, rb, c);
    else
      tile<V, MR32, 1, kWF32>(a, m0, m1, rb, c);
  }
}

// R = M <= kBsrGemvRows output rows of block row rb: y[r, rb*b ..] = x[r] . W[rb rows]^T + bias (GELU), from x
// packed as one panel of R zero-padded fp32 rows at a.xp (pack_x_impl<R, ...>: [block column][k][R], K padded
// to whole blocks, bf16 widened). Why not the register tiles for so few rows: their R-row tile keeps R x NV
// accumulators (2 per row at AVX2), each a chain of dependent FMAs, walks each block in NR-column chunks
// (half of each 128-byte k row per pass) and broadcasts x from a panel padded to MR rows. Here every block
// is read once, front to back, and a block row's blocks follow each other in memory, so a thread's block
// rows are one sequential stream; R x P interleaved sums of NB = b / W vectors give >= 8 independent FMA
// chains (2 FMAs per cycle x 4 cycles of latency). With P > 1 the P partial sums are added at the end, so
// the rounding differs from the tiles' single k-ordered sum (both within the fp32 bound of a K-long dot
// product). (A software prefetch 256 B - 4 KB ahead of the stream made no difference above this VM's
// noise: the hardware prefetchers follow one sequential stream per core.)
// kWDot (AVX512-BF16): x is then a panel of R rows of 32-bit bf16 k-pairs ([block column][k/2][R], the tiles'
// pair packing with R rows) and each pair row of a block is one vdpbf16ps per vector and row.
template <class V, int WM, int NB, int R>
void gemv_block_row(const BsrLinearArgs& a, int64_t rb, float* out) {
  using Reg = typename V::reg;
  constexpr int W = V::W;
  constexpr int b = NB * W;
  constexpr int P = 8 / (NB * R) > 1 ? 8 / (NB * R) : 1;  // k sums (pair sums for kWDot) kept apart
  constexpr int KS = WM == kWBf16 && P < 2 ? 2 : P;      // k values per widened-bf16 step (whole pairs)
  const int64_t s = a.crow[rb];
  const int nblk = static_cast<int>(a.crow[rb + 1] - s);
  Reg acc[R][P][NB];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
      for (int v = 0; v < NB; ++v) acc[r][p][v] = V::zero();
  for (int j = 0; j < nblk; ++j) {
    // x[r, k] at xb[k * R + r] (kWDot: the pair of k = 2q, 2q + 1 at xb[q * R + r])
    const float* xb = a.xp + static_cast<int64_t>(a.col[s + j]) * (WM == kWDot ? b / 2 : b) * R;
    if constexpr (WM != kWBf16) {
      // one weight row of b 32-bit words per k (fp32) or per k pair (kWDot: bf16 pairs, one vdpbf16ps each)
      constexpr int wrows = WM == kWDot ? b / 2 : b;
      const float* wb = static_cast<const float*>(a.w) + (s + j) * b * wrows;
      for (int k = 0; k < wrows; k += P) {
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p) {
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            Reg av;
            if constexpr (WM == kWDot)
              av = V::bcast_word(xb + (k + p) * R + r);
            else
              av = V::bcast(xb + (k + p) * R + r);
#pragma GCC unroll 8
            for (int v = 0; v < NB; ++v) {
              const Reg wv = V::load(wb + (k + p) * b + v * W);
              if constexpr (WM == kWDot)
                acc[r][p][v] = V::dot_bf16(acc[r][p][v], av, wv);
              else
                acc[r][p][v] = V::fma(av, wv, acc[r][p][v]);
            }
          }
        }
      }
    } else {
      // [k/2][n][2]: pair row q holds (W[n, 2q], W[n, 2q + 1]) as one 32-bit word per column n. With P >= 2
      // the even and odd k go to separate sums; with P = 1 (R x NB >= 8 chains already) both into one.
      const int32_t* wb = static_cast<const int32_t*>(a.w) + (s + j) * (b * b / 2);
      for (int k = 0; k < b; k += KS) {
#pragma GCC unroll 4
        for (int q = 0; q < KS; q += 2) {
#pragma GCC unroll 8
          for (int v = 0; v < NB; ++v) {
            Reg lo, hi;
            V::load_pairs(wb + (k + q) / 2 * b + v * W, lo, hi);
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
              const Reg a0 = V::bcast(xb + (k + q) * R + r), a1 = V::bcast(xb + (k + q + 1) * R + r);
              constexpr int odd = P >= 2 ? 1 : 0;
              const int pe = P >= 2 ? q : 0;
              acc[r][pe][v] = V::fma(a0, lo, acc[r][pe][v]);
              acc[r][pe + odd][v] = V::fma(a1, hi, acc[r][pe + odd][v]);
            }
          }
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NB; ++v) {
      Reg sum = acc[r][0][v];
#pragma GCC unroll 8
      for (int p = 1; p < P; ++p) sum = V::add(sum, acc[r][p][v]);
      V::store(out + r * b + v * W, sum);
    }
  epilogue<V>(a, 0, R, rb, out, 0);
}

// BF16 = kWBf16 (widen) or kWDot (dot products) for bf16 weights, as in tile_dispatch.
template <class V, int R, int BF16>
void gemv_rows(const BsrLinearArgs& a, int64_t rb, float* out) {
  constexpr int W = V::W;
  static_assert(16 % W == 0, "gemv_rows: block 16 must be a whole number of vectors");
  if (a.w_bf16) {
    if (a.block == 16) return gemv_block_row<V, BF16, 16 / W, R>(a, rb, out);
    if (a.block == 32) return gemv_block_row<V, BF16, 32 / W, R>(a, rb, out);
    return gemv_block_row<V, BF16, 64 / W, R>(a, rb, out);
  }
  if constexpr (BF16 != kWDot) {  // (fp32 never takes the dot-product unit: no fp32 copies there)
    if (a.block == 16) return gemv_block_row<V, kWF32, 16 / W, R>(a, rb, out);
    if (a.block == 32) return gemv_block_row<V, kWF32, 32 / W, R>(a, rb, out);
    return gemv_block_row<V, kWF32, 64 / W, R>(a, rb, out);
  }
}

// gemv_block_row for the call's rows (a.M, 1..kBsrGemvRows), block size and weight mode. out: >= M * block floats.
template <class V, int BF16 = kWBf16>
void gemv_dispatch(const BsrLinearArgs& a, int64_t rb, float* out) {
  static_assert(kBsrGemvRows == 3, "gemv_dispatch: one case per row count");
  if (a.M == 1) return gemv_rows<V, 1, BF16>(a, rb, out);
  if (a.M == 2) return gemv_rows<V, 2, BF16>(a, rb, out);
  return gemv_rows<V, 3, BF16>(a, rb, out);
}

// x (M <= kBsrGemvRows rows) as the GEMV's panel of M zero-padded fp32 rows (bf16 widened): the tiles'
// packer (pack_dispatch) with M-row panels, ceil(K / block) * block * M floats.
inline void gemv_pack(const BsrLinearArgs& a, float* xv) {
  if (a.M == 1) return pack_dispatch<1, 1>(a, 0, 1, xv);
  if (a.M == 2) return pack_dispatch<2, 2>(a, 0, 1, xv);
  pack_dispatch<3, 3>(a, 0, 1, xv);
}
