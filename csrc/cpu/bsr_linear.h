#pragma once
// Plain-C++ interface between the torch-facing op (bsr_linear.cpp, compiled for the baseline ISA) and
// the per-ISA kernel translation units (bsr_linear_{portable,avx2,avx512}.cpp). No torch headers here:
// the ISA translation units compile everything they include with their target flags, so they must not
// instantiate inline code that other translation units share.
#include <cstdint>

namespace bsbert {
namespace cpu {

struct BsrLinearArgs {
  const float* x;        // fp32 activations, row m at x + m * ldx, K valid columns (never read beyond)
  const void* xraw;      // same for bf16 activations (x is then unused)
  int64_t ldx;
  float* xp;             // packed activations (pack step output): ceil(M/mr) panels of
                         // [ceil(K/block)][block][mr] fp32, mr = the path's register-tile rows
  int64_t M, N, K;       // logical sizes
  int block;             // 16, 32 or 64
  const int32_t* crow;   // [ceil(N/block) + 1]
  const int32_t* col;    // [nnzb], validated < ceil(K/block)
  const void* w;         // packed blocks (bsbert/ops/packing.py: pack_cpu)
  bool w_bf16;           // false: fp32 [nnzb][k][n]; true: bf16 [nnzb][k/2][n][2]
  const float* bias;     // fp32, zero-padded to ceil(N/block)*block, or nullptr
  bool gelu;
  void* y;               // output rows at y + m * ldy (elements), N valid columns
  int64_t ldy;
  bool y_bf16;
  // 0: panel p of xp holds rows [p*mr, p*mr + mr). > 0 (row-split tiles only, where the tile covers
  // rows [0, M)): M is cut into this many near-equal panels (sizes M/n and M/n + 1, in that order of
  // rows; see balanced_panel_rows), each packed like a short panel of mr rows.
  int64_t balanced_panels;
  // k values per weight group (the kernel's L1/L2 blocking of a block row, a multiple of block);
  // 0 = the path's default (bsr_linear_kernel.h: kKc, kKcDot).
  int kc;
};

// First row and row count of balanced panel p (BsrLinearArgs::balanced_panels = n): the first M % n
// panels get one row more. Why: 64 rows per thread (M = 128 on two threads) are 5 x 12 + 4 in
// register tiles of 12, and the 4-row tile runs at about half the rate per row; 11,11,11,11,10,10
// keeps every tile near full height (1.5-2.6% faster at M = 100..256, 2 threads).
// static: each ISA translation unit keeps its own copy (no cross-ISA merging of inline code).
static inline void balanced_panel_rows(int64_t M, int64_t n, int64_t p, int64_t* row0, int* rows) {
  const int64_t q = M / n, e = M % n;
  *row0 = p * q + (p < e ? p : e);
  *rows = static_cast<int>(q + (p < e ? 1 : 0));
}

// Rows [row0, row0 + rows) of x that panel p holds: mr-row panels (the last one short), or balanced ones.
static inline void panel_rows(const BsrLinearArgs& a, int64_t p, int mr, int64_t* row0, int* rows) {
  if (a.balanced_panels > 0) {
    balanced_panel_rows(a.M, a.balanced_panels, p, row0, rows);
    return;
  }
  *row0 = p * mr;
  const int64_t left = a.M - *row0;
  *rows = left < mr ? static_cast<int>(left) : mr;
}

// Computes output rows [m0, m1) of block row rb (columns rb*block .. min(N, (rb+1)*block)), including
// the bias + GELU epilogue. scratch: >= (m1 - m0) * block floats (any alignment: the kernels use unaligned loads and stores).
// Packs panels [p0, p1) of x into xp (see BsrLinearArgs::xp); must run before the tiles.
using BsrPackFn = void (*)(const BsrLinearArgs&, int64_t p0, int64_t p1, float* xp);
void bsr_pack_portable(const BsrLinearArgs&, int64_t, int64_t, float*);
void bsr_pack_avx2(const BsrLinearArgs&, int64_t, int64_t, float*);
void bsr_pack_avx512(const BsrLinearArgs&, int64_t, int64_t, float*);
// bf16 only (w_bf16): x packed as 32-bit k-pairs, [ceil(K/block)][block/2][mr] words per panel.
void bsr_pack_avx512bf16(const BsrLinearArgs&, int64_t, int64_t, float*);

using BsrTileFn = void (*)(const BsrLinearArgs&, int64_t m0, int64_t m1, int64_t rb, float* scratch);

void bsr_tile_portable(const BsrLinearArgs&, int64_t, int64_t, int64_t, float*);
void bsr_tile_avx2(const BsrLinearArgs&, int64_t, int64_t, int64_t, float*);
void bsr_tile_avx512(const BsrLinearArgs&, int64_t, int64_t, int64_t, float*);
void bsr_tile_avx512bf16(const BsrLinearArgs&, int64_t, int64_t, int64_t, float*);

// M <= kBsrGemvRows (bsr_linear.cpp: run_gemv; bsr_linear_kernel.h: gemv_block_row): BsrGemvPackFn writes
// x's M rows as one panel of ceil(K/block)*block*M fp32 values (zero-padded, bf16 widened), then BsrGemvFn
// computes the output columns of block row rb from it (a.xp = that panel; scratch >= M * block floats).
constexpr int kBsrGemvRows = 3;
using BsrGemvPackFn = void (*)(const BsrLinearArgs&, float* xv);
using BsrGemvFn = void (*)(const BsrLinearArgs&, int64_t rb, float* scratch);
void bsr_gemv_pack_portable(const BsrLinearArgs&, float*);
void bsr_gemv_pack_avx2(const BsrLinearArgs&, float*);
void bsr_gemv_pack_avx512(const BsrLinearArgs&, float*);
void bsr_gemv_portable(const BsrLinearArgs&, int64_t, float*);
void bsr_gemv_avx2(const BsrLinearArgs&, int64_t, float*);
void bsr_gemv_avx512(const BsrLinearArgs&, int64_t, float*);
// bf16 only: x packed as k-pairs, vdpbf16ps (kWDot)
void bsr_gemv_pack_avx512bf16(const BsrLinearArgs&, float*);
void bsr_gemv_avx512bf16(const BsrLinearArgs&, int64_t, float*);

// Rows of the register tile of each path (the M tile is a multiple of it).
int bsr_mr_portable(bool w_bf16);
int bsr_mr_avx2(bool w_bf16);
int bsr_mr_avx512(bool w_bf16);
int bsr_mr_avx512bf16();
// The register-tile rows of the path bsr_linear takes here now (BSBERT_CPU_ISA applied): the row split
// starts at 2 tiles per thread, so tests that probe its edges ask rather than keep a copy of the table.
int bsr_register_rows(bool w_bf16);
// Rows up to which bsr_linear takes the GEMV kernel here now (kBsrGemvRows), or 0 where it is off
// (BSBERT_CPU_ISA and BSBERT_BSR_GEMV applied): what `python -m bsbert.info` reports.
int bsr_gemv_rows(bool w_bf16);

}  // namespace cpu
}  // namespace bsbert
