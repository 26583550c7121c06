// CPU implementation of bsbert::head_logits (schema in csrc/ops.cpp): a linear with few outputs (a task
// head on the encoder's output: BertForQuestionAnswering's qa_outputs, 1024 -> 2) written as N planes,
//   y[n, ...] = x[..., :] @ weight[n, :] + bias[n],
// so that the QA head's start and end logits are y[0] and y[1], contiguous, with no split / copy after it.
// Why an op of its own: after the encoder op has streamed ~150 MB of weights through the caches, torch's
// F.linear for this [S, 1024] x [1024, 2] product costs ~215 us in a bf16 seq-128 forward loop, and
// bsbert's block-sparse GEMM (one 32-wide block row for 2 outputs) needs a packed copy of the weight that
// must be rebuilt whenever the module's weight changes. This reads the weight as it is, every call.
//
// This file owns everything that touches torch (checks, layout, threading); the arithmetic is in
// head_logits_kernel.h, instantiated per ISA and picked per call with effective_isa().
#include "check.h"
#include "aten_min.h"
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/as_rows.h"
#include "cpu/head_logits.h"
#include "cpu/isa.h"

namespace bsbert {
namespace cpu {
namespace {

// Rows per task >= this many multiply-adds / (N * K): smaller tasks cost more in fork/join than a
// second thread saves (BERT-large's QA head, N * K = 2048: 32 rows a task, so 128 tokens use 2 cores).
constexpr int64_t kMinMacsPerTask = int64_t(1) << 16;

HeadLogitsFn select_rows_fn() {
#if defined(__x86_64__) || defined(_M_X64)  // the AVX translation units are empty elsewhere
  switch (effective_isa()) {
    case Isa::kAvx512Bf16:
    case Isa::kAvx512:
      return head_logits_rows_avx512;
    case Isa::kAvx2:
      return head_logits_rows_avx2;
    default:
      break;
  }
#endif
  return head_logits_rows_portable;
}

}  // namespace

at::Tensor head_logits_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  BSBERT_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
               "head_logits (CPU kernel): x and weight must be on the CPU, got ", x.device(), " and ",
               weight.device());
  const auto dt = x.scalar_type();
  BSBERT_CHECK(dt == at::kFloat || dt == at::kBFloat16, "head_logits (CPU kernel): x must be float32 or bfloat16, got ",
               dt);
  BSBERT_CHECK(x.dim() >= 1, "head_logits: x must have at least 1 dimension");
  BSBERT_CHECK(weight.dim() == 2 && weight.size(1) == x.size(-1), "head_logits: weight must be [out_features, ",
               x.size(-1), "] (x's last dim), got shape ", weight.sizes());
  BSBERT_CHECK(weight.scalar_type() == dt, "head_logits: weight dtype (", weight.scalar_type(),
               ") must match x's dtype (", dt, ")");
  const int64_t N = weight.size(0), K = weight.size(1);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    BSBERT_CHECK(bias->device().is_cpu(), "head_logits (CPU kernel): bias must be on the CPU, got ", bias->device());
    BSBERT_CHECK(bias->dim() == 1 && bias->size(0) == N, "head_logits: bias must have shape [", N, "], got ",
                 bias->sizes());
    BSBERT_CHECK(bias->scalar_type() == dt, "head_logits: bias dtype (", bias->scalar_type(),
                 ") must match x's dtype (", dt, ")");
  }
  int64_t M = 1;  // (not reshape(-1, K): ambiguous for K = 0)
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  std::vector<int64_t> shape{N};
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor y = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return y;
  if (K == 0) {  // empty sums: the bias alone
    if (!has_bias) return y.zero_();
    std::vector<int64_t> bshape(shape.size(), 1);
    bshape[0] = N;
    return y.copy_(bias->view(bshape).expand(shape));
  }
  const at::Tensor x2 = as_rows(x, K);
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  HeadLogitsArgs a;
  a.x = x2.data_ptr();
  a.ldx = row_stride(x2);
  a.w = w.data_ptr();
  a.bias = has_bias ? b.data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.ldy = M;
  a.N = N;
  a.K = K;
  a.bf16 = dt == at::kBFloat16;
  const HeadLogitsFn fn = select_rows_fn();
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerTask / (N * K));
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) { fn(a, m0, m1); });
  return y;
}

}  // namespace cpu
}  // namespace bsbert

TORCH_LIBRARY_IMPL(bsbert, CPU, m) { m.impl("head_logits", &bsbert::cpu::head_logits_cpu); }
