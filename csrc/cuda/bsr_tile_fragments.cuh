// Pieces shared by the BSR GEMM kernels (bsr_linear_cuda.cu, bsr_linear_slab.cuh): the B fragments of a
// W block in shared memory, and the epilogue that stores an mma.sync accumulator tile.
#pragma once

#include "cuda/mma_utils.cuh"

namespace bsbert {
namespace cuda {

// B fragments of NT n8 tiles (rows row0.. of a BLOCK-wide swizzled W block, k16 step kk). W rows are
// output features (n), columns k: plain (non-transposed) ldmatrix yields the col-major B fragments of
// two n8 tiles at once.
template <int BLOCK, int NT, typename T>
__device__ __forceinline__ void load_w_fragments(uint32_t (&b)[NT][2], const T* sw, int row0, int kk, int lane) {
#pragma unroll
  for (int j = 0; j < NT / 2; ++j) {
    const int r = row0 + j * 16 + (lane & 7) + ((lane >> 4) << 3);
    const int ch = kk * 2 + ((lane >> 3) & 1);
    uint32_t t[4];
    ldmatrix_x4(t, smem_u32(sw + Swizzle<BLOCK>::chunk_offset(r, ch)));
    b[2 * j][0] = t[0];
    b[2 * j][1] = t[1];
    b[2 * j + 1][0] = t[2];
    b[2 * j + 1][1] = t[3];
  }
}

// y[row0 + 16*i + .., col0 + 8*j + ..] = act(acc + bias) for an MT x NT grid of m16n8 accumulators;
// rows >= M and columns >= N are never written.
template <typename T, int MT, int NT>
__device__ __forceinline__ void store_acc_tile(const float (&acc)[MT][NT][4], T* __restrict__ y,
                                               const T* __restrict__ bias, int M, int N, int row0, int col0,
                                               int lane, bool gelu) {
  using Ty = MmaType<T>;
  const bool pair_ok = (N % 2) == 0;  // 4-byte aligned pair stores
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int gn = col0 + j * 8 + (lane & 3) * 2;
    float b0 = 0.f, b1 = 0.f;
    if (bias != nullptr) {
      if (gn < N) b0 = Ty::to_float(bias[gn]);
      if (gn + 1 < N) b1 = Ty::to_float(bias[gn + 1]);
    }
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int gm = row0 + i * 16 + (lane >> 2) + h * 8;
        if (gm >= M) continue;
        float v0 = acc[i][j][2 * h] + b0, v1 = acc[i][j][2 * h + 1] + b1;
        if (gelu) {
          v0 = gelu_erf(v0);
          v1 = gelu_erf(v1);
        }
        T* dst = y + static_cast<int64_t>(gm) * N + gn;
        if (pair_ok && gn + 1 < N) {
          *reinterpret_cast<uint32_t*>(dst) = Ty::pack(v0, v1);
        } else {
          if (gn < N) dst[0] = Ty::from_float(v0);
          if (gn + 1 < N) dst[1] = Ty::from_float(v1);
        }
      }
    }
  }
}

}  // namespace cuda
}  // namespace bsbert
