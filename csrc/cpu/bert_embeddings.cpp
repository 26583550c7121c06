// CPU implementation of bsbert::bert_embeddings (schema in csrc/ops.cpp): BERT's embedding block for
// inference, LayerNorm((word[ids] + token_type[tt]) + position[s]).
//
// Why an op: transformers runs it as ~8 torch calls (three lookups, two adds, LayerNorm, dropout, the
// position / token-type buffer slicing). In a CPU forward loop every call starts cold (each forward
// streams ~150 MB of weights through the caches), and those calls cost ~0.30 ms per bf16 seq-128
// forward of the patched seed-like model: as much as a middle-sized GEMM. Here the gather and both
// adds are one pass, and the LayerNorm one more call from C++.
//
// Numerics: the two adds are done in fp32 and, for bf16 tables, rounded to bf16 after each (round to
// nearest even), as torch's bf16 adds do, and the LayerNorm is torch's own (at::layer_norm, called
// from here): the output equals transformers' module bit for bit (tests/test_bert_embeddings.py).
#include "check.h"
#include "aten_min.h"
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>

#include "cpu/env_switch.h"
#include "cpu/isa.h"


namespace bsbert {
namespace cpu {
namespace {

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN stays NaN (c10::BFloat16's rule); branch-free so the loops vectorise.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

// out = (w + t) + p, rounded to bf16 after each add; plain loops the compiler vectorises. Each also
// has an AVX-512 copy (the same source compiled for avx512f/bw, picked with effective_isa(), so
// BSBERT_CPU_ISA caps it too): in the baseline SSE2 build the bf16 rounding's integer ops took ~0.3 us
// a 1024-wide row. The rounding is exact integer arithmetic: both copies give the same bits.
#define BSB_EMB_INLINE inline __attribute__((always_inline))
BSB_EMB_INLINE void sum_row_bf16_body(const uint16_t* w, const uint16_t* t, const uint16_t* p, uint16_t* out,
                                      int64_t H) {
  for (int64_t i = 0; i < H; ++i) {
    const float wt = bf16_to_f32(f32_to_bf16(bf16_to_f32(w[i]) + bf16_to_f32(t[i])));
    out[i] = f32_to_bf16(wt + bf16_to_f32(p[i]));
  }
}

BSB_EMB_INLINE void sum_row_f32_body(const float* w, const float* t, const float* p, float* out, int64_t H) {
  for (int64_t i = 0; i < H; ++i) out[i] = (w[i] + t[i]) + p[i];
}

void sum_row_bf16(const uint16_t* w, const uint16_t* t, const uint16_t* p, uint16_t* out, int64_t H) {
  sum_row_bf16_body(w, t, p, out, H);
}
void sum_row_f32(const float* w, const float* t, const float* p, float* out, int64_t H) {
  sum_row_f32_body(w, t, p, out, H);
}

// (not in the emulated AVX-512 test build: these are compiler-vectorised, so real AVX-512 instructions)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(BSBERT_EMULATE_AVX512)
#define BSB_HAVE_AVX512_SUMS 1
__attribute__((target("avx512f,avx512bw,avx512vl"))) void sum_row_bf16_avx512(const uint16_t* w, const uint16_t* t,
                                                                              const uint16_t* p, uint16_t* out,
                                                                              int64_t H) {
  sum_row_bf16_body(w, t, p, out, H);
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) void sum_row_f32_avx512(const float* w, const float* t,
                                                                             const float* p, float* out, int64_t H) {
  sum_row_f32_body(w, t, p, out, H);
}
#endif

inline void prefetch_row(const char* w, const char* p, int64_t lines) {
  for (int64_t l = 0; l < lines; ++l) {
    __builtin_prefetch(w + l * 64, 0, 3);
    __builtin_prefetch(p + l * 64, 0, 3);
  }
}

// BSBERT_EMB_PREFETCH=0 turns the row prefetch off (A/B runs; read per call).
bool prefetch_rows_enabled() {
  return env_switch_on("BSBERT_EMB_PREFETCH");
}

void check_table(const at::Tensor& t, const char* name, int64_t H, at::ScalarType dt) {
  BSBERT_CHECK(t.device().is_cpu(), "bert_embeddings (CPU kernel): ", name, " must be on the CPU, got ", t.device());
  BSBERT_CHECK(t.dim() == 2, "bert_embeddings: ", name, " must be a 2-D [rows, hidden] table, got shape ", t.sizes());
  BSBERT_CHECK(t.size(1) == H, "bert_embeddings: ", name, " has hidden size ", t.size(1), ", the word table ", H);
  BSBERT_CHECK(t.scalar_type() == dt, "bert_embeddings: ", name, " is ", t.scalar_type(),
               ", the word table ", dt, " (one dtype for all tables)");
}

// Every index in [0, rows): a clear error instead of a read outside the table.
void check_indices(const at::Tensor& idx, int64_t rows, const char* name, const char* table) {
  const int64_t* v = idx.data_ptr<int64_t>();
  const int64_t n = idx.numel();
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) bad |= (v[i] < 0) | (v[i] >= rows);  // branch-free scan
  if (!bad) return;
  for (int64_t i = 0; i < n; ++i)
    BSBERT_CHECK(v[i] >= 0 && v[i] < rows, "bert_embeddings: ", name, " holds ", v[i], " at flat position ", i,
                 ", outside the ", rows, " rows of ", table);
}

}  // namespace

at::Tensor bert_embeddings_cpu(const at::Tensor& input_ids, const std::optional<at::Tensor>& token_type_ids,
                               const at::Tensor& word, const at::Tensor& position, const at::Tensor& token_type,
                               const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps) {
  BSBERT_CHECK(input_ids.device().is_cpu(), "bert_embeddings (CPU kernel): input_ids must be on the CPU, got ",
               input_ids.device());
  BSBERT_CHECK(input_ids.dim() == 2, "bert_embeddings: input_ids must be [batch, seq], got shape ", input_ids.sizes());
  BSBERT_CHECK(input_ids.scalar_type() == at::kLong, "bert_embeddings: input_ids must be int64, got ",
               input_ids.scalar_type());
  BSBERT_CHECK(word.dim() == 2, "bert_embeddings: word must be a 2-D [vocab, hidden] table, got shape ", word.sizes());
  const auto dt = word.scalar_type();
  BSBERT_CHECK(dt == at::kFloat || dt == at::kBFloat16, "bert_embeddings (CPU kernel): tables must be float32 or "
               "bfloat16, got ", dt);
  const int64_t B = input_ids.size(0), S = input_ids.size(1), H = word.size(1);
  check_table(word, "word", H, dt);
  check_table(position, "position", H, dt);
  check_table(token_type, "token_type", H, dt);
  BSBERT_CHECK(S <= position.size(0), "bert_embeddings: sequence length ", S, " exceeds the ", position.size(0),
               " rows of the position table");
  BSBERT_CHECK(std::isfinite(eps) && eps >= 0, "bert_embeddings: eps must be finite and >= 0, got ", eps);
  BSBERT_CHECK(H > 0, "bert_embeddings: hidden size must be > 0");
  for (const auto* t : {&ln_weight, &ln_bias})
    BSBERT_CHECK(t->device().is_cpu() && t->dim() == 1 && t->size(0) == H &&
                     (t->scalar_type() == dt || t->scalar_type() == at::kFloat),
                 "bert_embeddings: ", t == &ln_weight ? "ln_weight" : "ln_bias", " must be a CPU [", H, "] tensor of ",
                 dt, " or float32, got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  const at::Tensor ids = input_ids.contiguous();
  check_indices(ids, word.size(0), "input_ids", "the word table");
  at::Tensor tts;
  if (token_type_ids.has_value() && token_type_ids->defined()) {
    const at::Tensor& t = *token_type_ids;
    BSBERT_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.sizes() == input_ids.sizes(),
                 "bert_embeddings: token_type_ids must be a CPU int64 tensor of input_ids' shape ", input_ids.sizes(),
                 ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
    tts = t.contiguous();
    check_indices(tts, token_type.size(0), "token_type_ids", "the token-type table");
  } else {
    BSBERT_CHECK(token_type.size(0) > 0 || input_ids.numel() == 0, "bert_embeddings: token_type_ids None means "
                 "type 0 for every token, but the token-type table has no rows");
  }
  const at::Tensor wc = word.contiguous(), pc = position.contiguous(), tc = token_type.contiguous();
  at::Tensor y = at::empty({B, S, H}, word.options().memory_format(at::MemoryFormat::Contiguous));
  // at::layer_norm takes a weight and bias of one dtype: a mixed pair (each allowed above) is widened to
  // fp32, as add_layer_norm does (it stopped in torch with "mixed dtype (CPU): expect parameter to have
  // scalar type of Float", naming neither the op nor the argument).
  auto layer_norm = [&](const at::Tensor& t) {
    if (ln_weight.scalar_type() != ln_bias.scalar_type())
      return at::layer_norm(t, {H}, ln_weight.to(at::kFloat), ln_bias.to(at::kFloat), eps);
    return at::layer_norm(t, {H}, ln_weight, ln_bias, eps);
  };
  if (y.numel() == 0) return layer_norm(y);

  const bool bf16 = dt == at::kBFloat16;
  auto sum_bf16 = sum_row_bf16;
  auto sum_f32 = sum_row_f32;
#ifdef BSB_HAVE_AVX512_SUMS
  if (effective_isa() >= Isa::kAvx512) {
    sum_bf16 = sum_row_bf16_avx512;
    sum_f32 = sum_row_f32_avx512;
  }
#endif
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* tt = tts.defined() ? tts.data_ptr<int64_t>() : nullptr;
  const int64_t esz = bf16 ? 2 : 4;
  const char* wp = static_cast<const char*>(wc.data_ptr());
  const char* pp = static_cast<const char*>(pc.data_ptr());
  const char* tp = static_cast<const char*>(tc.data_ptr());
  char* yp = static_cast<char*>(y.data_ptr());
  const int64_t row_bytes = H * esz;
  // 16 rows of 1024 per task: about what a fork/join costs (add_layer_norm's grain)
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / H);
  // In a forward loop the tables' rows come from DRAM (the encoder has streamed its weights through the
  // caches since the last call), and a row's misses only start when its sum does: prefetching the
  // word and position rows kAhead tokens ahead overlaps them. bf16 seq 128 of the seed-like model, op
  // timed right after each encoder op, 600 calls alternating: median 180 -> 164 and 170 -> 150 us.
  constexpr int64_t kAhead = 4;
  const int64_t row_lines = (row_bytes + 63) / 64;
  const bool ahead = prefetch_rows_enabled();
  at::parallel_for(0, B * S, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; ahead && r < std::min(r1, r0 + kAhead); ++r)
      prefetch_row(wp + id[r] * row_bytes, pp + (r % S) * row_bytes, row_lines);
    for (int64_t r = r0; r < r1; ++r) {
      if (ahead && r + kAhead < r1)
        prefetch_row(wp + id[r + kAhead] * row_bytes, pp + ((r + kAhead) % S) * row_bytes, row_lines);
      const char* w = wp + id[r] * row_bytes;
      const char* t = tp + (tt ? tt[r] : 0) * row_bytes;
      const char* p = pp + (r % S) * row_bytes;
      char* out = yp + r * row_bytes;
      if (bf16)
        sum_bf16(reinterpret_cast<const uint16_t*>(w), reinterpret_cast<const uint16_t*>(t),
                 reinterpret_cast<const uint16_t*>(p), reinterpret_cast<uint16_t*>(out), H);
      else
        sum_f32(reinterpret_cast<const float*>(w), reinterpret_cast<const float*>(t),
                reinterpret_cast<const float*>(p), reinterpret_cast<float*>(out), H);
    }
  });
  // torch's own LayerNorm kernel: with the sums above, the values are transformers' bit for bit
  return layer_norm(y);
}

}  // namespace cpu
}  // namespace bsbert

TORCH_LIBRARY_IMPL(bsbert, CPU, m) { m.impl("bert_embeddings", &bsbert::cpu::bert_embeddings_cpu); }
