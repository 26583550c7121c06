// CPU implementation of bsbert::bsr_linear (schema in csrc/ops.cpp):
//   y = x @ W^T (+ bias) (then GELU), W block-sparse, blocks pre-packed by bsbert/ops/packing.py.
//
// This file is compiled for the baseline ISA and owns everything that touches torch: argument checks,
// layout of x / y, the fp32 bias copy and the threading (at::parallel_for, i.e. torch's pool and
// torch.set_num_threads). The arithmetic is in bsr_linear_kernel.h, instantiated per ISA in
// bsr_linear_{portable,avx2,avx512,avx512bf16}.cpp and selected per call with effective_isa() (so
// BSBERT_CPU_ISA=portable|avx2|avx512|avx512_bf16 takes effect immediately).
//
// Work split, two schemes (split_rows() picks): with at least two 12-row register tiles per thread, each
// thread takes whole rows (run_row_tiles: every block row of an even share of M, x packed by the thread
// that uses it). Below that, tasks = (M tiles of mc rows) x (block rows) (run): mc is at most 96 rows and shrinks (in
// multiples of the register tile) until there are >= 4 tasks per thread, so that M = 1..16 still
// spreads over every core through the block rows. Threads claim runs of consecutive block rows of one
// M tile from an atomic counter (block rows of a pruned matrix have very different numbers of blocks,
// so a static split would be unbalanced). M <= 3 (a token or three, batch 1) takes a GEMV kernel of its
// own where it is on (run_gemv, gemv_enabled): the same block-row claims, without register tiles.
#include "check.h"
#include "aten_min.h"
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cstdlib>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

#include "cpu/add_layer_norm_op.h"
#include "cpu/bsr_linear.h"
#include "cpu/bsr_row_chain.h"
#include "cpu/env_switch.h"
#include "cpu/isa.h"
#include "cpu/run_workers.h"
#include "cpu/thread_buffer.h"
#include "cpu/torch_ops_cpu.h"

// torch's OpenMP backend implements at::parallel_for inline in its headers: a translation unit
// compiled without -fopenmp silently runs it on one thread.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "bsr_linear.cpp is compiled without -fopenmp: at::parallel_for will run on a single thread"
#endif

namespace bsbert {
namespace cpu {
namespace {

constexpr int64_t kMcMax = 96;        // rows per M tile of the block-row split
// Rows per tile of the row split: M = 384 on two threads is one 192-row tile per thread (each streams
// the weights once) rather than two of 96. Hot, M = 384, block 32 (GFLOP/s, 96 -> 192 rows): fp32
// 1024x4096 at 0.5 411 -> 428, at 0.1 363 -> 393, 4096x1024 at 0.64 444 -> 454, dense 1024x1024 equal;
// bf16 within +-2%. Seed-like fp32 model at seq 384: 1.1-4% faster (two in-process A/Bs).
constexpr int64_t kRowTileMax = 192;
constexpr int64_t kXpCacheMax = int64_t(16) << 20;  // floats (64 MiB) kept per calling thread

struct Path {
  BsrTileFn fn;
  BsrPackFn pack;
  int mr;
  // the M <= kBsrGemvRows path (run_gemv), or nullptr where the tiles serve those M too (see gemv_enabled)
  BsrGemvFn gemv = nullptr;
  BsrGemvPackFn gemv_pack = nullptr;
};

// BSBERT_BSR_GEMV set: on (M <= kBsrGemvRows on the GEMV path, gemv_block_row, at every ISA level) unless
// it is an off spelling (env_switch_on: 0/false/no/off; then the register tiles). Unset: the GEMV path at
// the levels where it was measured faster than the tiles (AVX2 and portable: 2-core Zen 3,
// benchmarks/results/cpu-zen3-2core.md), the tiles at the AVX-512 levels, where it has not been timed yet.
// Read per call.
bool gemv_enabled(Isa isa) {
  if (std::getenv("BSBERT_BSR_GEMV") != nullptr) return env_switch_on("BSBERT_BSR_GEMV");
  return isa != Isa::kAvx512 && isa != Isa::kAvx512Bf16;
}

Path select_path(bool w_bf16) {
  const Isa isa = effective_isa();
  Path p;
  switch (isa) {
    case Isa::kAvx512Bf16:
      if (w_bf16) {
        p = {bsr_tile_avx512bf16, bsr_pack_avx512bf16, bsr_mr_avx512bf16(), bsr_gemv_avx512bf16,
             bsr_gemv_pack_avx512bf16};
        break;
      }
      [[fallthrough]];
    case Isa::kAvx512:
      p = {bsr_tile_avx512, bsr_pack_avx512, bsr_mr_avx512(w_bf16), bsr_gemv_avx512, bsr_gemv_pack_avx512};
      break;
    case Isa::kAvx2:
      p = {bsr_tile_avx2, bsr_pack_avx2, bsr_mr_avx2(w_bf16), bsr_gemv_avx2, bsr_gemv_pack_avx2};
      break;
    default:
      p = {bsr_tile_portable, bsr_pack_portable, bsr_mr_portable(w_bf16), bsr_gemv_portable, bsr_gemv_pack_portable};
  }
  if (!gemv_enabled(isa)) p.gemv = nullptr, p.gemv_pack = nullptr;
  return p;
}

}  // namespace

int bsr_register_rows(bool w_bf16) { return select_path(w_bf16).mr; }
int bsr_gemv_rows(bool w_bf16) { return select_path(w_bf16).gemv != nullptr ? kBsrGemvRows : 0; }

namespace {

// Task order: block row fastest (consecutive tasks share the packed x tile and write neighbouring
// columns of the same output rows); BSBERT_BSR_ORDER=m makes the M tile fastest (for experiments).
bool m_fastest() {
  const char* env = std::getenv("BSBERT_BSR_ORDER");
  return env != nullptr && env[0] == 'm';
}

// BSBERT_BSR_KC (k values per weight group, A/B runs): 0 = the path's default; values past 2^20 also fall
// back (atoi of a longer number was undefined, and no group of that size fits any cache).
int64_t env_kc() {
  const char* env = std::getenv("BSBERT_BSR_KC");
  const int64_t v = env != nullptr ? std::atoll(env) : 0;
  return v > 0 && v <= (int64_t(1) << 20) ? v : 0;
}

// One bsr_linear call after its checks: y allocated, args filled (but for args.xp), the path picked.
struct BsrCall {
  BsrLinearArgs args;
  Path path;
  at::Tensor x2, y, crow_c, col_c;
  float* bias = nullptr;        // fp32, padded to whole blocks (the calling thread's buffer) or nullptr
  at::Tensor bias_src;          // the bias it was copied from (undefined without bias)
  std::vector<int64_t> out_shape;
  int64_t M = 0, N = 0, K = 0, b = 0, nbr = 0, nbc = 0;
};

// bias (checked: 1-D, floating point, on the CPU) as fp32 into bp, zero-padded to `padded` floats.
void copy_bias(const at::Tensor& bt, float* bp, int64_t padded) {
  const int64_t N = bt.size(0);
  if (bt.scalar_type() == at::kFloat && bt.is_contiguous()) {
    std::memcpy(bp, bt.data_ptr<float>(), N * sizeof(float));
  } else if (bt.scalar_type() == at::kBFloat16 && bt.is_contiguous()) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(bt.data_ptr());
    for (int64_t i = 0; i < N; ++i) {
      const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
      std::memcpy(bp + i, &u, 4);
    }
  } else {
    at::from_blob(bp, {N}, bt.options().dtype(at::kFloat)).copy_(bt);
  }
  std::fill(bp + N, bp + padded, 0.f);
}

// bias_buf: where the fp32 padded bias goes (>= ceil(N/block)*block floats); nullptr: the calling
// thread's buffer, valid until its next prepare (a chain of calls gives each its own).
// out (defined): y goes there (contiguous, M x N values of x's dtype) instead of a new tensor.
BsrCall prepare(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& packed,
                const std::optional<at::Tensor>& bias, int64_t out_features, int64_t in_features, int64_t block,
                bool gelu, float* bias_buf = nullptr, const at::Tensor* out = nullptr) {
  BSBERT_CHECK(block == 16 || block == 32 || block == 64,
              "bsr_linear: block must be 16, 32 or 64, got ", block);
  BSBERT_CHECK(out_features >= 0 && in_features >= 0, "bsr_linear: negative out_features (",
              out_features, ") or in_features (", in_features, ")");
  BSBERT_CHECK(x.device().is_cpu(), "bsr_linear (CPU kernel): x must be on the CPU, got ", x.device());
  BSBERT_CHECK(crow.device().is_cpu() && col.device().is_cpu() && packed.device().is_cpu(),
              "bsr_linear (CPU kernel): crow_indices, col_indices and packed_values must be on the CPU, got ",
              crow.device(), ", ", col.device(), ", ", packed.device());
  const auto dt = x.scalar_type();
  BSBERT_CHECK(dt != at::kHalf,
              "bsr_linear (CPU kernel): float16 is not supported on the CPU; use float32 or bfloat16");
  BSBERT_CHECK(dt == at::kFloat || dt == at::kBFloat16,
              "bsr_linear (CPU kernel): x must be float32 or bfloat16, got ", dt);
  BSBERT_CHECK(packed.scalar_type() == dt, "bsr_linear: packed_values dtype (", packed.scalar_type(),
              ") must match x's dtype (", dt, "); repack with bsbert.ops.packing.pack_cpu(bsm, ", dt, ")");
  BSBERT_CHECK(x.dim() >= 1, "bsr_linear: x must have at least 1 dimension");
  BSBERT_CHECK(x.size(-1) == in_features, "bsr_linear: x.shape[-1] = ", x.size(-1),
              " does not match in_features = ", in_features);
  BSBERT_CHECK(crow.scalar_type() == at::kInt && col.scalar_type() == at::kInt,
              "bsr_linear: crow_indices and col_indices must be int32, got ", crow.scalar_type(), " and ",
              col.scalar_type());
  BSBERT_CHECK(crow.dim() == 1 && col.dim() == 1, "bsr_linear: crow_indices and col_indices must be 1-D");
  BsrCall c;
  const int64_t b = block, N = out_features, K = in_features;
  // (not (N + b - 1) / b: that wraps around for N near INT64_MAX, and the error then named a negative count)
  const int64_t nbr = N / b + (N % b != 0), nbc = K / b + (K % b != 0);
  BSBERT_CHECK(crow.numel() == nbr + 1, "bsr_linear: crow_indices must have ceil(out_features/block)+1 = ",
              nbr + 1, " entries, got ", crow.numel());
  const int64_t nnzb = col.numel();
  BSBERT_CHECK(packed.numel() == nnzb * b * b, "bsr_linear: packed_values must hold nnz_blocks*block*block = ",
              nnzb * b * b, " values, got ", packed.numel(), " (shape ", packed.sizes(), ")");
  BSBERT_CHECK(packed.is_contiguous(), "bsr_linear: packed_values must be contiguous");
  c.crow_c = crow.contiguous();
  c.col_c = col.contiguous();
  const int32_t* crow_p = c.crow_c.data_ptr<int32_t>();
  const int32_t* col_p = c.col_c.data_ptr<int32_t>();
  BSBERT_CHECK(crow_p[0] == 0 && crow_p[nbr] == nnzb, "bsr_linear: crow_indices must run from 0 to nnz_blocks = ",
              nnzb, ", got ", crow_p[0], "..", crow_p[nbr]);
  // Branch-free scans first (they vectorise: a check with its message per element did not, ~1 us of
  // every call at BERT sizes), then the per-element checks only to name the offender.
  int decreasing = 0;
  for (int64_t r = 0; r < nbr; ++r) decreasing |= crow_p[r] > crow_p[r + 1];
  if (decreasing)
    for (int64_t r = 0; r < nbr; ++r)
      BSBERT_CHECK(crow_p[r] <= crow_p[r + 1], "bsr_linear: crow_indices must be non-decreasing (row ", r, ")");
  uint32_t col_max = 0;  // a negative index is a huge unsigned one
  for (int64_t i = 0; i < nnzb; ++i) col_max = std::max(col_max, static_cast<uint32_t>(col_p[i]));
  if (nnzb > 0 && col_max >= static_cast<uint64_t>(nbc))
    for (int64_t i = 0; i < nnzb; ++i)
      BSBERT_CHECK(col_p[i] >= 0 && col_p[i] < nbc, "bsr_linear: col_indices[", i, "] = ", col_p[i],
                  " is outside [0, ceil(in_features/block) = ", nbc, ")");

  if (bias.has_value() && bias->defined()) {
    const at::Tensor& bt = *bias;
    BSBERT_CHECK(bt.device().is_cpu(), "bsr_linear (CPU kernel): bias must be on the CPU, got ", bt.device());
    BSBERT_CHECK(bt.dim() == 1 && bt.size(0) == N, "bsr_linear: bias must have shape [", N, "], got ",
                bt.sizes());
    BSBERT_CHECK(bt.is_floating_point(), "bsr_linear: bias must be floating point, got ", bt.scalar_type());
    // fp32 and zero-padded to whole blocks (the epilogue reads whole vectors), in a per-thread buffer:
    // an at::zeros + copy_ per call was two allocations and three dispatcher calls.
    float* bp = bias_buf ? bias_buf : thread_buffer<struct BsrBiasTag>(nbr * b);
    copy_bias(bt, bp, nbr * b);
    c.bias = bp;
    c.bias_src = bt;
  }

  // x as rows of K contiguous values (any row stride); packed into panels (and widened) by the run.
  // (M from the leading dims, not reshape(-1, K): that is ambiguous for K = 0)
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  c.x2 = x.reshape({M, K});
  if (K > 0 && (c.x2.stride(1) != 1 || (M > 1 && c.x2.stride(0) < K))) c.x2 = c.x2.contiguous();
  const int64_t ldx = (M > 1 && K > 0) ? c.x2.stride(0) : K;

  c.out_shape.assign(x.sizes().begin(), x.sizes().end());
  c.out_shape.back() = N;
  if (out != nullptr && out->defined()) {
    BSBERT_CHECK(out->device().is_cpu() && out->scalar_type() == dt && out->is_contiguous() && out->numel() == M * N,
                 "bsr_linear: out must be a contiguous ", dt, " CPU tensor of ", M, " x ", N, " values, got ",
                 out->scalar_type(), " ", out->sizes(), " on ", out->device());
    c.y = out->view({M, N});
  } else {
    c.y = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  }

  const bool bf16 = dt == at::kBFloat16;
  BsrLinearArgs& args = c.args;
  args.x = (K > 0 && !bf16) ? c.x2.data_ptr<float>() : nullptr;
  args.xraw = K > 0 ? c.x2.data_ptr() : nullptr;
  args.ldx = ldx;
  args.xp = nullptr;
  args.M = M;
  args.N = N;
  args.K = K;
  args.block = static_cast<int>(b);
  args.crow = crow_p;
  args.col = col_p;
  args.w = packed.data_ptr();
  args.w_bf16 = bf16;
  args.bias = c.bias;
  args.gelu = gelu;
  args.y = c.y.data_ptr();
  args.ldy = N;
  args.y_bf16 = bf16;
  args.balanced_panels = 0;
  args.kc = 0;
  args.kc = static_cast<int>(env_kc());  // A/B runs
  c.path = select_path(bf16);
  c.M = M;
  c.N = N;
  c.K = K;
  c.b = b;
  c.nbr = nbr;
  c.nbc = nbc;
  return c;
}

// The panel buffer for all of x: reused per calling thread (fresh pages would cost a page fault per
// 4 KiB every call); very large inputs get a temporary buffer (returned) so that the cache stays bounded.
at::Tensor panel_buffer(int64_t xp_elems, float** xp) {
  xp_elems = std::max<int64_t>(1, xp_elems);
  if (xp_elems <= kXpCacheMax) {
    *xp = thread_buffer<struct BsrPanelTag>(xp_elems);
    return at::Tensor();
  }
  at::Tensor tmp = at::empty({xp_elems}, at::TensorOptions().dtype(at::kFloat));
  *xp = tmp.data_ptr<float>();
  return tmp;
}

// M <= kBsrGemvRows on the GEMV path: x packed once, as a panel of M zero-padded fp32 rows, by the calling
// thread; then the threads claim runs of consecutive block rows (each a sequential stretch of the packed
// weights), about 8 claims per thread for balance across block rows of different lengths.
void run_gemv(BsrCall& c) {
  const Path& path = c.path;
  const int64_t nbr = c.nbr, b = c.b;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const at::Tensor xv_tmp = panel_buffer(c.nbc * b * c.M, &c.args.xp);
  path.gemv_pack(c.args, c.args.xp);
  const BsrLinearArgs& args = c.args;
  const int64_t g = std::max<int64_t>(1, nbr / (8 * nthreads));
  const int64_t nclaims = (nbr + g - 1) / g;
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    float* sc = thread_buffer<struct BsrTileScratchTag>(c.M * b + 16);  // written before it is read
    for (;;) {
      const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
      if (t >= nclaims) break;
      for (int64_t rb = t * g; rb < std::min(nbr, (t + 1) * g); ++rb) path.gemv(args, rb, sc);
    }
  };
  run_workers(std::min(nthreads, nclaims), worker);
}

void run(BsrCall& c) {
  if (c.M <= kBsrGemvRows && c.path.gemv != nullptr) {
    run_gemv(c);
    return;
  }
  const BsrLinearArgs& args = c.args;
  const Path& path = c.path;
  const int64_t M = c.M, K = c.K, b = c.b, nbr = c.nbr, nbc = c.nbc;
  const int64_t mr = path.mr;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  // M tile: <= kMcMax rows, a multiple of mr, small enough for >= 4 tasks per thread when possible.
  const int64_t want_mtiles = std::max<int64_t>(1, (4 * nthreads + nbr - 1) / nbr);
  int64_t mc = (M + want_mtiles - 1) / want_mtiles;
  mc = std::max<int64_t>(mr, (mc + mr - 1) / mr * mr);
  mc = std::min<int64_t>(mc, kMcMax);
  if (const char* env = std::getenv("BSBERT_BSR_MC")) {
    const int64_t v = std::atoll(env);  // capped at M's panels: a huge value overflowed the tile count
    if (v > 0) mc = std::max<int64_t>(mr, std::min<int64_t>(v, M + mr) / mr * mr);
  }
  const int64_t nmt = (M + mc - 1) / mc;
  // A claim is a run of g consecutive block rows of one M tile: a thread then streams contiguous
  // packed weights (the kernel prefetches the next group's into L2, which only helps if the same
  // thread computes it) and there are about 8 claims per thread for balance.
  const bool mfast = m_fastest();
  const int64_t g = mfast ? 1 : std::max<int64_t>(1, nbr * nmt / (8 * nthreads));
  const int64_t nchunks = (nbr + g - 1) / g;
  const int64_t nclaims = nmt * nchunks;

  // x is packed into register-tile panels (also widening bf16) one M tile at a time, by the first
  // worker that needs the tile; a worker that finds its tile being packed by another packs a later
  // one meanwhile. There is no global barrier: a descheduled worker only holds up work on its own tile.
  const int64_t npanels = (M + mr - 1) / mr;
  const int64_t pstride = nbc * b * mr;
  const at::Tensor xp_tmp = panel_buffer(npanels * pstride, &c.args.xp);
  enum : int { kUnpacked = 0, kPacking = 1, kReady = 2 };
  std::unique_ptr<std::atomic<int>[]> tile_state(new std::atomic<int>[nmt]);
  // Small inputs (or one thread) are packed by the calling thread up front: cheaper than sharing.
  const bool pack_now = K == 0 || npanels * pstride < (int64_t(1) << 16) || nthreads == 1;
  if (K > 0 && pack_now) path.pack(args, 0, npanels, args.xp);
  for (int64_t i = 0; i < nmt; ++i) tile_state[i].store(pack_now ? kReady : kUnpacked, std::memory_order_relaxed);
  auto try_pack = [&](int64_t mt) {
    int expected = kUnpacked;
    if (!tile_state[mt].compare_exchange_strong(expected, kPacking, std::memory_order_acq_rel)) return false;
    const int64_t p0 = mt * mc / mr, p1 = std::min(npanels, (mt + 1) * mc / mr);
    path.pack(args, p0, p1, args.xp);
    tile_state[mt].store(kReady, std::memory_order_release);
    return true;
  };
  auto wait_tile = [&](int64_t mt) {
    if (tile_state[mt].load(std::memory_order_acquire) == kReady) return;
    if (try_pack(mt)) return;
    for (int64_t other = mt + 1; other < nmt; ++other)  // useful work while another worker packs mt
      if (tile_state[mt].load(std::memory_order_acquire) != kReady) try_pack(other);
    while (tile_state[mt].load(std::memory_order_acquire) != kReady) std::this_thread::yield();
  };
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    float* sc = thread_buffer<struct BsrTileScratchTag>(mc * b + 16);  // written before it is read
    for (;;) {
      const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
      if (t >= nclaims) break;
      const int64_t mt = mfast ? t % nmt : t / nchunks;
      const int64_t ch = mfast ? t / nmt : t % nchunks;
      wait_tile(mt);
      const int64_t m0 = mt * mc, m1 = std::min(M, m0 + mc);
      for (int64_t rb = ch * g; rb < std::min(nbr, (ch + 1) * g); ++rb) path.fn(args, m0, m1, rb, sc);
    }
  };
  run_workers(std::min(nthreads, nclaims), worker);
}

// Register-tile rows of a row-split tile in near-equal panels (BsrLinearArgs::balanced_panels; on by
// default). BSBERT_BSR_PANELS=aligned keeps panels of mr rows and a short last one (for A/B runs).
bool balanced_row_panels() {
  const char* env = std::getenv("BSBERT_BSR_PANELS");
  return env == nullptr || env[0] != 'a';
}

// One GEMM of a row-tile run, and the LayerNorm over its rows for the fused op (ln != nullptr).
struct RowStep {
  BsrCall* call;
  const AddLayerNormArgs* ln = nullptr;
  AddLayerNormFn ln_rows = nullptr;
};

// Row tiles: one thread computes every block row of its rows, so it owns whole output rows (the fused
// op normalises them while they are still in its L2: ln != nullptr). The rows are split evenly (nthreads tiles,
// or a multiple when a tile would exceed kRowTileMax rows), not in multiples of the register tile: each tile
// runs as a GEMM of its own (x, y and its panel buffer offset to its first row), so M = 128 on two
// threads is 64 + 64 rows rather than 72 + 56 (12-row register tiles), which cost 6-9% in balance.
// Used when split_rows(); otherwise the fused op runs as bsr_linear's block-row split then add_layer_norm.
//
// Several steps (a chain, BsrRowChain: a step reads only the same rows of earlier steps' outputs) run
// tile by tile in this one region: the thread that claims a tile runs every step on its rows, in order,
// so the chain needs no barrier between its GEMMs. All steps share M and the register tile (checked by
// BsrRowChain as steps are added).
void run_row_tiles(const std::vector<RowStep>& steps) {
  const BsrCall& c0 = *steps.front().call;
  const int64_t M = c0.M, mr = c0.path.mr;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t ntiles = nthreads * ((M + nthreads * kRowTileMax - 1) / (nthreads * kRowTileMax));
  const int64_t base = M / ntiles, extra = M % ntiles;  // tile t: base + (t < extra) rows
  const int64_t max_rows = base + (extra > 0);
  const int64_t tile_panels = (max_rows + mr - 1) / mr;
  int64_t pstride = 0, scratch_floats = 16, ln_floats = 0;
  for (const RowStep& s : steps) {
    pstride = std::max(pstride, s.call->nbc * s.call->b * mr);
    scratch_floats = std::max(scratch_floats, max_rows * s.call->b + 16);
    if (s.ln) ln_floats = std::max(ln_floats, add_layer_norm_scratch(s.call->N));
  }
  float* xp = nullptr;  // tile t's panels at xp + t * tile_panels * pstride, reused by its steps
  const at::Tensor xp_tmp = panel_buffer(ntiles * tile_panels * pstride, &xp);
  const bool balanced = balanced_row_panels();
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    // per-thread buffers, written before they are read (a zeroed std::vector per call cost a pass over 20 KB)
    float* scratch = thread_buffer<struct BsrTileScratchTag>(scratch_floats);
    float* ln_scratch = ln_floats > 0 ? thread_buffer<struct BsrLnScratchTag>(ln_floats) : nullptr;
    for (;;) {
      const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
      if (t >= ntiles) break;
      const int64_t m0 = t * base + std::min(t, extra), rows = base + (t < extra);
      for (const RowStep& s : steps) {
        const BsrCall& c = *s.call;
        const BsrLinearArgs& args = c.args;
        const int64_t esz = args.y_bf16 ? 2 : 4;
        BsrLinearArgs ta = args;  // rows [m0, m0 + rows) as a GEMM of their own
        ta.x = args.x ? args.x + m0 * args.ldx : nullptr;
        ta.xraw = args.xraw ? static_cast<const char*>(args.xraw) + m0 * args.ldx * esz : nullptr;
        ta.y = static_cast<char*>(args.y) + m0 * args.ldy * esz;
        ta.M = rows;
        ta.xp = xp + t * tile_panels * pstride;
        const int64_t npan = (rows + mr - 1) / mr;
        if (balanced && npan > 1) ta.balanced_panels = npan;
        if (c.K > 0) c.path.pack(ta, 0, npan, ta.xp);
        for (int64_t rb = 0; rb < c.nbr; ++rb) c.path.fn(ta, 0, rows, rb, scratch);
        if (s.ln) s.ln_rows(*s.ln, m0, m0 + rows, ln_scratch);
      }
    }
  };
  run_workers(std::min(nthreads, ntiles), worker);
}

// Row tiles (run_row_tiles) once every thread gets at least two register tiles of rows; block rows
// (run) below that, where they are what spreads M = 1..16 per thread over the cores.
// BSBERT_BSR_SPLIT=blocks keeps the block-row split at every M (for comparisons and tests).
// Why rows: hot, 2 threads, the row split ran 1.02-1.09x faster at M = 128 and 384 on BERT shapes
// (1.5x for a 74-wide FFN, where every block-row task waited on a shared x packing), and the rows a
// thread writes are the rows it reads next (FFN-in -> FFN-out, output block -> next QKV).
bool split_rows(int64_t M, int64_t mr) {
  const char* env = std::getenv("BSBERT_BSR_SPLIT");
  if (env != nullptr && env[0] == 'b') return false;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  return M >= 2 * nthreads * mr;
}
bool split_rows(const BsrCall& c) { return split_rows(c.M, c.path.mr); }

// bsr_linear_add_layer_norm's residual must have the GEMM output's shape (no broadcasting).
void check_residual(const at::Tensor& residual, const BsrCall& c) {
  BSBERT_CHECK(residual.sizes() == at::IntArrayRef(c.out_shape), "bsr_linear_add_layer_norm: residual shape ",
               residual.sizes(), " must equal the output shape ", at::IntArrayRef(c.out_shape), " (x.shape[:-1] + [",
               c.N, "])");
}

}  // namespace

at::Tensor bsr_linear_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                          const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                          int64_t out_features, int64_t in_features, int64_t block, bool gelu) {
  BsrCall c = prepare(x, crow, col, packed, bias, out_features, in_features, block, gelu);
  if (c.M > 0 && c.N > 0) {
    if (split_rows(c))
      run_row_tiles({RowStep{&c}});
    else
      run(c);
  }
  return c.y.view(c.out_shape);
}

// bsr_linear_add_layer_norm's own words for its LayerNorm's errors
const LayerNormNames kFusedLnNames{"bsr_linear_add_layer_norm", "ln_weight", "ln_bias", "out_features"};

// LayerNorm(bsr_linear(x) + residual): the values of bsr_linear followed by add_layer_norm, bit for
// bit (the GEMM output is rounded to x's dtype before the add, as there).
at::Tensor bsr_linear_add_layer_norm_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                                         const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                                         int64_t out_features, int64_t in_features, int64_t block,
                                         const at::Tensor& residual, const at::Tensor& ln_weight,
                                         const at::Tensor& ln_bias, double eps) {
  BsrCall c = prepare(x, crow, col, packed, bias, out_features, in_features, block, false);
  check_residual(residual, c);
  const at::Tensor y = c.y.view(c.out_shape);
  if (!split_rows(c) || c.N == 0) {
    if (c.M > 0 && c.N > 0) run(c);
    return add_layer_norm_named(y, residual, ln_weight, ln_bias, eps, kFusedLnNames);
  }
  AddLayerNormCall ln = add_layer_norm_prepare(y, residual, ln_weight, ln_bias, eps, y, kFusedLnNames);
  run_row_tiles({RowStep{&c, &ln.args, ln.rows_fn}});
  return y;
}

struct BsrRowChain::Impl {
  // deques: the steps point at calls and LayerNorm arguments added earlier
  std::deque<BsrCall> calls;
  std::deque<AddLayerNormCall> lns;
  std::deque<std::vector<float>> biases;
  std::vector<RowStep> steps;

  BsrCall& prepare_step(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& packed,
                        const std::optional<at::Tensor>& bias, int64_t n, int64_t k, int64_t block, bool gelu,
                        const at::Tensor& out) {
    float* bias_buf = nullptr;
    // (only for a bias of the right shape, so that n is the size of a real tensor: a huge n from
    // bert_encoder's ints would be a huge allocation before prepare's checks name the problem)
    if (bias.has_value() && bias->defined() && (block == 16 || block == 32 || block == 64) && bias->dim() == 1 &&
        bias->size(0) == n)
      bias_buf = biases.emplace_back((n + block - 1) / block * block).data();
    calls.push_back(prepare(x, crow, col, packed, bias, n, k, block, gelu, bias_buf, &out));
    BsrCall& c = calls.back();
    BSBERT_CHECK(c.M > 0 && c.N > 0 && c.K > 0 && split_rows(c),
                 "BsrRowChain: a linear with M = ", c.M, ", N = ", c.N, ", K = ", c.K,
                 " does not run on row tiles (check BsrRowChain::applies and the sizes before chaining)");
    BSBERT_CHECK(steps.empty() || (c.M == steps.front().call->M && c.path.mr == steps.front().call->path.mr),
                 "BsrRowChain: every linear of a chain must have the same rows and dtype");
    return c;
  }
};

BsrRowChain::BsrRowChain() : impl_(new Impl) {}
BsrRowChain::~BsrRowChain() = default;

bool BsrRowChain::applies(const at::Tensor& x) {
  if (x.dim() < 1 || !(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16)) return false;
  const int64_t M = x.numel() / std::max<int64_t>(1, x.size(-1));
  return split_rows(M, select_path(x.scalar_type() == at::kBFloat16).mr);
}

at::Tensor BsrRowChain::linear(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                               const at::Tensor& packed, const std::optional<at::Tensor>& bias, int64_t out_features,
                               int64_t in_features, int64_t block, bool gelu, const at::Tensor& out) {
  BsrCall& c = impl_->prepare_step(x, crow, col, packed, bias, out_features, in_features, block, gelu, out);
  impl_->steps.push_back(RowStep{&c});
  return c.y.view(c.out_shape);
}

at::Tensor BsrRowChain::linear_add_layer_norm(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                                              const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                                              int64_t out_features, int64_t in_features, int64_t block,
                                              const at::Tensor& residual, const at::Tensor& ln_weight,
                                              const at::Tensor& ln_bias, double eps, const at::Tensor& out) {
  BsrCall& c = impl_->prepare_step(x, crow, col, packed, bias, out_features, in_features, block, false, out);
  check_residual(residual, c);
  const at::Tensor y = c.y.view(c.out_shape);
  AddLayerNormCall& ln =
      impl_->lns.emplace_back(add_layer_norm_prepare(y, residual, ln_weight, ln_bias, eps, y, kFusedLnNames));
  impl_->steps.push_back(RowStep{&c, &ln.args, ln.rows_fn});
  return y;
}

void BsrRowChain::run() {
  if (!impl_->steps.empty()) run_row_tiles(impl_->steps);
}

void BsrRowChain::refresh_biases() {
  for (BsrCall& c : impl_->calls) {
    if (!c.bias_src.defined()) continue;
    // (a bias swapped for another size through .data or resize_ would overrun the fp32 copy)
    BSBERT_CHECK(c.bias_src.dim() == 1 && c.bias_src.size(0) == c.N && c.bias_src.is_floating_point(),
                 "bsr_linear: a bias of a prepared row chain changed to shape ", c.bias_src.sizes(), " / dtype ",
                 c.bias_src.scalar_type(), " (prepared for [", c.N, "] floating point); patch the model again");
    copy_bias(c.bias_src, c.bias, c.nbr * c.b);
  }
}

std::array<int64_t, 3> BsrRowChain::config() {
  return {static_cast<int64_t>(effective_isa()), env_kc(), static_cast<int64_t>(at::get_num_threads())};
}

}  // namespace cpu
}  // namespace bsbert

TORCH_LIBRARY_IMPL(bsbert, CPU, m) {
  m.impl("bsr_linear", &bsbert::cpu::bsr_linear_cpu);
  m.impl("bsr_linear_add_layer_norm", &bsbert::cpu::bsr_linear_add_layer_norm_cpu);
}
