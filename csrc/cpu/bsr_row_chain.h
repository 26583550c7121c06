#pragma once
// A chain of block-sparse linears over the same rows, run in one parallel region (bsr_linear.cpp).
//
// With the row split every thread computes whole output rows, and each of BERT's attention output,
// FFN in, FFN out and the next layer's QKV reads only the same rows of the linears before it. So a
// thread can run all of them on its rows back to back: one fork/join per chain instead of one per
// linear, and no thread waits at the end of each GEMM for the other's slower rows (perf had each
// thread 2.5-5.9% of its time in those joins at bf16 seq 128). Values: the same kernels on the same
// row tiles as bsr_linear / bsr_linear_add_layer_norm, bit for bit.
//
// Usage: check applies(x), add the linears in order (each returns its output tensor, allocated now and
// written by run(); a later linear may take it as x or residual), then run(). Baseline-ISA units only.
//
// A chain can run again (bert_encoder keeps its chains between calls): it reads its tensors' current
// values through the pointers taken when they were added, so it stays right as long as the same
// tensors (same storage, shapes and strides) are meant, config() is unchanged, and refresh_biases()
// has run since a bias may have changed (the biases are copied to fp32 when added). The packed
// weights' indices are checked when added only.
#include "aten_min.h"

#include <array>
#include <memory>
#include <optional>

namespace bsbert {
namespace cpu {

class BsrRowChain {
 public:
  BsrRowChain();
  ~BsrRowChain();
  BsrRowChain(const BsrRowChain&) = delete;
  BsrRowChain& operator=(const BsrRowChain&) = delete;

  // Whether linears on x's rows (its dtype, this CPU, torch's thread count) run on row tiles. A
  // linear with no rows, no outputs or no inputs (M, N or K = 0) is not chained either.
  static bool applies(const at::Tensor& x);

  // y = x @ W^T + bias (then GELU); bsr_linear's checks and errors. out (if defined): where y goes, a
  // contiguous tensor of x's dtype with M x out_features values (a new tensor otherwise).
  at::Tensor linear(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& packed,
                    const std::optional<at::Tensor>& bias, int64_t out_features, int64_t in_features, int64_t block,
                    bool gelu, const at::Tensor& out = at::Tensor());
  // LayerNorm(x @ W^T + bias + residual); bsr_linear_add_layer_norm's checks and errors. out: as above.
  at::Tensor linear_add_layer_norm(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                                   const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                                   int64_t out_features, int64_t in_features, int64_t block,
                                   const at::Tensor& residual, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                                   double eps, const at::Tensor& out = at::Tensor());
  // Computes every linear added so far (the chain keeps them: it can run again).
  void run();
  // Copies every bias again from its tensor (the fp32 copies taken when the linears were added).
  void refresh_biases();
  // What preparing a linear depends on besides its tensors (the ISA's kernels, BSBERT_BSR_KC, torch's
  // thread count): a chain kept across calls is prepared again when this changes.
  static std::array<int64_t, 3> config();

 private:
  struct Impl;  // the prepared calls: bsr_linear.cpp's internal types
  std::unique_ptr<Impl> impl_;
};

}  // namespace cpu
}  // namespace bsbert
