"""The Hopper wgmma BSR kernel's W copy modes side by side (BSBERT_CUDA_WGSLAB_COPY: cpasync, cpasync-nofence,
bulk, tma; see csrc/cuda/bsr_linear_wgmma.cuh): for one mode per process (a fault must not hide the other
modes), each wgmma tile on BERT-large shapes, checked against an fp32 reference, then timed from CUDA-graph
replays next to the mma.sync slab kernel and cuBLAS dense in the same process. 'bulk' repacks W per call
inside the op: its row also gives the repack alone, so the kernel's own time is op - repack.

    for c in cpasync cpasync-nofence bulk tma; do python scripts/wgmma_variants.py --copy $c; done
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

import bsbert  # noqa: F401  (loads bsbert._C)
from bsbert.ops.linear_backends import CudaBsr
from bsbert.triton._bench import do_bench_graph, random_bsm

SHAPES = ((12288, 1024, 1024, 1.0), (12288, 1024, 1024, 0.5), (12288, 1024, 1024, 0.25),
          (3072, 4096, 1024, 0.25), (12288, 4096, 1024, 0.25))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copy", required=True, choices=["cpasync", "cpasync-nofence", "bulk", "tma"])
    ap.add_argument("--baselines", action="store_true", help="also time slab64x8 and cuBLAS dense")
    a = ap.parse_args()
    tiles = [t for t in CudaBsr.runnable_tiles(32) if t.startswith("wgslab")]
    if not tiles:
        print("no wgmma tile runs here")
        return 2
    os.environ["BSBERT_CUDA_WGSLAB_COPY"] = a.copy
    bad = 0
    for m, n, k, d in SHAPES:
        bsm = random_bsm(n, k, 32, d, torch.float16)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = bsm.to_dense()
        ref = F.linear(x.float(), w.float())
        useful = 2 * m * n * k * bsm.stats.block_density

        def call():
            return torch.ops.bsbert.bsr_linear(x, bsm.crow_indices, bsm.col_indices, bsm.values, None, n, k, 32,
                                               False)

        cells = []
        for tile in tiles:
            os.environ["BSBERT_CUDA_BSR_TILE"] = tile
            try:
                y = call()
                torch.cuda.synchronize()
                rel = ((y.float() - ref).norm() / ref.norm()).item()
                ok = bool(torch.isfinite(y).all()) and rel < 1e-2
                bad += not ok
                ms = do_bench_graph(call)
                cells.append(f"{tile} {ms:.4f} ms {useful / ms * 1e-9:.0f} TF/s rel {rel:.1e}{'' if ok else ' WRONG'}")
            except Exception as exc:  # noqa: BLE001 (report, go on)
                bad += 1
                cells.append(f"{tile} {type(exc).__name__}: {str(exc)[:200]}")
        del os.environ["BSBERT_CUDA_BSR_TILE"]
        if a.copy == "bulk":
            repack = do_bench_graph(lambda: bsm.values.view(-1, 4, 8, 4, 8).permute(0, 1, 3, 2, 4).contiguous())
            cells.append(f"repack alone {repack:.4f} ms")
        if a.baselines:
            os.environ["BSBERT_CUDA_BSR_TILE"] = "slab64x8"
            slab = do_bench_graph(call)
            del os.environ["BSBERT_CUDA_BSR_TILE"]
            cub = do_bench_graph(lambda: F.linear(x, w))
            cells.append(f"slab64x8 {slab:.4f} ms, cuBLAS dense {cub:.4f} ms (x density {cub * d:.4f})")
        print(f"{a.copy} M={m} N={n} K={k} d={d}: " + "; ".join(cells), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
