"""Calls each bsbert CUDA kernel once on small ragged inputs (for compute-sanitizer memcheck/racecheck and
ncu). Exercises every bsr_linear tile configuration (blocks 16/32/64, every rows x warps tile), M and N/K
tails, an empty block row, bias+GELU, and attention with padding masks (a fully padded row) and varlen
lengths 0 and 1. Usage: python scripts/cuda_sanitizer_driver.py [--only bsr|attention] [--big]
[--shape M,N,K,density] (one block-32 bsr_linear of that shape, e.g. for ncu; BSBERT_CUDA_BSR_TILE picks the tile)
"""
import argparse
import math
import os

import torch

import bsbert  # noqa: F401  (loads bsbert._C)
from bsbert.formats import BlockSparseMatrix
from bsbert.ops.linear_backends import CudaBsr


def bsr(big: bool, shape: str = ""):
    gen = torch.Generator().manual_seed(0)
    density = 0.5
    shapes = [(1, 64, 64, 32), (37, 100, 90, 32), (130, 200, 136, 16), (150, 130, 200, 64),
              (2000, 768, 768, 32), (2000, 256, 256, 64), (2000, 256, 256, 16)]
    if big:
        shapes = [(4096, 3072, 768, 32), (4096, 768, 3072, 32)]
    if shape:
        m, n, k, density = (float(v) for v in shape.split(","))
        shapes, big = [(int(m), int(n), int(k), 32)], True
    for dtype in (torch.float16, torch.bfloat16):
        for m, n, k, b in shapes:
            w = torch.randn(n, k, generator=gen) / math.sqrt(k)
            keep = (torch.rand(-(-n // b), -(-k // b), generator=gen) < density)
            keep[keep.shape[0] // 2] = False
            w = w * keep.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k]
            bsm = BlockSparseMatrix.from_dense(w.to(dtype), b, pad=True).to("cuda")
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            bias = torch.randn(n, dtype=dtype, device="cuda")
            y = torch.ops.bsbert.bsr_linear(x, bsm.crow_indices, bsm.col_indices, bsm.values, bias, n, k, b, True)
            if m >= 2000 and not big:  # every tile configuration, forced (the heuristic picks one per shape)
                for tile in CudaBsr.runnable_tiles(b):
                    os.environ["BSBERT_CUDA_BSR_TILE"] = tile
                    y2 = torch.ops.bsbert.bsr_linear(x, bsm.crow_indices, bsm.col_indices, bsm.values, bias, n, k,
                                                     b, True)
                    del os.environ["BSBERT_CUDA_BSR_TILE"]
                    torch.testing.assert_close(y2, y)
            if not big:
                ref = torch.nn.functional.gelu(x.float() @ bsm.to_dense().float().T + bias.float())
                err = (y.float() - ref).abs().max().item()
                print(f"bsr_linear {dtype} M={m} N={n} K={k} b={b}: max abs err {err:.3e}")
    x = torch.randn(33, 70, device="cuda")
    bsm = BlockSparseMatrix.from_dense(torch.randn(50, 70), 16, pad=True).to("cuda")
    torch.ops.bsbert.bsr_linear(x, bsm.crow_indices, bsm.col_indices, bsm.values, None, 50, 70, 16, False)


def attention():
    for dtype in (torch.float16, torch.bfloat16):
        for d in (32, 64):
            h, b, s = 3, 3, 130
            qkv = torch.randn(b, s, 3 * h * d, dtype=dtype, device="cuda")
            mask = torch.ones(b, s, dtype=torch.bool, device="cuda")
            mask[1, 50:] = False
            mask[2] = False
            torch.ops.bsbert.pruned_attention(qkv, mask, h, d, 1 / math.sqrt(d))
            torch.ops.bsbert.pruned_attention(qkv, None, h, d, 1 / math.sqrt(d))
            lens = torch.tensor([0, 1, 5, 70, 129], dtype=torch.int32)
            cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).int()]).cuda()
            qkv2 = torch.randn(int(lens.sum()), 3 * h * d, dtype=dtype, device="cuda")
            torch.ops.bsbert.pruned_attention_varlen(qkv2, cu, 129, h, d, 0.125)
    print("attention: done")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["bsr", "attention"])
    ap.add_argument("--big", action="store_true", help="BERT-sized bsr_linear only (for ncu)")
    ap.add_argument("--shape", default="", help="M,N,K,density: one block-32 bsr_linear of that shape only")
    a = ap.parse_args()
    if a.only in (None, "bsr"):
        bsr(a.big, a.shape)
    if a.only in (None, "attention") and not (a.big or a.shape):
        attention()
    torch.cuda.synchronize()
