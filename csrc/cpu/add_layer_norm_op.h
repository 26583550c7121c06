#pragma once
// The torch-facing half of add_layer_norm (add_layer_norm.cpp), shared with ops that end in it
// (bsr_linear_add_layer_norm in bsr_linear.cpp). Baseline-ISA translation units only.
#include "aten_min.h"

#include "cpu/add_layer_norm.h"

namespace bsbert {
namespace cpu {

// One add_layer_norm after its checks: the row kernel of this CPU and its arguments, with the tensors
// those point into kept alive.
struct AddLayerNormCall {
  AddLayerNormArgs args;
  AddLayerNormFn rows_fn = nullptr;
  int64_t rows = 0;
  at::Tensor x2, r2, gamma, beta;
};

// The words an add + LayerNorm error uses: the op the user called and its argument names. The fused
// GEMM op (bsr_linear_add_layer_norm) calls its LayerNorm parameters ln_weight / ln_bias and its width
// out_features; an error naming add_layer_norm's "weight" would point at the GEMM's weight instead.
struct LayerNormNames {
  const char* op = "add_layer_norm";
  const char* weight = "weight";
  const char* bias = "bias";
  const char* width = "the last dim of x";
};

// Checks x / residual / weight / bias (add_layer_norm's errors) and describes y = LayerNorm(x +
// residual) into y (x's shape, contiguous; may be x itself: a row is read whole before it is written).
AddLayerNormCall add_layer_norm_prepare(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                        const at::Tensor& bias, double eps, const at::Tensor& y,
                                        const LayerNormNames& names = {});

at::Tensor add_layer_norm_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                              const at::Tensor& bias, double eps);
at::Tensor add_layer_norm_named(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                const at::Tensor& bias, double eps, const LayerNormNames& names);

}  // namespace cpu
}  // namespace bsbert
