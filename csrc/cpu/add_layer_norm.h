#pragma once
// Plain-C++ interface between the torch-facing op (add_layer_norm.cpp) and its per-ISA row kernels
// (add_layer_norm_{portable,avx2,avx512}.cpp). No torch headers: the ISA translation units compile
// everything they include with their own target flags.
#include <cstdint>

namespace bsbert {
namespace cpu {

struct AddLayerNormArgs {
  const void* x;         // row i at x + i * ldx (elements); fp32 or bf16 (see bf16)
  int64_t ldx;
  const void* residual;  // same dtype and row length as x
  int64_t ldr;
  const void* gamma;     // [N], fp32 or bf16 (see affine_bf16)
  const void* beta;      // [N], same dtype as gamma
  void* y;               // output rows at y + i * ldy, x's dtype
  int64_t ldy;
  int64_t N;             // row length (> 0)
  double eps;
  bool bf16;             // x, residual and y are bf16 (math is fp32 either way)
  bool affine_bf16;      // gamma and beta are bf16 (only with bf16 x: the op allows x's dtype or fp32)
};

// Normalises rows [r0, r1): y = LayerNorm(x + residual) * gamma + beta. scratch holds one row of
// x + residual in fp32 between the passes, then gamma and beta widened to fp32 when they are bf16:
// add_layer_norm_scratch(N) floats.
using AddLayerNormFn = void (*)(const AddLayerNormArgs&, int64_t r0, int64_t r1, float* scratch);
void add_layer_norm_rows_portable(const AddLayerNormArgs&, int64_t, int64_t, float*);
void add_layer_norm_rows_avx2(const AddLayerNormArgs&, int64_t, int64_t, float*);
void add_layer_norm_rows_avx512(const AddLayerNormArgs&, int64_t, int64_t, float*);

// Three rows, each rounded up to the widest vector (16 floats): the kernels store whole vectors.
inline int64_t add_layer_norm_scratch(int64_t N) { return 3 * ((N + 15) / 16 * 16); }

}  // namespace cpu
}  // namespace bsbert
