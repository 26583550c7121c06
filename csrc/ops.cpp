// One place for bsbert's op schemas (TORCH_LIBRARY(bsbert)); kernels register implementations per
// dispatch key in csrc/cpu and csrc/cuda, fake (meta) kernels live in bsbert/ops/fake.py.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include "aten_min.h"
#include <torch/csrc/utils/pybind.h>  // (not torch/extension.h: that one adds the whole C++ frontend, ~3x the compile time)
#include <torch/library.h>

#include "cpu/bsr_linear.h"
#include "cpu/env_switch.h"
#include "cpu/isa.h"
#include "cpu/torch_ops_cpu.h"

TORCH_LIBRARY(bsbert, m) {
  // y = x @ W^T + bias (optionally followed by BERT's erf GELU), W block-sparse (BSR).
  //   x: [..., K] (any strides), crow_indices int32 [ceil(N/block)+1], col_indices int32 [nnz_blocks],
  //   packed_values: blocks in the layout of the backend that owns the dispatch key
  //   (see bsbert/ops/packing.py), bias: [N] or None. Returns [..., N], contiguous, x's dtype.
  //   The CPU kernel checks the index values; the CUDA one trusts them (reading them is a sync per call):
  //   bsbert.formats.BlockSparseMatrix validates them when it is built.
  m.def(
      "bsr_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor packed_values, "
      "Tensor? bias, int out_features, int in_features, int block, bool gelu) -> Tensor");
  // Attention over the kept heads only, fed by the fused QKV projection without a transpose copy:
  //   qkv: [B, S, 3 * H * D], last dim laid out as (3, H, D) (q | k | v, head-major);
  //   key_padding_mask: bool [B, S], true = attend (None = no padding). A query whose keys are all
  //   masked gets zeros. Returns [B, S, H * D] laid out (H, D): ready for the output projection.
  m.def(
      "pruned_attention(Tensor qkv, Tensor? key_padding_mask, int num_heads, int head_dim, "
      "float scale) -> Tensor");
  // Padding-free form: qkv [T, 3 * H * D] of all sequences concatenated, cu_seqlens int32 [B + 1]
  // (cu_seqlens[0] = 0, cu_seqlens[B] = T), max_seqlen = max length. Returns [T, H * D].
  m.def(
      "pruned_attention_varlen(Tensor qkv, Tensor cu_seqlens, int max_seqlen, int num_heads, "
      "int head_dim, float scale) -> Tensor");
  // y = LayerNorm(x + residual) * weight + bias over the last dim (BERT's SelfOutput / Output tail),
  // one pass over x and residual. x, residual: same shape [..., N] and dtype, unit stride along N
  // wanted (other layouts are copied first); weight, bias: [N], x's dtype or float32.
  // Returns a new contiguous tensor of x's shape and dtype; mean / variance are computed in fp32.
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps) -> Tensor");
  // add_layer_norm(bsr_linear(x, ..., gelu=False), residual, ln_weight, ln_bias, eps) in one op, the same
  // values bit for bit: BERT's attention-output and FFN-output projections with their residual +
  // LayerNorm tail. residual: the output's shape [..., N] and x's dtype. (CPU: each thread computes
  // whole output rows and normalises them while they are in its cache.)
  m.def(
      "bsr_linear_add_layer_norm(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor packed_values, "
      "Tensor? bias, int out_features, int in_features, int block, Tensor residual, Tensor ln_weight, "
      "Tensor ln_bias, float eps) -> Tensor");
  // A stack of patched BERT encoder layers in one call (CPU): per layer qkv = linear(x),
  // ctx = pruned_attention(qkv, key_padding_mask), a = LayerNorm(linear(ctx) + x),
  // h = gelu(linear(a)), x = LayerNorm(linear(h) + a); the same kernels and values as the per-layer
  // ops, without the Python between them. hidden: [B, S, hidden_size]. Per layer, in order:
  //   tensors (20): 4 linears (qkv, attention output, FFN in, FFN out) x [crow_indices, col_indices,
  //     packed_values, bias] for a block-sparse linear or [weight, None, None, bias] for a dense one
  //     (oneDNN or torch's linear), then attention-LayerNorm weight, bias, output-LayerNorm weight, bias;
  //   ints (18): num_heads, head_dim, then per linear: kind (0 block-sparse, 1 oneDNN dense, 2 torch linear),
  //     out_features,
  //     in_features, block;
  //   floats (3): attention scale, attention-LayerNorm eps, output-LayerNorm eps.
  // key_padding_mask: [B, S] bool (true = attend), or an integer attention mask as transformers' models
  // take it (nonzero = attend; one without a zero masks nothing).
  // BERT's embeddings (absolute positions 0..S-1, inference): y = LayerNorm((word[input_ids] +
  // token_type[token_type_ids]) + position[s]) * ln_weight + ln_bias, the sums rounded to the tables'
  // dtype after each add as torch's two adds do. input_ids, token_type_ids (None = all 0): int64 [B, S];
  // word / position / token_type tables: [V, H], [P >= S, H], [T, H], one dtype (float32 or bfloat16);
  // ln_weight, ln_bias: [H], that dtype or float32. Returns [B, S, H] in the tables' dtype.
  m.def(
      "bert_embeddings(Tensor input_ids, Tensor? token_type_ids, Tensor word, Tensor position, "
      "Tensor token_type, Tensor ln_weight, Tensor ln_bias, float eps) -> Tensor");
  m.def(
      "bert_encoder(Tensor hidden, Tensor? key_padding_mask, Tensor?[] tensors, int[] ints, float[] floats) "
      "-> Tensor");
  // bert_encoder with its lists registered once (bsbert._C.encoder_register(tensors, ints, floats) ->
  // handle; encoder_release(handle)): the per-call arguments are the activations only.
  m.def("bert_encoder_registered(Tensor hidden, Tensor? key_padding_mask, int handle) -> Tensor");
  // A linear with few outputs as planes (CPU; a task head such as BERT's QA start / end logits):
  // y[n] = x @ weight[n] + bias[n], y of shape [out_features, *x.shape[:-1]], contiguous. x: [..., K]
  // float32 or bfloat16; weight [out_features, K] and bias [out_features] (or None) in x's dtype.
  // Products and sums in fp32, rounded once to x's dtype.
  m.def("head_logits(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

// The ops are inference kernels without derivatives. With no Autograd kernel torch only warns when a
// backward pass reaches one and then gives nothing before it a gradient (a patched model's backward left
// every encoder weight without .grad). This kernel makes that backward raise "derivative for
// bsbert::<op> is not implemented" instead; under no_grad / inference_mode it is never reached.
TORCH_LIBRARY_IMPL(bsbert, Autograd, m) {
  for (const char* op : {"bsr_linear", "pruned_attention", "pruned_attention_varlen", "add_layer_norm",
                         "bsr_linear_add_layer_norm", "bert_embeddings", "bert_encoder", "bert_encoder_registered",
                         "head_logits"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
}

#ifdef BSBERT_WITH_CUDA
namespace bsbert {
namespace cuda {
std::string bsr_linear_image_problem(int64_t device);  // csrc/cuda/bsr_linear_cuda.cu
std::string attention_image_problem(int64_t device);   // csrc/cuda/pruned_attention_cuda.cu
}  // namespace cuda
}  // namespace bsbert
#endif

namespace {
const char* torch_version_built() {
#ifdef BSBERT_TORCH_VERSION
  return BSBERT_TORCH_VERSION;
#else
  return "unknown";
#endif
}
bool with_cuda() {
#ifdef BSBERT_WITH_CUDA
  return true;
#else
  return false;
#endif
}
// Empty if the CUDA kernels can run on CUDA device `device`, else why not (e.g. no code for its
// architecture in this build).
std::string cuda_kernel_problem(int64_t device) {
#ifdef BSBERT_WITH_CUDA
  std::string p = bsbert::cuda::bsr_linear_image_problem(device);
  return p.empty() ? bsbert::cuda::attention_image_problem(device) : p;
#else
  (void)device;
  return "the extension was built without CUDA kernels";
#endif
}
bool with_sm90a() {
#ifdef BSBERT_HAS_SM90A
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bsbert C++/CUDA kernels (ops are registered under torch.ops.bsbert)";
  m.def("torch_version", &torch_version_built, "torch version this extension was compiled against");
  m.def("with_cuda", &with_cuda, "whether the CUDA kernels were compiled in");
  m.def("with_sm90a", &with_sm90a, "whether the CUDA kernels include sm_90a code (the Hopper wgmma kernels)");
  m.def("cuda_kernel_problem", &cuda_kernel_problem, pybind11::arg("device"),
        "empty if the CUDA kernels can run on that CUDA device, else why not (e.g. no code for its architecture)");
  m.def("cpu_isa", &bsbert::cpu::best_isa_name, "best SIMD level the CPU kernels will use here");
  m.def("cpu_isa_emulated", &bsbert::cpu::isa_emulated,
        "true in the emulated AVX-512 test build (BSBERT_EMULATE_AVX512): AVX-512 code runs through SIMDe");
  m.def("env_switch_on", &bsbert::cpu::env_switch_on, pybind11::arg("name"),
        "how the CPU kernels read an on/off switch such as BSBERT_ENCODER_CHAIN now (off: 0/false/no/off, any case)");
  m.def("cpu_bsr_register_rows", &bsbert::cpu::bsr_register_rows, pybind11::arg("bf16"),
        "rows of the register tile bsr_linear's CPU path uses here now (bf16: bf16 weights), BSBERT_CPU_ISA applied");
  m.def("cpu_bsr_gemv_rows", &bsbert::cpu::bsr_gemv_rows, pybind11::arg("bf16"),
        "rows up to which bsr_linear's CPU path takes its GEMV kernel here now, 0 where it is off "
        "(BSBERT_CPU_ISA and BSBERT_BSR_GEMV applied)");
  m.def("encoder_register", &bsbert::cpu::encoder_register, pybind11::arg("tensors"), pybind11::arg("ints"),
        pybind11::arg("floats"),
        "checks bert_encoder's argument lists once and keeps them (references, not copies) under the returned "
        "handle, for torch.ops.bsbert.bert_encoder_registered");
  m.def("encoder_release", &bsbert::cpu::encoder_release, pybind11::arg("handle"),
        "drops a registered encoder's lists; False if the handle was not registered");
  m.def("encoder_registered_count", &bsbert::cpu::encoder_registered_count, "encoders registered now");
  m.def("encoder_is_registered", &bsbert::cpu::encoder_is_registered, pybind11::arg("handle"),
        "whether an encoder is registered under handle now (the fake kernel's check, as the kernel's first)");
  m.def("encoder_cached_chains", &bsbert::cpu::encoder_cached_chains, pybind11::arg("handle"),
        "layers whose prepared row chain the registered encoder keeps for its next call");
  m.def("encoder_chain_reuses", &bsbert::cpu::encoder_chain_reuses, pybind11::arg("handle"),
        "how many times the registered encoder ran a kept row chain instead of preparing it (all calls)");
  m.def("cpu_peak_gflops", &bsbert::cpu::cpu_peak_gflops, pybind11::arg("kind"), pybind11::arg("seconds"),
        "per-thread GFLOP/s of register-only multiply-add chains ('fp32': FMA, 'bf16': vdpbf16ps), all of "
        "torch's threads at once");
  m.def("cpu_peak_instruction", &bsbert::cpu::cpu_peak_instruction, pybind11::arg("kind"),
        "the instruction cpu_peak_gflops(kind) times at this CPU level");
}
