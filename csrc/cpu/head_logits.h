#pragma once
// Plain-C++ interface between bsbert::head_logits (head_logits.cpp, baseline ISA) and its per-ISA row
// kernel (head_logits_kernel.h, instantiated in head_logits_{portable,avx2,avx512}.cpp). No torch
// headers: the ISA translation units compile all they include with their target flags.
#include <cstdint>

namespace bsbert {
namespace cpu {

// y[n * ldy + m] = bias[n] + sum_k x[m * ldx + k] * w[n * K + k], for outputs n < N: a linear with few
// outputs (a task head: question answering's start / end) written as N planes of M values.
struct HeadLogitsArgs {
  const void* x;     // [M rows, K], row stride ldx (elements); fp32 or bf16 (see bf16)
  int64_t ldx;
  const void* w;     // [N, K] contiguous, x's dtype
  const void* bias;  // [N], x's dtype, or nullptr
  void* y;           // N planes of ldy values, x's dtype
  int64_t ldy;
  int64_t N, K;
  bool bf16;         // x, w, bias and y are bf16 (products and sums in fp32, one rounding at the end)
};

// Rows [m0, m1).
using HeadLogitsFn = void (*)(const HeadLogitsArgs&, int64_t m0, int64_t m1);
void head_logits_rows_portable(const HeadLogitsArgs&, int64_t, int64_t);
void head_logits_rows_avx2(const HeadLogitsArgs&, int64_t, int64_t);
void head_logits_rows_avx512(const HeadLogitsArgs&, int64_t, int64_t);

}  // namespace cpu
}  // namespace bsbert
