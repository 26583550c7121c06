// CPU implementation of bsbert::add_layer_norm (schema in csrc/ops.cpp):
//   y = LayerNorm(x + residual) over the last dim, times weight, plus bias.
//
// BERT's SelfOutput / Output blocks end in LayerNorm(h + input_tensor); torch runs that as an add
// (reads two tensors, writes one) and a layer_norm (reads it back, writes again). Here every row of
// x and residual is read once, kept in fp32 in an L1-sized scratch row, and y is written once.
//
// This file owns everything that touches torch (checks, layout, threading); the arithmetic is in
// add_layer_norm_kernel.h, instantiated per ISA and picked per call with effective_isa() (so
// BSBERT_CPU_ISA=portable|avx2|avx512 takes effect immediately).
#include "check.h"
#include "aten_min.h"
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/add_layer_norm.h"
#include "cpu/add_layer_norm_op.h"
#include "cpu/as_rows.h"
#include "cpu/thread_buffer.h"
#include "cpu/isa.h"

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "add_layer_norm.cpp is compiled without -fopenmp: at::parallel_for will run on a single thread"
#endif

namespace bsbert {
namespace cpu {
namespace {

// Rows per task >= this many elements / N: below that the fork/join of the thread pool (a microsecond
// or two) costs about what a second thread saves (16 rows of 1024 take ~2.5 us on one Zen 5 core).
// At N = 1024 a second thread joins above 16 rows, so BERT's 128-token sequences use both cores.
constexpr int64_t kMinElemsPerTask = int64_t(1) << 14;

AddLayerNormFn select_rows_fn() {
#if defined(__x86_64__) || defined(_M_X64)  // the AVX translation units are empty elsewhere
  switch (effective_isa()) {
    case Isa::kAvx512Bf16:
    case Isa::kAvx512:
      return add_layer_norm_rows_avx512;
    case Isa::kAvx2:
      return add_layer_norm_rows_avx2;
    default:
      break;
  }
#endif
  return add_layer_norm_rows_portable;
}

void check_affine(const at::Tensor& t, const char* name, int64_t N, at::ScalarType x_dtype,
                  const LayerNormNames& names) {
  BSBERT_CHECK(t.device().is_cpu(), names.op, " (CPU kernel): ", name, " must be on the CPU, got ", t.device());
  BSBERT_CHECK(t.dim() == 1 && t.size(0) == N, names.op, ": ", name, " must have shape [", N, "] (", names.width,
              "), got ", t.sizes());
  BSBERT_CHECK(t.scalar_type() == x_dtype || t.scalar_type() == at::kFloat, names.op, ": ", name,
              " must be float32 or x's dtype (", x_dtype, "), got ", t.scalar_type());
}

}  // namespace

AddLayerNormCall add_layer_norm_prepare(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                        const at::Tensor& bias, double eps, const at::Tensor& y,
                                        const LayerNormNames& names) {
  BSBERT_CHECK(x.device().is_cpu() && residual.device().is_cpu(),
              names.op, " (CPU kernel): x and residual must be on the CPU, got ", x.device(), " and ",
              residual.device());
  const auto dt = x.scalar_type();
  BSBERT_CHECK(dt != at::kHalf,
              names.op, " (CPU kernel): float16 is not supported on the CPU; use float32 or bfloat16");
  BSBERT_CHECK(dt == at::kFloat || dt == at::kBFloat16,
              names.op, " (CPU kernel): x must be float32 or bfloat16, got ", dt);
  BSBERT_CHECK(residual.scalar_type() == dt, names.op, ": residual dtype (", residual.scalar_type(),
              ") must match x's dtype (", dt, ")");
  BSBERT_CHECK(x.dim() >= 1, names.op, ": x must have at least 1 dimension");
  BSBERT_CHECK(residual.sizes() == x.sizes(), names.op, ": residual shape ", residual.sizes(),
              " must equal x's shape ", x.sizes(), " (no broadcasting)");
  BSBERT_CHECK(std::isfinite(eps) && eps >= 0, names.op, ": eps must be finite and >= 0, got ", eps);
  const int64_t N = x.size(-1);
  check_affine(weight, names.weight, N, dt, names);
  check_affine(bias, names.bias, N, dt, names);
  AddLayerNormCall c;
  // The kernels read gamma and beta in one dtype, as stored (BERT's fp32 or bf16 parameters: no
  // per-call conversion); a mixed pair is widened to fp32.
  const bool same = weight.scalar_type() == bias.scalar_type();
  c.gamma = same ? weight.contiguous() : weight.to(at::kFloat).contiguous();
  c.beta = same ? bias.contiguous() : bias.to(at::kFloat).contiguous();
  c.x2 = as_rows(x, N);
  c.r2 = as_rows(residual, N);
  c.rows = c.x2.size(0);

  AddLayerNormArgs& args = c.args;
  args.x = c.x2.data_ptr();
  args.ldx = row_stride(c.x2);
  args.residual = c.r2.data_ptr();
  args.ldr = row_stride(c.r2);
  args.gamma = c.gamma.data_ptr();
  args.beta = c.beta.data_ptr();
  args.y = y.data_ptr();
  args.ldy = N;
  args.N = N;
  args.eps = eps;
  args.bf16 = dt == at::kBFloat16;
  args.affine_bf16 = c.gamma.scalar_type() == at::kBFloat16;
  c.rows_fn = select_rows_fn();
  return c;
}

at::Tensor add_layer_norm_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                              const at::Tensor& bias, double eps) {
  return add_layer_norm_named(x, residual, weight, bias, eps, LayerNormNames{});
}

at::Tensor add_layer_norm_named(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                const at::Tensor& bias, double eps, const LayerNormNames& names) {
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const AddLayerNormCall c = add_layer_norm_prepare(x, residual, weight, bias, eps, y, names);
  if (y.numel() == 0) return y;
  const int64_t grain = std::max<int64_t>(1, kMinElemsPerTask / c.args.N);
  at::parallel_for(0, c.rows, grain, [&](int64_t r0, int64_t r1) {
    // written before it is read: a per-thread buffer rather than a zeroed vector per call
    c.rows_fn(c.args, r0, r1, thread_buffer<struct AlnScratchTag>(add_layer_norm_scratch(c.args.N)));
  });
  return y;
}

}  // namespace cpu
}  // namespace bsbert

TORCH_LIBRARY_IMPL(bsbert, CPU, m) { m.impl("add_layer_norm", &bsbert::cpu::add_layer_norm_cpu); }
