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
};

// Computes output rows [m0, m1) of block row rb (columns rb*block .. min(N, (rb+1)*block)), including
// the bias + GELU epilogue. scratch: >= (m1 - m0) * block floats, 64-byte aligned.
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

// Rows of the register tile of each path (the M tile is a multiple of it).
int bsr_mr_portable(bool w_bf16);
int bsr_mr_avx2(bool w_bf16);
int bsr_mr_avx512(bool w_bf16);
int bsr_mr_avx512bf16();

}  // namespace cpu
}  // namespace bsbert
