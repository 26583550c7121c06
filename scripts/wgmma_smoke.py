"""First look at the Hopper wgmma BSR kernels (BSBERT_CUDA_BSR_TILE=wgslab...) on a GPU: each tile on a few
small shapes against an fp32 reference, printing the max error and, when it is wrong, where (max error per
8 x 8 patch of the first 64 x 32 output tile, and a few values), so a layout mistake can be read off one run.
Run before the test suite: a kernel that faults kills the process, not the suite. Exit status 1 on any error.

    python scripts/wgmma_smoke.py
"""
import math
import os
import sys

import torch

import bsbert  # noqa: F401  (loads bsbert._C)
from bsbert.formats import BlockSparseMatrix
from bsbert.ops.linear_backends import CudaBsr


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    tiles = [t for t in CudaBsr.runnable_tiles(32) if t.startswith("wgslab")]
    if not tiles:
        print(f"no wgmma tile runs on this GPU (capability {torch.cuda.get_device_capability()})")
        return 0
    gen = torch.Generator().manual_seed(0)
    bad = 0
    # (M, N, K, density): one dense block; two blocks along K; ragged M/N/K with an empty block row; a BERT shape
    for m, n, k, density in ((64, 32, 32, 1.0), (64, 32, 64, 1.0), (200, 96, 1000, 0.5), (3000, 1024, 1024, 0.25)):
        w = torch.randn(n, k, generator=gen) / math.sqrt(k)
        keep = torch.rand(-(-n // 32), -(-k // 32), generator=gen) < density
        keep[0, 0] = True
        if keep.shape[0] > 2:
            keep[1] = False
        w = w * keep.repeat_interleave(32, 0).repeat_interleave(32, 1)[:n, :k]
        for dtype in (torch.float16, torch.bfloat16):
            bsm = BlockSparseMatrix.from_dense(w.to(dtype), 32, pad=True).to("cuda")
            x = torch.randn(m, k, generator=gen).to(dtype).cuda()
            ref = x.float() @ bsm.to_dense().float().T
            for tile in tiles:
                os.environ["BSBERT_CUDA_BSR_TILE"] = tile
                y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                try:
                    y = torch.ops.bsbert.bsr_linear(x, bsm.crow_indices, bsm.col_indices, bsm.values, None, n, k,
                                                    32, False)
                    torch.cuda.synchronize()
                except Exception as exc:  # noqa: BLE001 (report and go on)
                    print(f"{tile} {dtype} M={m} N={n} K={k}: {type(exc).__name__}: {str(exc)[:300]}")
                    bad += 1
                    continue
                finally:
                    del os.environ["BSBERT_CUDA_BSR_TILE"]
                err = (y.float() - ref).abs()
                rel = (err.norm() / ref.norm()).item()
                tol = 1e-2 if dtype == torch.float16 else 3e-2
                ok = bool(torch.isfinite(y).all()) and rel < tol
                print(f"{tile} {dtype} M={m} N={n} K={k} d={density}: max abs err {err.max().item():.3e}, "
                      f"rel {rel:.2e} {'ok' if ok else 'WRONG'}")
                if not ok:
                    bad += 1
                    e = err[:64, :32]
                    patches = e.reshape(e.shape[0] // 8, 8, e.shape[1] // 8, 8).amax(dim=(1, 3)) if e.shape == (64, 32) \
                        else e
                    print("  max error per 8x8 patch of the first 64x32 tile:\n", patches.cpu())
                    print("  y[0, :8]  ", y[0, :8].float().cpu())
                    print("  ref[0, :8]", ref[0, :8].cpu())
                    print("  y[9, :8]  ", y[9, :8].float().cpu() if m > 9 else "")
                    print("  ref[9, :8]", ref[9, :8].cpu() if m > 9 else "")
    print("wgmma smoke:", "all ok" if not bad else f"{bad} failures")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
