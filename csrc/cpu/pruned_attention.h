#pragma once
// Plain-C++ interface between the torch-facing attention ops (pruned_attention_cpu.cpp, baseline ISA)
// and the per-ISA arithmetic (pruned_attention_{portable,avx2,avx512}.cpp). No torch headers: the ISA
// translation units compile all they include with their target flags.
//
// Both ops (padded and varlen) are described as a list of sequences: sequence b has len[b] tokens,
// token j of it at qkv + qkv_off[b] + j * ld_qkv (elements, last dim laid out (3, H, D)), its context
// row at out + out_off[b] + j * ld_out (laid out (H, D)).
#include <cstdint>

namespace bsbert {
namespace cpu {

// Largest head_dim: the pack step widens W key rows into a stack buffer of W * kAttnMaxHeadDim floats.
constexpr int64_t kAttnMaxHeadDim = 1024;

struct AttnArgs {
  const void* qkv;
  bool bf16;               // qkv and out are bf16 (else fp32); fp32 arithmetic except in the bf16-dot path
  int64_t H, D;            // D: a multiple of 16, <= kAttnMaxHeadDim
  int64_t ld_qkv;
  const int64_t* qkv_off;  // [B]
  const int64_t* len;      // [B]
  void* out;
  int64_t ld_out;
  const int64_t* out_off;  // [B]
  float scale;             // softmax scale (fp32 path: Q is multiplied by it, scores in natural units)
  float scale_log2;        // softmax scale * log2(e) (bf16-dot path: scores in base 2)

  // Workspace. Keys of sequence b are padded to a whole number of panels (AttnGeometry::panel keys):
  // ws_off[b] = padded keys of the sequences before b, ws_off[B] = total.
  const int64_t* ws_off;   // [B + 1]
  float* kt;               // K^T of (b, h) at kt + (ws_off[b] * H + h * lpad_b) * D: panels [lpad/P][D][P]
  float* v;                // V of (b, h) at the same offset in v: [lpad][D]
                           // (bf16-dot path: offsets / 2, K^T panels [D/2][P] and V [lpad/2][D] of bf16 pairs)
  const float* kbias;      // [ws_off[B]] at kbias + ws_off[b]: 0 = attend, -inf = masked or padding
  const uint8_t* live;     // [ws_off[B] / P] at live + ws_off[b] / P: panel has a key to attend to
  int64_t kc;              // keys per online-softmax step (a multiple of the panel)
  int64_t mq;              // query rows per task (a multiple of AttnGeometry::rows)
  bool pf_q;                // pack also prefetches the head's Q rows (into L2)
  int64_t pf_rows;         // software prefetch distance in token rows (0 = off), see the kernel's pack
};

struct AttnGeometry {
  int panel;  // keys per packed K^T panel
  int rows;   // query-tile granularity (every register tile's row count divides it)
};

// Packs K^T and V of (sequence b, head h), panels [p0, p1) (dead panels are skipped).
using AttnPackFn = void (*)(const AttnArgs&, int64_t b, int64_t h, int64_t p0, int64_t p1);
// Context rows [i0, min(len, i0 + mq)) of (b, h). scratch: attn_scratch_floats(...) floats.
using AttnTaskFn = void (*)(const AttnArgs&, int64_t b, int64_t h, int64_t i0, float* scratch);

struct AttnPath {
  AttnPackFn pack;
  AttnTaskFn task;
  AttnGeometry geo;
};

inline int64_t attn_scratch_floats(int64_t mq, int64_t D, int64_t kc) {
  return mq * (2 * D + kc + 2 + 16) + 64;  // per row: q, ctx, scores, max, sum, max per lane (W <= 16)
}

// One per ISA translation unit (the AVX ones fall back to portable off x86-64).
AttnPath attn_path_portable();
AttnPath attn_path_avx2();
AttnPath attn_path_avx512();
// bf16 qkv only (vdpbf16ps products; needs avx512_bf16).
AttnPath attn_path_avx512bf16();

}  // namespace cpu
}  // namespace bsbert
