#pragma once
// The CPU kernels' torch-facing entry points that other ops call directly (bert_encoder.cpp runs a
// whole encoder through them, with no dispatcher or Python in between). Defined in bsr_linear.cpp and
// pruned_attention_cpu.cpp; add_layer_norm_cpu is in add_layer_norm_op.h. Baseline-ISA units only.
#include "aten_min.h"

#include <functional>
#include <optional>
#include <vector>

namespace bsbert {
namespace cpu {

at::Tensor bsr_linear_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                          const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                          int64_t out_features, int64_t in_features, int64_t block, bool gelu);
at::Tensor bsr_linear_add_layer_norm_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                                         const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                                         int64_t out_features, int64_t in_features, int64_t block,
                                         const at::Tensor& residual, const at::Tensor& ln_weight,
                                         const at::Tensor& ln_bias, double eps);
at::Tensor pruned_attention_cpu(const at::Tensor& qkv_in, const std::optional<at::Tensor>& key_padding_mask,
                                int64_t num_heads, int64_t head_dim, double scale);
// Work for the calling thread to do while the other threads start on a parallel region.
using SideWork = std::function<void()>;
// The same into out (if defined: contiguous, B * S * num_heads * head_dim values of qkv's dtype). side
// (if set) runs once on the calling thread, inside the attention's region before that thread takes
// heads, or before returning when there is nothing to compute: bert_encoder prepares the next linears
// there (their checks and arguments, ~15 us a layer) while the other threads compute.
at::Tensor pruned_attention_out_cpu(const at::Tensor& qkv_in, const std::optional<at::Tensor>& key_padding_mask,
                                    int64_t num_heads, int64_t head_dim, double scale, const at::Tensor& out,
                                    const SideWork& side);


// Registered encoders (bert_encoder.cpp): bert_encoder's lists checked once and kept under a handle for
// bsbert::bert_encoder_registered. release: false if the handle was not registered.
int64_t encoder_register(const std::vector<std::optional<at::Tensor>>& tensors, const std::vector<int64_t>& ints,
                         const std::vector<double>& floats);
bool encoder_release(int64_t handle);
int64_t encoder_registered_count();
// How many layers' row chains the registered encoder keeps for its next call (0 before its first call).
int64_t encoder_cached_chains(int64_t handle);
int64_t encoder_chain_reuses(int64_t handle);
bool encoder_is_registered(int64_t handle);

}  // namespace cpu
}  // namespace bsbert
