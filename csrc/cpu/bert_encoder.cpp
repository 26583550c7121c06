// CPU implementation of bsbert::bert_encoder (schema and argument layout in csrc/ops.cpp): a stack of
// patched BERT encoder layers in one op call, each layer
//   qkv = linear(x)                    fused Q/K/V projection
//   ctx = pruned_attention(qkv)        kept heads only
//   a   = LayerNorm(linear(ctx) + x)   attention output (bsr_linear_add_layer_norm when block-sparse)
//   h   = gelu(linear(a))              FFN in
//   x   = LayerNorm(linear(h) + a)     FFN out
// calling the same C++ kernels as the per-layer ops (so the values are bit for bit those of the
// per-layer path), but with no Python between them. Why: on the 2-core CPU the Python and torch
// dispatch between the ~120 ops of a seq-128 forward kept one core busy and the other spinning for
// ~10% of the forward (perf: 10% of the main thread outside the kernels, 14% of the worker idle); the
// same op sequence driven by a C++ loop was 4.6% faster there (a TorchScript prototype).
//
// A linear is bsbert's block-sparse kernel (kind 0), oneDNN's dense inner product on a plain weight
// (kind 1, mkldnn::_linear_pointwise through the dispatcher, as bsbert.ops.linear_backends'
// onednn-dense does) or torch's own linear (kind 2, at::linear then at::gelu, as torch-dense does),
// whichever `patch` measured faster for it.
#include "check.h"
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include "aten_min.h"
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "cpu/env_switch.h"
#include "cpu/add_layer_norm_op.h"
#include "cpu/bsr_row_chain.h"
#include "cpu/thread_buffer.h"
#include "cpu/torch_ops_cpu.h"

namespace bsbert {
namespace cpu {

namespace {

// Per-layer layout of the three lists (see the schema's comment in csrc/ops.cpp).
constexpr int64_t kLinears = 4;             // qkv, attention output, FFN in, FFN out
constexpr int64_t kTensorsPerLinear = 4;    // bsr: crow, col, packed, bias; dense: weight, -, -, bias
constexpr int64_t kTensorsPerLayer = kLinears * kTensorsPerLinear + 4;  // + two LayerNorms' weight, bias
constexpr int64_t kIntsPerLinear = 4;       // kind, out_features, in_features, block
constexpr int64_t kIntsPerLayer = 2 + kLinears * kIntsPerLinear;        // heads, head_dim, linears
constexpr int64_t kFloatsPerLayer = 3;      // attention scale, the two LayerNorms' eps
enum Kind : int64_t { kBsr = 0, kDense = 1, kTorchDense = 2 };

const char* const kLinearNames[kLinears] = {"qkv", "attention output", "FFN in", "FFN out"};

struct Linear {
  int64_t kind, n, k, block;
  at::Tensor a, b, c;  // bsr: crow, col, packed; dense: weight (b, c undefined)
  std::optional<at::Tensor> bias;
  int64_t layer = 0;  // where it is, for messages: layer, kLinearNames[j]
  int64_t j = 0;
};

at::Tensor required(const c10::List<std::optional<at::Tensor>>& t, int64_t i, int64_t layer, const char* what) {
  const std::optional<at::Tensor> v = t.get(i);
  BSBERT_CHECK(v.has_value() && v->defined(), "bert_encoder: layer ", layer, ": ", what, " (tensors[", i,
               "]) is None");
  return *v;
}

// Linear j's (kind, out_features, in_features, block) in the ints of layer `layer`.
const int64_t* linear_ints(c10::IntArrayRef ints, int64_t layer, int64_t j) {
  return ints.data() + layer * kIntsPerLayer + 2 + j * kIntsPerLinear;
}

Linear linear_of(const c10::List<std::optional<at::Tensor>>& t, c10::IntArrayRef ints, int64_t layer, int64_t j) {
  const int64_t ti = layer * kTensorsPerLayer + j * kTensorsPerLinear;
  const int64_t* li = linear_ints(ints, layer, j);
  Linear l{li[0], li[1], li[2], li[3], {}, {}, {}, t.get(ti + 3)};
  BSBERT_CHECK(l.kind == kBsr || l.kind == kDense || l.kind == kTorchDense, "bert_encoder: layer ", layer, " ",
               kLinearNames[j], ": linear kind must be 0 (block-sparse), 1 (oneDNN dense) or 2 (torch linear), got ",
               l.kind);
  l.a = required(t, ti, layer, l.kind == kBsr ? "crow_indices" : "weight");
  if (l.kind == kBsr) {
    l.b = required(t, ti + 1, layer, "col_indices");
    l.c = required(t, ti + 2, layer, "packed_values");
  }
  if (l.bias.has_value() && !l.bias->defined()) l.bias.reset();
  l.layer = layer;
  l.j = j;
  return l;
}

// oneDNN's inner product, as torch.ops.mkldnn._linear_pointwise(x, w, bias, attr, [], algorithm) from
// Python (boxed: the schema's str / Scalar?[] arguments need no exact C++ signature here).
at::Tensor dense_linear(const at::Tensor& x, const Linear& l, bool gelu) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(l.a);
  stack.emplace_back(l.bias.has_value() ? c10::IValue(*l.bias) : c10::IValue());
  stack.emplace_back(std::string(gelu ? "gelu" : "none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::string(gelu ? "none" : ""));
  op.callBoxed(&stack);
  return stack.back().toTensor();
}

// A dense linear's weight and bias against its input (O(1)): oneDNN reports a wrong shape or dtype as
// "could not create a primitive descriptor for the inner product forward propagation primitive" and
// torch's linear names neither the layer nor the argument.
void check_dense(const at::Tensor& x, const Linear& l) {
  const at::Tensor& w = l.a;
  const char* name = kLinearNames[l.j];
  BSBERT_CHECK(w.device().is_cpu(), "bert_encoder: layer ", l.layer, " ", name, ": dense weight must be on the CPU, got ",
               w.device());
  BSBERT_CHECK(w.dim() == 2 && w.size(1) == x.size(-1), "bert_encoder: layer ", l.layer, " ", name,
               ": dense weight must be [out_features, ", x.size(-1), "] (the input's last dim), got shape ", w.sizes());
  BSBERT_CHECK(w.scalar_type() == x.scalar_type(), "bert_encoder: layer ", l.layer, " ", name, ": dense weight dtype (",
               w.scalar_type(), ") must match the hidden states' dtype (", x.scalar_type(), ")");
  if (!l.bias.has_value()) return;
  const at::Tensor& b = *l.bias;
  BSBERT_CHECK(b.device().is_cpu() && b.dim() == 1 && b.size(0) == w.size(0), "bert_encoder: layer ", l.layer, " ",
               name, ": bias must be a CPU tensor of shape [", w.size(0), "] (the weight's rows), got ", b.sizes(),
               " on ", b.device());
  // (oneDNN also takes an fp32 bias with bf16 inputs; torch's linear wants one dtype)
  const bool fp32_ok = l.kind == kDense && x.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kFloat;
  BSBERT_CHECK(b.scalar_type() == x.scalar_type() || fp32_ok, "bert_encoder: layer ", l.layer, " ", name,
               ": bias dtype (", b.scalar_type(), ") must match the hidden states' dtype (", x.scalar_type(), ")");
}

at::Tensor linear(const at::Tensor& x, const Linear& l, bool gelu) {
  if (l.kind != kBsr) check_dense(x, l);
  if (l.kind == kDense) return dense_linear(x, l, gelu);
  if (l.kind == kTorchDense) {  // F.linear then F.gelu (exact erf), as the torch-dense backend
    const at::Tensor y = at::linear(x, l.a, l.bias);
    return gelu ? at::gelu(y) : y;
  }
  return bsr_linear_cpu(x, l.a, l.b, l.c, l.bias, l.n, l.k, l.block, gelu);
}

at::Tensor linear_add_layer_norm(const at::Tensor& x, const Linear& l, const at::Tensor& residual,
                                 const at::Tensor& ln_w, const at::Tensor& ln_b, double eps) {
  if (l.kind != kBsr) return add_layer_norm_cpu(linear(x, l, false), residual, ln_w, ln_b, eps);
  return bsr_linear_add_layer_norm_cpu(x, l.a, l.b, l.c, l.bias, l.n, l.k, l.block, residual, ln_w, ln_b, eps);
}

// Whether BsrRowChain takes a linear: block-sparse, with outputs and inputs (a layer with every FFN
// neuron pruned has N = 0 for FFN in and K = 0 for FFN out: the per-op path handles those).
bool chainable(const Linear& l) { return l.kind == kBsr && l.n > 0 && l.k > 0; }

// BSBERT_ENCODER_CHAIN=0 calls every linear on its own (the per-op regions; read per call, for A/B runs).
bool chain_enabled() {
  return env_switch_on("BSBERT_ENCODER_CHAIN");
}

// a * b, or -1 when either is negative or the product overflows.
int64_t checked_mul(int64_t a, int64_t b) {
  int64_t r;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r)) return -1;
  return r;
}

// The chained layers' intermediates (QKV, context, the attention LayerNorm's output, the FFN hidden
// layer and every layer output but the last, in two alternating slots) in memory kept per calling
// thread between calls, cut into tensors without an allocation each: per layer those were five
// 0.25-1 MB mallocs, part of the ~22 us of main-thread work per layer during which the other thread
// waits (bf16, seq 128). Nothing of it escapes the op: the last layer's output is a new tensor.
// Bounded like the kernels' other per-thread buffers: a larger call allocates as before.
class Intermediates {
 public:
  enum Slot { kQkv, kCtx, kAttnOut, kFfnHidden, kX0, kX1, kSlots };

  // widths[s]: the widest row slot s holds (elements); M rows of dtype dt. A width that is negative or
  // whose bytes overflow (sizes from the op's ints, before any check has looked at them: a wrapped
  // product gave slots that overlapped) turns the buffer off; the ops' own checks then name the problem.
  Intermediates(int64_t M, const int64_t (&widths)[kSlots], at::ScalarType dt) : M_(M), dt_(dt) {
    const int64_t esz = at::elementSize(dt);
    int64_t bytes = 0;
    for (int s = 0; s < kSlots; ++s) {
      offset_[s] = bytes;
      width_[s] = widths[s];
      const int64_t slot = checked_mul(checked_mul(M, widths[s]), esz);
      if (slot < 0 || slot > kMaxFloats * 4) return;
      bytes += (slot + 63) / 64 * 64;
    }
    if (bytes / 4 + 16 <= kMaxFloats)
      base_ = reinterpret_cast<char*>(
          (reinterpret_cast<uintptr_t>(thread_buffer<struct EncoderIntermediatesTag>(bytes / 4 + 16)) + 63) &
          ~uintptr_t(63));
  }
  // The buffer's start (nullptr: off), for keys of what points into it.
  const void* base() const { return base_; }
  // Slot s as an [M, width] tensor, or an undefined one (the op allocates) when the buffer is off or
  // the slot narrower (a layer whose shapes the op's own checks will reject).
  at::Tensor get(Slot s, int64_t width) const {
    if (base_ == nullptr || width < 0 || width > width_[s]) return at::Tensor();
    return at::from_blob(base_ + offset_[s], {M_, width}, at::TensorOptions().dtype(dt_));
  }

 private:
  static constexpr int64_t kMaxFloats = int64_t(16) << 20;  // 64 MiB, as the GEMM's panel buffer
  int64_t M_;
  at::ScalarType dt_;
  int64_t offset_[kSlots] = {}, width_[kSlots] = {};
  char* base_ = nullptr;
};

// One layer's arguments, taken out of the op's flat lists and checked (kinds, tensors present, heads).
struct LayerArgs {
  int64_t heads = 0, head_dim = 0;
  double scale = 0, eps_attn = 0, eps_out = 0;
  Linear qkv, out, in, ffo;
  at::Tensor ln_attn_w, ln_attn_b, ln_out_w, ln_out_b;
};

// Whether a chain prepared for this layer reads its LayerNorms' weights themselves (a pair of two
// dtypes, or a non-contiguous one, is converted / copied when the chain is prepared: a kept chain
// would not see an in-place edit of it, so such a layer's chain is prepared on every call). Looked at
// on every call (O(1)): a weight's dtype or layout may change after registration (.data =).
bool ln_as_stored(const LayerArgs& l) {
  return l.ln_attn_w.scalar_type() == l.ln_attn_b.scalar_type() &&
         l.ln_out_w.scalar_type() == l.ln_out_b.scalar_type() && l.ln_attn_w.is_contiguous() &&
         l.ln_attn_b.is_contiguous() && l.ln_out_w.is_contiguous() && l.ln_out_b.is_contiguous();
}

// One registered tensor as a kept chain found it when it was prepared. The chain holds raw pointers
// into its index, packed and LayerNorm tensors and checked the index values once, so it is reused only
// while each is the same memory, size, dtype and layout, unwritten since (version counter; an inference
// tensor has none). Without this a kept chain read freed memory after `.data =` / set_ (e.g.
// bsbert.hugepages.place moves packed values that way) or resize_, and unchecked index values after an
// in-place edit (a segfault). A changed tensor makes the chain be prepared again, with the op's checks.
struct TensorStamp {
  at::Tensor t;
  const void* data;
  int64_t numel;
  at::ScalarType dtype;
  bool contiguous;
  int64_t version;  // -1: an inference tensor

  explicit TensorStamp(const at::Tensor& x)
      : t(x), data(x.data_ptr()), numel(x.numel()), dtype(x.scalar_type()), contiguous(x.is_contiguous()),
        version(x.is_inference() ? -1 : static_cast<int64_t>(x._version())) {}
  bool unchanged() const {
    if (t.data_ptr() != data || t.numel() != numel || t.scalar_type() != dtype || t.is_contiguous() != contiguous)
      return false;
    return version < 0 ? t.is_inference() : !t.is_inference() && static_cast<int64_t>(t._version()) == version;
  }
};

bool unchanged(const std::vector<TensorStamp>& stamps) {
  for (const TensorStamp& s : stamps)
    if (!s.unchanged()) return false;
  return true;
}

// A chained layer's row chain kept between calls of a registered encoder. Preparing a chain (the four
// linears' checks and arguments, the index scans, the bias copies) took ~20 us a layer with the
// caches cold (bf16 seq 128), as side work of the attention region that the other thread covered by
// taking more heads. A kept chain only copies its biases again (an in-place edit of a bias is seen, as
// on the per-layer path).
struct CachedChain {
  std::unique_ptr<BsrRowChain> chain;
  const void* ctx = nullptr;       // the attention output it reads
  const void* residual = nullptr;  // the layer input it adds (the previous layer's output)
  at::Tensor x_next, qkv_next;     // its outputs
  std::vector<TensorStamp> stamps;  // the registered tensors it reads but for biases (refresh_biases)
};

// The stamps of a chain prepared for layer l (next: the next layer's QKV linear when the chain computes it).
std::vector<TensorStamp> chain_stamps(const LayerArgs& l, const Linear* next) {
  std::vector<TensorStamp> v;
  v.reserve(16);
  for (const Linear* lin : {&l.out, &l.in, &l.ffo, next})
    if (lin != nullptr)
      for (const at::Tensor* t : {&lin->a, &lin->b, &lin->c}) v.emplace_back(*t);
  for (const at::Tensor* t : {&l.ln_attn_w, &l.ln_attn_b, &l.ln_out_w, &l.ln_out_b}) v.emplace_back(*t);
  return v;
}

// The kept chains of one registered encoder, valid for calls of the same shape, dtype, Intermediates
// buffer and BsrRowChain::config(). Not kept: the first layer's chain (its residual is the op's input,
// which may be a copy when not contiguous), the last layer's (its output is returned: a new tensor
// each call) and a chain whose LayerNorm weights it would hold converted copies of (ln_as_stored).
// A chain is reused only when its inputs are the same memory as before; it holds a reference to them,
// so that memory cannot have been freed and reused for something else.
struct ChainCache {
  std::array<int64_t, 4> shape{};  // B, S, H, dtype
  const void* buf = nullptr;
  std::array<int64_t, 3> config{};
  std::vector<CachedChain> layers;
};

// Where a registered encoder's ChainCache waits between calls. A call takes it out (a concurrent call
// of the same encoder finds it empty and prepares its own chains, as the list op does every time).
struct ChainCacheSlot {
  std::mutex mu;
  std::unique_ptr<ChainCache> cache;
  // kept chains run again instead of prepared (encoder_chain_reuses): the cache's only observable effect
  // besides time, so that tests can see it still hits (a check that always failed would only cost ~0.4%)
  std::atomic<int64_t> reuses{0};
};

// The whole argument list, unpacked once: per call by bert_encoder, or once per registered encoder
// (bert_encoder_registered), where the Python list of ~20 tensors a layer no longer crosses into the op
// on every call (480 for BERT-large: ~50 us hot and ~150 us with cold caches, plus ~3 us a layer to
// take them out of the list again, while the other threads wait).
struct EncoderArgs {
  std::vector<LayerArgs> layers;
  std::shared_ptr<ChainCacheSlot> chains;  // registered encoders only
};

// BSBERT_ENCODER_CHAIN_CACHE=0 prepares every chain on every call (read per call, for A/B runs).
bool chain_cache_enabled() {
  return env_switch_on("BSBERT_ENCODER_CHAIN_CACHE");
}

EncoderArgs encoder_args(const c10::List<std::optional<at::Tensor>>& tensors, c10::IntArrayRef ints,
                         c10::ArrayRef<double> floats) {
  const int64_t layers = static_cast<int64_t>(floats.size()) / kFloatsPerLayer;
  BSBERT_CHECK(static_cast<int64_t>(floats.size()) == layers * kFloatsPerLayer &&
                   static_cast<int64_t>(ints.size()) == layers * kIntsPerLayer &&
                   static_cast<int64_t>(tensors.size()) == layers * kTensorsPerLayer,
               "bert_encoder: expected ", kTensorsPerLayer, " tensors, ", kIntsPerLayer, " ints and ",
               kFloatsPerLayer, " floats per layer, got ", tensors.size(), ", ", ints.size(), " and ",
               floats.size());
  EncoderArgs e;
  e.layers.resize(layers);
  for (int64_t i = 0; i < layers; ++i) {
    LayerArgs& l = e.layers[i];
    l.heads = ints[i * kIntsPerLayer];
    l.head_dim = ints[i * kIntsPerLayer + 1];
    l.scale = floats[i * kFloatsPerLayer];
    l.eps_attn = floats[i * kFloatsPerLayer + 1];
    l.eps_out = floats[i * kFloatsPerLayer + 2];
    l.qkv = linear_of(tensors, ints, i, 0);
    l.out = linear_of(tensors, ints, i, 1);
    l.in = linear_of(tensors, ints, i, 2);
    l.ffo = linear_of(tensors, ints, i, 3);
    const int64_t ln = i * kTensorsPerLayer + kLinears * kTensorsPerLinear;
    l.ln_attn_w = required(tensors, ln, i, "attention LayerNorm weight");
    l.ln_attn_b = required(tensors, ln + 1, i, "attention LayerNorm bias");
    l.ln_out_w = required(tensors, ln + 2, i, "output LayerNorm weight");
    l.ln_out_b = required(tensors, ln + 3, i, "output LayerNorm bias");
    BSBERT_CHECK(l.heads > 0, "bert_encoder: layer ", i, " has ", l.heads,
                 " heads (a layer without heads runs on the per-layer path)");
  }
  return e;
}

void check_hidden(const at::Tensor& hidden) {
  BSBERT_CHECK(hidden.dim() == 3, "bert_encoder: hidden must be [B, S, hidden_size], got shape ", hidden.sizes());
  BSBERT_CHECK(hidden.device().is_cpu(), "bert_encoder (CPU kernel): hidden must be on the CPU, got ",
               hidden.device());
}

// The op's key_padding_mask as the attention takes it: a bool mask (true = attend) as it is, or an
// integer attention mask as transformers' models get it (nonzero = attend) converted to bool, or
// dropped when it masks nothing. Why here: the lean forward's test for a zero in the mask in Python
// (mask.all(), then bool()) cost ~50 us of a cold bf16 seq-128 forward; this scan is ~100 values.
// hidden: the op's input (its [B, S] is the mask's shape).
std::optional<at::Tensor> attention_padding_mask(const std::optional<at::Tensor>& mask, const at::Tensor& hidden) {
  if (!mask.has_value() || !mask->defined()) return mask;
  const at::Tensor& m = *mask;
  // (torch's uint16 / uint32 / uint64 are integral too, but few ops take them: the scan below did not)
  const auto st = m.scalar_type();
  BSBERT_CHECK(st == at::kBool || (at::isIntegralType(st, /*includeBool=*/false) && st != at::kUInt16 &&
                                   st != at::kUInt32 && st != at::kUInt64),
               "bert_encoder: key_padding_mask must be bool (true = attend) or an integer attention mask "
               "(nonzero = attend; int8-int64 or uint8), got ", st);
  BSBERT_CHECK(m.device().is_cpu(), "bert_encoder (CPU kernel): key_padding_mask must be on the CPU, got ",
               m.device());
  // Here, for every mask: an integer mask without a zero is dropped, and with no layers no attention
  // (which checks the shape of the masks it gets) sees a bool one, so a mask of any shape was taken.
  BSBERT_CHECK(m.dim() == 2 && m.size(0) == hidden.size(0) && m.size(1) == hidden.size(1),
               "bert_encoder: key_padding_mask must have shape [", hidden.size(0), ", ", hidden.size(1),
               "] (hidden's [B, S]), got ", m.sizes());
  if (st == at::kBool) return mask;
  const at::Tensor mc = m.contiguous();
  bool any_zero = false;
  AT_DISPATCH_INTEGRAL_TYPES(mc.scalar_type(), "attention_padding_mask", [&] {
    const scalar_t* p = mc.data_ptr<scalar_t>();
    for (int64_t i = 0, n = mc.numel(); i < n && !any_zero; ++i) any_zero = p[i] == 0;
  });
  if (!any_zero) return std::nullopt;
  return mc.ne(0);
}

// The layers on hidden (checked by the caller with check_hidden).
at::Tensor run_encoder(const at::Tensor& hidden, const std::optional<at::Tensor>& mask_in, const EncoderArgs& e) {
  const std::optional<at::Tensor> key_padding_mask = attention_padding_mask(mask_in, hidden);
  const int64_t layers = static_cast<int64_t>(e.layers.size());
  at::Tensor x = hidden;
  at::Tensor qkv;  // this layer's, when the previous layer's chain computed it
  const bool chain = chain_enabled() && BsrRowChain::applies(hidden);
  int64_t widths[Intermediates::kSlots] = {0, 0, hidden.size(-1), 0, hidden.size(-1), hidden.size(-1)};
  for (int64_t i = 0; chain && i < layers; ++i) {
    const LayerArgs& l = e.layers[i];
    widths[Intermediates::kQkv] = std::max(widths[Intermediates::kQkv], l.qkv.n);
    widths[Intermediates::kCtx] = std::max(widths[Intermediates::kCtx], checked_mul(l.heads, l.head_dim));
    widths[Intermediates::kFfnHidden] = std::max(widths[Intermediates::kFfnHidden], l.in.n);
  }
  const int64_t M = hidden.size(0) * hidden.size(1);
  const Intermediates buf(chain ? M : 0, widths, hidden.scalar_type());
  std::unique_ptr<ChainCache> cache;  // the chains kept by an earlier call, taken out of e's slot
  if (chain && e.chains && buf.base() != nullptr && chain_cache_enabled()) {
    {
      std::lock_guard<std::mutex> lock(e.chains->mu);
      cache = std::move(e.chains->cache);
    }
    const std::array<int64_t, 4> shape = {hidden.size(0), hidden.size(1), hidden.size(2),
                                          static_cast<int64_t>(hidden.scalar_type())};
    const std::array<int64_t, 3> config = BsrRowChain::config();
    if (!cache || cache->shape != shape || cache->buf != buf.base() || cache->config != config) {
      cache = std::make_unique<ChainCache>();
      cache->shape = shape;
      cache->buf = buf.base();
      cache->config = config;
      cache->layers.resize(layers);
    }
  }
  // The previous layer's chain when not kept (its prepared calls hold ~20 tensors, vectors and deques):
  // freed by the next chain's side work inside the attention region, not between regions while the
  // other threads wait (~4 us a layer there at bf16 seq 128).
  std::unique_ptr<BsrRowChain> done_chain;
  for (int64_t i = 0; i < layers; ++i) {
    // what the layer was doing when an argument was refused, added to the error: the kernels' own messages
    // name their op and argument ("add_layer_norm: weight must have shape ..."), not which layer or which
    // of its two LayerNorms (set by the side work too: its errors reach this thread after the region)
    const char* stage = "QKV";
    try {
      const LayerArgs& l = e.layers[i];
      const Linear &out_l = l.out, &in_l = l.in, &ffo_l = l.ffo;
      const bool last = i + 1 == layers;
      if (!qkv.defined()) qkv = linear(x, l.qkv, false);
      const bool chained = chain && chainable(out_l) && chainable(in_l) && chainable(ffo_l);
      // the attention's output, made here when chained: the chain is prepared while the attention runs
      // (ctx_width < 0: heads * head_dim negative or overflowing; the attention's checks reject it)
      const int64_t ctx_width = checked_mul(l.heads, l.head_dim);
      at::Tensor ctx_out = buf.get(Intermediates::kCtx, ctx_width);
      if (chained && !ctx_out.defined() && ctx_width >= 0) ctx_out = at::empty({M, ctx_width}, hidden.options());
      if (ctx_out.defined()) ctx_out = ctx_out.view({hidden.size(0), hidden.size(1), ctx_width});

      // attention output, FFN in, FFN out and the next layer's QKV on each thread's rows, one region;
      // their checks and arguments are prepared by this thread inside the attention's region (or, kept
      // from an earlier call, only their biases copied again)
      CachedChain* keep = chained && cache && i > 0 && !last && ln_as_stored(l) ? &cache->layers[i] : nullptr;
      const bool reuse = keep != nullptr && keep->chain && keep->ctx == ctx_out.data_ptr() &&
                         keep->residual == x.data_ptr() && unchanged(keep->stamps);
      std::unique_ptr<BsrRowChain> chain_ptr = chained && !reuse ? std::make_unique<BsrRowChain>() : nullptr;
      at::Tensor x_next, qkv_next;
      SideWork prepare_chain;
      if (reuse) {
        prepare_chain = [&] {
          done_chain.reset();
          keep->chain->refresh_biases();
        };
      } else if (chained) {
        prepare_chain = [&] {
          done_chain.reset();
          BsrRowChain& ch = *chain_ptr;
          stage = "attention output + LayerNorm";
          const at::Tensor a = ch.linear_add_layer_norm(ctx_out, out_l.a, out_l.b, out_l.c, out_l.bias, out_l.n, out_l.k,
                                                        out_l.block, x, l.ln_attn_w, l.ln_attn_b, l.eps_attn,
                                                        buf.get(Intermediates::kAttnOut, out_l.n));
          stage = "FFN in";
          const at::Tensor h = ch.linear(a, in_l.a, in_l.b, in_l.c, in_l.bias, in_l.n, in_l.k, in_l.block, true,
                                         buf.get(Intermediates::kFfnHidden, in_l.n));
          // (the last output is returned: a tensor of its own)
          stage = "FFN out + LayerNorm";
          x_next = ch.linear_add_layer_norm(
              h, ffo_l.a, ffo_l.b, ffo_l.c, ffo_l.bias, ffo_l.n, ffo_l.k, ffo_l.block, a, l.ln_out_w, l.ln_out_b,
              l.eps_out, last ? at::Tensor() : buf.get(i % 2 ? Intermediates::kX1 : Intermediates::kX0, ffo_l.n));
          if (!last) {
            const Linear& next = e.layers[i + 1].qkv;
            stage = "the next layer's QKV";
            if (chainable(next))
              qkv_next = ch.linear(x_next, next.a, next.b, next.c, next.bias, next.n, next.k, next.block, false,
                                   buf.get(Intermediates::kQkv, next.n));
          }
        };
      }
      stage = "attention";
      const at::Tensor ctx = pruned_attention_out_cpu(qkv, key_padding_mask, l.heads, l.head_dim, l.scale, ctx_out,
                                                      prepare_chain);
      if (chained) {
        stage = "the row chain (attention output, FFN, the next layer's QKV)";
        RECORD_FUNCTION("bsbert::bsr_row_chain", std::vector<c10::IValue>());
        if (reuse) {
          e.chains->reuses.fetch_add(1, std::memory_order_relaxed);
          keep->chain->run();
          x = keep->x_next;
          qkv = keep->qkv_next;
        } else {
          chain_ptr->run();
          if (keep != nullptr) {
            const Linear* next = qkv_next.defined() ? &e.layers[i + 1].qkv : nullptr;  // (keep: not the last)
            *keep = CachedChain{std::move(chain_ptr), ctx_out.data_ptr(), x.data_ptr(), x_next, qkv_next,
                                chain_stamps(l, next)};
          } else {
            done_chain = std::move(chain_ptr);
          }
          x = x_next;
          qkv = qkv_next;
        }
      } else {
        stage = "attention output + LayerNorm";
        const at::Tensor a = linear_add_layer_norm(ctx, out_l, x, l.ln_attn_w, l.ln_attn_b, l.eps_attn);
        stage = "FFN in";
        const at::Tensor h = linear(a, in_l, true);
        stage = "FFN out + LayerNorm";
        x = linear_add_layer_norm(h, ffo_l, a, l.ln_out_w, l.ln_out_b, l.eps_out);
        qkv = at::Tensor();
      }
    } catch (c10::Error& err) {
      err.add_context(msg("bert_encoder: layer ", i, ", ", stage));
      throw;
    }
  }
  if (cache) {
    std::lock_guard<std::mutex> lock(e.chains->mu);
    e.chains->cache = std::move(cache);
  }
  // contiguous, as the fake kernel says (clone() kept a non-contiguous hidden's strides)
  return layers == 0 ? hidden.clone(at::MemoryFormat::Contiguous) : x;
}

// Registered encoders: handle -> arguments, shared so that a release during a call leaves the call's
// copy alive.
struct Registry {
  std::mutex mu;
  std::unordered_map<int64_t, std::shared_ptr<const EncoderArgs>> map;
  int64_t next = 1;
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: releases may come during interpreter exit
  return *r;
}

// The registered encoder under handle (a copy of the reference: a release during the call leaves it
// alive), or nullptr.
std::shared_ptr<const EncoderArgs> find_registered(int64_t handle) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  const auto it = r.map.find(handle);
  return it != r.map.end() ? it->second : nullptr;
}

}  // namespace

at::Tensor bert_encoder_cpu(const at::Tensor& hidden, const std::optional<at::Tensor>& key_padding_mask,
                            const c10::List<std::optional<at::Tensor>>& tensors, c10::IntArrayRef ints,
                            c10::ArrayRef<double> floats) {
  check_hidden(hidden);  // before the lists' checks, as the op always reported them
  return run_encoder(hidden, key_padding_mask, encoder_args(tensors, ints, floats));
}

at::Tensor bert_encoder_registered_cpu(const at::Tensor& hidden, const std::optional<at::Tensor>& key_padding_mask,
                                       int64_t handle) {
  const std::shared_ptr<const EncoderArgs> e = find_registered(handle);
  BSBERT_CHECK(e != nullptr, "bert_encoder_registered: no encoder is registered under handle ", handle,
               " (released, or never registered in this process; see bsbert._C.encoder_register)");
  check_hidden(hidden);
  return run_encoder(hidden, key_padding_mask, *e);
}

int64_t encoder_register(const std::vector<std::optional<at::Tensor>>& tensors, const std::vector<int64_t>& ints,
                         const std::vector<double>& floats) {
  c10::List<std::optional<at::Tensor>> list;
  list.reserve(tensors.size());
  for (const auto& t : tensors) list.push_back(t);
  EncoderArgs args = encoder_args(list, ints, floats);  // the op's checks, once
  args.chains = std::make_shared<ChainCacheSlot>();
  auto e = std::make_shared<const EncoderArgs>(std::move(args));
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  const int64_t h = r.next++;
  r.map.emplace(h, std::move(e));
  return h;
}

bool encoder_release(int64_t handle) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  return r.map.erase(handle) > 0;
}

int64_t encoder_cached_chains(int64_t handle) {
  const std::shared_ptr<const EncoderArgs> e = find_registered(handle);
  BSBERT_CHECK(e != nullptr, "encoder_cached_chains: no encoder is registered under handle ", handle);
  std::lock_guard<std::mutex> lock(e->chains->mu);
  if (!e->chains->cache) return 0;
  int64_t n = 0;
  for (const CachedChain& c : e->chains->cache->layers) n += c.chain != nullptr;
  return n;
}

int64_t encoder_chain_reuses(int64_t handle) {
  const std::shared_ptr<const EncoderArgs> e = find_registered(handle);
  BSBERT_CHECK(e != nullptr, "encoder_chain_reuses: no encoder is registered under handle ", handle);
  return e->chains->reuses.load(std::memory_order_relaxed);
}

bool encoder_is_registered(int64_t handle) { return find_registered(handle) != nullptr; }

int64_t encoder_registered_count() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  return static_cast<int64_t>(r.map.size());
}

}  // namespace cpu
}  // namespace bsbert

TORCH_LIBRARY_IMPL(bsbert, CPU, m) {
  m.impl("bert_encoder", &bsbert::cpu::bert_encoder_cpu);
  m.impl("bert_encoder_registered", &bsbert::cpu::bert_encoder_registered_cpu);
}
