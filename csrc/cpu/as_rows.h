#pragma once
// A tensor seen as rows of its last dimension, the layout the CPU row kernels read (add_layer_norm,
// head_logits). Baseline-ISA translation units only (torch headers).
#include "aten_min.h"

namespace bsbert {
namespace cpu {

// t viewed as [rows, N] with unit stride along N (any row stride); copies only if needed.
inline at::Tensor as_rows(const at::Tensor& t, int64_t N) {
  int64_t rows = 1;  // (not reshape(-1, N): ambiguous for an empty tensor)
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  at::Tensor t2 = t.reshape({rows, N});
  if (t2.stride(1) != 1 || (t2.size(0) > 1 && t2.stride(0) < N)) t2 = t2.contiguous();
  return t2;
}

// Elements between rows of an as_rows view (N for a single row, whose stride may be anything).
inline int64_t row_stride(const at::Tensor& t2) { return t2.size(0) > 1 ? t2.stride(0) : t2.size(1); }

}  // namespace cpu
}  // namespace bsbert
