// CPU implementation of bsbert::pruned_attention and bsbert::pruned_attention_varlen (schemas and
// layouts in csrc/ops.cpp). Compiled for the baseline ISA: argument checks, the per-sequence view of
// both layouts, the key bias / live-panel tables from the padding mask, workspace and threading. The
// arithmetic is pruned_attention_kernel.h, instantiated per ISA and chosen per call with
// effective_isa() (BSBERT_CPU_ISA=portable|avx2|avx512|avx512_bf16 caps it) and the dtype.
//
// Work split, in one at::parallel_for region: K^T and V of a head are packed once into panels (fp32, or
// bf16 pairs on the bf16-dot path; K is reused by every query tile of its head, so it is transposed
// once, not per task). By default (run_by_head) the worker that packs a head also computes its query
// tiles, and idle workers take the remaining tiles of packed heads at the end. The query tile shrinks
// until there are >= 4 tiles per thread (B = 1, S = 128 keeps 2 cores busy at the tail).
#include "check.h"
#include "aten_min.h"
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "cpu/isa.h"
#include "cpu/run_workers.h"
#include "cpu/pruned_attention.h"
#include "cpu/thread_buffer.h"
#include "cpu/torch_ops_cpu.h"

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "pruned_attention_cpu.cpp is compiled without -fopenmp: at::parallel_for will run on a single thread"
#endif

namespace bsbert {
namespace cpu {
namespace {

constexpr int64_t kMqMax = 48;         // query rows per task (then rounded to the tile granularity)
constexpr int64_t kKcDefault = 512;    // keys per online-softmax step
constexpr int64_t kEnvMqMax = 4096;    // largest BSBERT_ATTN_MQ (and _PREFETCH) taken
constexpr int64_t kEnvKcMax = 65536;   // largest BSBERT_ATTN_KC taken
constexpr int64_t kPackKeys = 128;     // keys per K/V packing unit
constexpr int64_t kWsCacheMax = int64_t(16) << 20;  // floats (64 MiB) of workspace kept per thread
constexpr int64_t kPrefetchRows = 8;   // token rows ahead that pack / task prefetch (0 turns it off)

// bf16 qkv on an avx512_bf16 CPU takes the bf16 dot-product path; BSBERT_CPU_ISA=avx512 (or lower)
// keeps the widening fp32 path, for comparisons and tests.
AttnPath select_path(bool bf16) {
  switch (effective_isa()) {
    case Isa::kAvx512Bf16:
      return bf16 ? attn_path_avx512bf16() : attn_path_avx512();
    case Isa::kAvx512:
      return attn_path_avx512();
    case Isa::kAvx2:
      return attn_path_avx2();
    default:
      return attn_path_portable();
  }
}

// Tuning switches (BSBERT_ATTN_MQ, _KC, _PREFETCH), read every call so that A/B runs can toggle them;
// a value outside [min_value, max_value] falls back. The bound keeps the scratch size (rows x keys) far from
// overflow: 2^62 keys wrapped it to a small buffer that the kernel overran (NaN outputs, or a crash).
int64_t env_int(const char* name, int64_t fallback, int64_t min_value, int64_t max_value) {
  const char* s = std::getenv(name);
  if (s == nullptr) return fallback;
  const int64_t v = std::atoll(s);
  return v >= min_value && v <= max_value ? v : fallback;
}

void check_common(const char* op, const at::Tensor& qkv, int64_t num_heads, int64_t head_dim, int64_t want_dim,
                  double scale) {
  BSBERT_CHECK(qkv.device().is_cpu(), op, " (CPU kernel): qkv must be on the CPU, got ", qkv.device());
  BSBERT_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16, op,
              " (CPU kernel): qkv must be float32 or bfloat16, got ", qkv.scalar_type());
  BSBERT_CHECK(num_heads >= 1, op, ": num_heads must be >= 1, got ", num_heads);
  BSBERT_CHECK(head_dim >= 16 && head_dim % 16 == 0 && head_dim <= kAttnMaxHeadDim, op,
              " (CPU kernel): head_dim must be a multiple of 16 in [16, ", kAttnMaxHeadDim, "], got ", head_dim);
  BSBERT_CHECK(qkv.dim() == want_dim, op, ": qkv must be ", want_dim, "-D (",
              want_dim == 3 ? "[B, S, 3*H*D]" : "[T, 3*H*D]", "), got shape ", qkv.sizes());
  // Divided rather than multiplied: 3 * num_heads * head_dim wraps around for a huge num_heads (2^60 + 1
  // heads of 16 matched a last dim of 48), and the kernel then ran that many heads over a small output.
  const int64_t width = qkv.size(-1);
  BSBERT_CHECK(width % (3 * head_dim) == 0 && width / (3 * head_dim) == num_heads, op,
               ": qkv last dimension must be 3 * num_heads * head_dim = 3 * ", num_heads, " * ", head_dim,
               ", got ", width);
  BSBERT_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  // the kernel scales in fp32: a finite double beyond its range became inf there, and every output NaN
  BSBERT_CHECK(std::isfinite(static_cast<float>(scale)), op, ": scale ", scale, " is too large for fp32");
}

// The kernel reads token rows with a stride; only the elements of a row must be adjacent.
at::Tensor rows_dense(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// One description of the sequences for both layouts (see AttnArgs); mask: per-sequence key mask rows
// (bool, true = attend), or undefined.
struct Seqs {
  std::vector<int64_t> qkv_off, out_off, len;
  int64_t ld_qkv = 0, ld_out = 0;
  at::Tensor mask;
};

// Default schedule: a worker claims a (sequence, head), packs its K^T and V and computes its query
// tiles itself, so the packed K/V are read from the cache of the core that wrote them. When no head is
// left it helps with the remaining tiles of heads others packed (only the tail crosses cores). No
// barrier. On the seed model's 24 attention calls (S = 128, 4-16 heads, 2 threads) the shared schedule
// (all packs, a barrier, then tiles of every head on both cores) scaled 1.16x from one thread to two.
// BSBERT_ATTN_SCHED=shared selects the shared schedule (comparisons and tests).
bool head_affinity() {
  const char* env = std::getenv("BSBERT_ATTN_SCHED");
  return env == nullptr || env[0] != 's';
}

// side (if set): the calling thread's own work, done inside the region before it takes heads (the other
// workers take more heads meanwhile). The worker that gets chunk 0 of at::parallel_for is the calling thread.
void run_by_head(const AttnArgs& a, const AttnPath& path, const Seqs& sq, const std::vector<int64_t>& ws_off,
                 int64_t H, int64_t mq, int64_t nthreads, int64_t scratch_floats, const SideWork& side) {
  const int64_t B = static_cast<int64_t>(sq.len.size()), P = path.geo.panel;
  const int64_t nunits = B * H;
  struct Head {
    std::atomic<int> packed{0};
    std::atomic<int64_t> next_tile{0};
  };
  std::unique_ptr<Head[]> heads(new Head[nunits]);
  auto ntiles = [&](int64_t b) { return (sq.len[b] + mq - 1) / mq; };
  std::atomic<int64_t> next_unit{0};
  auto tiles_of = [&](int64_t u, float* scratch) {
    const int64_t b = u / H, h = u % H, n = ntiles(b);
    for (;;) {
      const int64_t t = heads[u].next_tile.fetch_add(1, std::memory_order_relaxed);
      if (t >= n) break;
      path.task(a, b, h, t * mq, scratch);
    }
  };
  auto worker = [&](int64_t begin, int64_t) {
    if (begin == 0 && side) side();
    float* scratch = thread_buffer<struct AttnTaskScratchTag>(scratch_floats);  // the task writes all it reads
    for (;;) {
      const int64_t u = next_unit.fetch_add(1, std::memory_order_relaxed);
      if (u >= nunits) break;
      const int64_t b = u / H;
      path.pack(a, b, u % H, 0, (ws_off[b + 1] - ws_off[b]) / P);
      heads[u].packed.store(1, std::memory_order_release);
      tiles_of(u, scratch);
    }
    for (int64_t u = 0; u < nunits; ++u) {  // the tail: tiles left in heads that others packed
      if (heads[u].next_tile.load(std::memory_order_relaxed) >= ntiles(u / H)) continue;
      while (heads[u].packed.load(std::memory_order_acquire) == 0) std::this_thread::yield();
      tiles_of(u, scratch);
    }
  };
  int64_t total_tiles = 0;
  for (int64_t b = 0; b < B; ++b) total_tiles += H * ntiles(b);
  run_workers(std::min(nthreads, total_tiles), worker);
}

void run(const Seqs& sq, const at::Tensor& qkv, at::Tensor& out, int64_t H, int64_t D, double scale,
         const SideWork& side) {
  const int64_t B = static_cast<int64_t>(sq.len.size());
  const AttnPath path = select_path(qkv.scalar_type() == at::kBFloat16);
  const int64_t P = path.geo.panel, R = path.geo.rows;

  // Workspace offsets (keys padded to whole panels) and the key bias / live-panel tables.
  std::vector<int64_t> ws_off(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) ws_off[b + 1] = ws_off[b] + (sq.len[b] + P - 1) / P * P;
  const int64_t keys = ws_off[B];
  if (keys == 0) {
    if (side) side();
    return;
  }
  const int64_t kv_floats = keys * H * D;
  const int64_t ws_floats = 2 * kv_floats + keys;
  at::Tensor ws_tmp;
  float* ws;
  if (ws_floats <= kWsCacheMax) {
    ws = thread_buffer<struct AttnWorkspaceTag>(ws_floats);  // bounded: larger ones are temporary
  } else {
    ws_tmp = at::empty({ws_floats}, qkv.options().dtype(at::kFloat));
    ws = ws_tmp.data_ptr<float>();
  }
  float* kbias = ws + 2 * kv_floats;
  std::vector<uint8_t> live(keys / P, 0);
  const bool* mask = sq.mask.defined() ? sq.mask.data_ptr<bool>() : nullptr;
  const int64_t ms0 = mask ? sq.mask.stride(0) : 0, ms1 = mask ? sq.mask.stride(1) : 0;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < B; ++b) {
    float* kb = kbias + ws_off[b];
    for (int64_t j = 0; j < ws_off[b + 1] - ws_off[b]; ++j) {
      const bool attend = j < sq.len[b] && (mask == nullptr || mask[b * ms0 + j * ms1]);
      kb[j] = attend ? 0.f : kNegInf;
      if (attend) live[(ws_off[b] + j) / P] = 1;
    }
  }

  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  auto count_tasks = [&](int64_t mq) {
    int64_t n = 0;
    for (int64_t b = 0; b < B; ++b) n += H * ((sq.len[b] + mq - 1) / mq);
    return n;
  };
  int64_t mq = std::max(R, kMqMax / R * R);
  while (mq > R && count_tasks(mq) < 4 * nthreads) mq -= R;
  mq = std::max(R, env_int("BSBERT_ATTN_MQ", mq, 1, kEnvMqMax) / R * R);  // tuning experiments
  const int64_t kc = std::max(P, env_int("BSBERT_ATTN_KC", kKcDefault, 1, kEnvKcMax) / P * P);

  AttnArgs a{};
  a.qkv = qkv.data_ptr();
  a.bf16 = qkv.scalar_type() == at::kBFloat16;
  a.H = H;
  a.D = D;
  a.ld_qkv = sq.ld_qkv;
  a.qkv_off = sq.qkv_off.data();
  a.len = sq.len.data();
  a.out = out.data_ptr();
  a.ld_out = sq.ld_out;
  a.out_off = sq.out_off.data();
  a.scale = static_cast<float>(scale);
  a.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  a.ws_off = ws_off.data();
  a.kt = ws;
  a.v = ws + kv_floats;
  a.kbias = kbias;
  a.live = live.data();
  a.kc = kc;
  a.mq = mq;
  a.pf_rows = env_int("BSBERT_ATTN_PREFETCH", kPrefetchRows, 0, kEnvMqMax);
  a.pf_q = a.pf_rows > 0;

  const int64_t scratch_floats = attn_scratch_floats(mq, D, kc);
  if (head_affinity()) {
    run_by_head(a, path, sq, ws_off, H, mq, nthreads, scratch_floats, side);
    return;
  }
  // (BSBERT_ATTN_SCHED=shared) Units of work: (b, h, first panel) packs and (b, h, first query row)
  // tasks, in claim order; every pack before any task.
  const int64_t pack_panels = std::max<int64_t>(1, kPackKeys / P);
  std::vector<int64_t> packs, tasks;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t npan = (ws_off[b + 1] - ws_off[b]) / P;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t p = 0; p < npan; p += pack_panels) packs.insert(packs.end(), {b, h, p});
      for (int64_t i = 0; i < sq.len[b]; i += mq) tasks.insert(tasks.end(), {b, h, i});
    }
  }
  const int64_t npack = static_cast<int64_t>(packs.size() / 3), ntasks = static_cast<int64_t>(tasks.size() / 3);
  std::atomic<int64_t> next_pack{0}, packed{0}, next_task{0};
  auto worker = [&](int64_t begin, int64_t) {
    if (begin == 0 && side) side();
    for (;;) {
      const int64_t i = next_pack.fetch_add(1, std::memory_order_relaxed);
      if (i >= npack) break;
      const int64_t b = packs[3 * i], h = packs[3 * i + 1], p0 = packs[3 * i + 2];
      path.pack(a, b, h, p0, std::min((ws_off[b + 1] - ws_off[b]) / P, p0 + pack_panels));
      packed.fetch_add(1, std::memory_order_release);
    }
    while (packed.load(std::memory_order_acquire) < npack) std::this_thread::yield();
    float* scratch = thread_buffer<struct AttnTaskScratchTag>(scratch_floats);  // the task writes all it reads
    for (;;) {
      const int64_t t = next_task.fetch_add(1, std::memory_order_relaxed);
      if (t >= ntasks) break;
      path.task(a, tasks[3 * t], tasks[3 * t + 1], tasks[3 * t + 2], scratch);
    }
  };
  run_workers(std::min(nthreads, std::max(ntasks, npack)), worker);
}

}  // namespace

at::Tensor pruned_attention_cpu(const at::Tensor& qkv_in, const std::optional<at::Tensor>& key_padding_mask,
                                int64_t num_heads, int64_t head_dim, double scale) {
  return pruned_attention_out_cpu(qkv_in, key_padding_mask, num_heads, head_dim, scale, at::Tensor(), nullptr);
}

at::Tensor pruned_attention_out_cpu(const at::Tensor& qkv_in, const std::optional<at::Tensor>& key_padding_mask,
                                    int64_t num_heads, int64_t head_dim, double scale, const at::Tensor& out_buf,
                                    const SideWork& side) {
  check_common("pruned_attention", qkv_in, num_heads, head_dim, 3, scale);
  const int64_t B = qkv_in.size(0), S = qkv_in.size(1);
  Seqs sq;
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const at::Tensor& m = *key_padding_mask;
    BSBERT_CHECK(m.device().is_cpu(), "pruned_attention (CPU kernel): key_padding_mask must be on the CPU, got ",
                m.device());
    BSBERT_CHECK(m.scalar_type() == at::kBool, "pruned_attention: key_padding_mask must be bool (true = attend), "
                "got ", m.scalar_type());
    BSBERT_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == S, "pruned_attention: key_padding_mask must "
                "have shape [", B, ", ", S, "] (qkv's [B, S]), got ", m.sizes());
    sq.mask = m;
  }
  at::Tensor out;
  if (out_buf.defined()) {
    BSBERT_CHECK(out_buf.device().is_cpu() && out_buf.scalar_type() == qkv_in.scalar_type() &&
                     out_buf.is_contiguous() && out_buf.numel() == B * S * num_heads * head_dim,
                 "pruned_attention: out must be a contiguous ", qkv_in.scalar_type(), " CPU tensor of ", B, " x ", S,
                 " x ", num_heads * head_dim, " values, got ", out_buf.scalar_type(), " ", out_buf.sizes());
    out = out_buf.view({B, S, num_heads * head_dim});
  } else {
    out = at::empty({B, S, num_heads * head_dim}, qkv_in.options().memory_format(at::MemoryFormat::Contiguous));
  }
  if (B == 0 || S == 0) {
    if (side) side();
    return out;
  }
  const at::Tensor qkv = rows_dense(qkv_in);
  sq.ld_qkv = qkv.stride(1);
  sq.ld_out = out.stride(1);
  for (int64_t b = 0; b < B; ++b) {
    sq.qkv_off.push_back(b * qkv.stride(0));
    sq.out_off.push_back(b * out.stride(0));
    sq.len.push_back(S);
  }
  run(sq, qkv, out, num_heads, head_dim, scale, side);
  return out;
}

at::Tensor pruned_attention_varlen_cpu(const at::Tensor& qkv_in, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                       int64_t num_heads, int64_t head_dim, double scale) {
  check_common("pruned_attention_varlen", qkv_in, num_heads, head_dim, 2, scale);
  BSBERT_CHECK(cu_seqlens.device().is_cpu(), "pruned_attention_varlen (CPU kernel): cu_seqlens must be on the ",
              "CPU, got ", cu_seqlens.device());
  BSBERT_CHECK(cu_seqlens.scalar_type() == at::kInt, "pruned_attention_varlen: cu_seqlens must be int32, got ",
              cu_seqlens.scalar_type());
  BSBERT_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, "pruned_attention_varlen: cu_seqlens must be ",
              "1-D [batch + 1], got shape ", cu_seqlens.sizes());
  BSBERT_CHECK(max_seqlen >= 0, "pruned_attention_varlen: max_seqlen must be >= 0, got ", max_seqlen);
  const int64_t B = cu_seqlens.numel() - 1, T = qkv_in.size(0);
  const at::Tensor cu_c = cu_seqlens.contiguous();
  const int32_t* cu = cu_c.data_ptr<int32_t>();
  BSBERT_CHECK(cu[0] == 0, "pruned_attention_varlen: cu_seqlens[0] must be 0, got ", cu[0]);
  for (int64_t b = 0; b < B; ++b) {
    BSBERT_CHECK(cu[b + 1] >= cu[b], "pruned_attention_varlen: cu_seqlens must be non-decreasing, got ", cu[b],
                " then ", cu[b + 1], " at index ", b);
    BSBERT_CHECK(cu[b + 1] - cu[b] <= max_seqlen, "pruned_attention_varlen: sequence ", b, " has ",
                cu[b + 1] - cu[b], " tokens, more than max_seqlen = ", max_seqlen);
  }
  BSBERT_CHECK(cu[B] <= T, "pruned_attention_varlen: cu_seqlens[-1] = ", cu[B], " exceeds the ", T,
              " tokens of qkv");
  // Tokens outside every sequence (only if cu_seqlens[-1] < T) get zeros rather than garbage.
  at::Tensor out = (cu[B] == T ? at::empty({T, num_heads * head_dim}, qkv_in.options())
                               : at::zeros({T, num_heads * head_dim}, qkv_in.options()))
                       .contiguous();
  if (B == 0 || T == 0) return out;
  const at::Tensor qkv = rows_dense(qkv_in);
  Seqs sq;
  sq.ld_qkv = qkv.stride(0);
  sq.ld_out = out.stride(0);
  for (int64_t b = 0; b < B; ++b) {
    sq.qkv_off.push_back(cu[b] * qkv.stride(0));
    sq.out_off.push_back(cu[b] * out.stride(0));
    sq.len.push_back(cu[b + 1] - cu[b]);
  }
  run(sq, qkv, out, num_heads, head_dim, scale, nullptr);
  return out;
}

}  // namespace cpu
}  // namespace bsbert

TORCH_LIBRARY_IMPL(bsbert, CPU, m) {
  m.impl("pruned_attention", &bsbert::cpu::pruned_attention_cpu);
  m.impl("pruned_attention_varlen", &bsbert::cpu::pruned_attention_varlen_cpu);
}
