"""Does reading each weight block once (block-row split) beat streaming all weights per thread (row
split) when the weights come from DRAM? bsr_linear at M rows over N_MATS distinct 4096x1024 block-sparse
matrices (~250 MB in bf16 at density 0.25, more than any cache), cycled; best of 8 interleaved sweeps.

    python scripts/weights_once_vs_per_thread.py [M] [density] [dtype]

rows: the default row split (each thread takes M / threads rows and streams every weight block).
blocks-1tile: BSBERT_BSR_SPLIT=blocks with one M tile (each block row claimed by one thread: the weights
are read once in all; x packed once and shared). blocks-mc96: the block-row split's default M tiles of
<= 96 rows (two tiles at M = 128: the weights are read twice again).
"""
import argparse
import math
import os
import time

import torch

from bsbert.cli import positive_int  # (importing bsbert loads the ops)
from bsbert.formats import BlockSparseMatrix
from bsbert.ops.packing import pack_cpu

N, K, N_MATS = 4096, 1024, 120


def _density(text: str) -> float:
    """A block density in (0, 1]: 1.5 kept every block and was printed as density=1.5; 0 kept none."""
    value = float(text)
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"must be a block density in (0, 1], got {text}")
    return value


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("m", nargs="?", type=positive_int, default=128, metavar="M", help="rows of x")
    ap.add_argument("density", nargs="?", type=_density, default=0.25, help="block density of the weights")
    ap.add_argument("dtype", nargs="?", default="bfloat16", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    m, density, dtype = args.m, args.density, getattr(torch, args.dtype)
    torch.manual_seed(0)
    mats = []
    for _ in range(N_MATS):
        keep = (torch.rand(N // 32, K // 32) < density).repeat_interleave(32, 0).repeat_interleave(32, 1)
        bsm = BlockSparseMatrix.from_dense((torch.randn(N, K) * keep).to(dtype), 32)
        mats.append((bsm.crow_indices.int(), bsm.col_indices.int(), pack_cpu(bsm, dtype), bsm.nnz_blocks))
    x = torch.randn(m, K).to(dtype)
    flops = sum(2 * m * nnz * 32 * 32 for *_, nnz in mats)
    modes = {"rows": {}, "blocks-1tile": {"BSBERT_BSR_SPLIT": "blocks", "BSBERT_BSR_MC": str(m + 12)},
             "blocks-mc96": {"BSBERT_BSR_SPLIT": "blocks"}}
    best = {k: float("inf") for k in modes}
    with torch.inference_mode():
        for _ in range(8):
            for name, env in modes.items():
                for var in ("BSBERT_BSR_SPLIT", "BSBERT_BSR_MC"):
                    os.environ.pop(var, None)
                os.environ.update(env)
                for crow, col, packed, _ in mats:  # warm the code path, not the weights (they do not fit)
                    torch.ops.bsbert.bsr_linear(x, crow, col, packed, None, N, K, 32, False)
                t = time.perf_counter()
                for crow, col, packed, _ in mats:
                    torch.ops.bsbert.bsr_linear(x, crow, col, packed, None, N, K, 32, False)
                best[name] = min(best[name], time.perf_counter() - t)
    print(f"M={m} density={density} {dtype} {torch.get_num_threads()} threads, {N_MATS} matrices {N}x{K}")
    for name, t in best.items():
        print(f"  {name:13s} {t * 1e3:8.2f} ms  {flops / t / 1e9:7.1f} GFLOP/s")


if __name__ == "__main__":
    main()
