"""GPU benchmark cases for the Triton kernels (shared by benchmarks/test_kernels_triton.py and
scripts/bench_triton.py). Needs CUDA; timings are medians of ``triton.testing.do_bench`` in ms.

Linear: ``y = x @ W.T`` with a block-sparse ``W`` [N, K] at a given block density, compared with
cuBLAS on the dense weight (``F.linear``) and ``torch.sparse._triton_ops.bsr_dense_mm`` (PyTorch's
Triton BSR kernel, computing ``(W @ x.T).T``). The target for a sparse kernel is
``cuBLAS time x density`` (perfect scaling with the work): ``ratio = time / target``, < 1 beats it.

Attention: bsbert's pruned-head attention on the fused qkv ``[B, S, 3*H*D]`` vs
``F.scaled_dot_product_attention`` on views of the same qkv plus the output relayout to
``[B, S, H*D]`` (what a model has to do to use SDPA on a fused projection).
"""
from __future__ import annotations

import math
import os
from unittest import mock

import torch
import torch.nn.functional as F

from bsbert.ops.linear_backends import CudaBsr, _has_kernel

DENSITIES = (1.0, 0.64, 0.5, 0.25, 0.1)
MS = (384, 384 * 8, 384 * 32)
NK = ((1024, 1024), (4096, 1024), (1024, 4096))  # (N, K): square, up (K->4K) and down (4K->K)
SEQS = (128, 384, 512)
HEADS = (1, 2, 4, 8, 12, 16)
ATTN_BATCH = 8


def do_bench_graph(fn) -> float:
    """Median GPU time of ``fn`` replayed from a CUDA graph (no Python/launch overhead), in ms."""
    import triton.testing

    fn()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def _graph_ms(res: dict, key: str, fn) -> None:
    """res[key] = do_bench_graph(fn); a call that cannot be captured leaves the reason in res."""
    try:
        res[key] = do_bench_graph(fn)
    except Exception as exc:
        res[key.replace("_ms", "_error")] = f"{type(exc).__name__}: {exc}"[:200]


def do_bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def random_bsm(n, k, block, density, dtype=torch.float16, device="cuda", seed=0):
    """A BlockSparseMatrix with exactly round(density * blocks) random nonzero blocks (>= 1)."""
    from bsbert.formats import BlockSparseMatrix

    gen = torch.Generator().manual_seed(seed)
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    total = nb * kb
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total, generator=gen)[:max(1, round(density * total))]] = True
    mask = keep.view(nb, kb).repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    w = torch.randn(n, k, generator=gen) / math.sqrt(k) * mask
    return BlockSparseMatrix.from_dense(w.to(device), block, pad=True, dtype=dtype)


def bench_linear(m, n, k, density, block=32, dtype=torch.float16, tiles=None) -> dict:
    """One linear shape: Triton, the CUDA C++ kernel (default tile, then each forced tile of `tiles`,
    default every tile that runs on this GPU), cuBLAS dense and torch's Triton BSR."""
    from bsbert.triton.bsr_linear import bsr_linear_triton

    bsm = random_bsm(n, k, block, density, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = bsm.to_dense().contiguous()
    res = {"M": m, "N": n, "K": k, "block": block, "density": density,
           "real_density": bsm.stats.block_density}
    y = bsr_linear_triton(x, bsm)
    torch.testing.assert_close(y, F.linear(x, w), atol=2e-2, rtol=2e-2)
    res["bsbert_ms"] = do_bench(lambda: bsr_linear_triton(x, bsm))
    res["cublas_ms"] = do_bench(lambda: F.linear(x, w))
    if _has_kernel("bsr_linear", "CUDA"):  # the CUDA C++ kernel (csrc/cuda), same inputs
        def cuda_cpp():
            return torch.ops.bsbert.bsr_linear(x, bsm.crow_indices, bsm.col_indices, bsm.values, None,
                                               n, k, block, False)
        try:  # a failure is recorded in the row, the sweep goes on
            torch.testing.assert_close(cuda_cpp(), F.linear(x, w), atol=2e-2, rtol=2e-2)
            res["cuda_ms"] = do_bench(cuda_cpp)
            res["cuda_ratio_vs_target"] = res["cuda_ms"] / (res["cublas_ms"] * res["real_density"])
            res["cuda_tflops"] = bsm.useful_flops(m) / res["cuda_ms"] * 1e-9
            res["cuda_graph_ms"] = do_bench_graph(cuda_cpp)
            res["cuda_tiles_graph_ms"] = {}
            for tile in CudaBsr.runnable_tiles(block) if tiles is None else tiles:  # each forced tile
                try:  # one tile failing (e.g. an x slab too wide for shared memory) costs its own column only
                    with mock.patch.dict(os.environ, {"BSBERT_CUDA_BSR_TILE": tile}):
                        torch.testing.assert_close(cuda_cpp(), F.linear(x, w), atol=2e-2, rtol=2e-2)
                        res["cuda_tiles_graph_ms"][tile] = do_bench_graph(cuda_cpp)
                except Exception as exc:
                    res["cuda_tiles_graph_ms"][tile] = None
                    res.setdefault("cuda_tile_errors", {})[tile] = f"{type(exc).__name__}: {exc}"[:200]
        except Exception as exc:
            res["cuda_error"] = f"{type(exc).__name__}: {exc}"[:300]
    # GPU time without host launch overhead: the same calls replayed from a CUDA graph
    _graph_ms(res, "triton_graph_ms", lambda: bsr_linear_triton(x, bsm))
    _graph_ms(res, "cublas_graph_ms", lambda: F.linear(x, w))
    try:
        from torch.sparse._triton_ops import bsr_dense_mm

        wb = w.to_sparse_bsr((block, block))
        xt = x.t().contiguous()
        bsr_dense_mm(wb, xt)
        res["torch_bsr_ms"] = do_bench(lambda: bsr_dense_mm(wb, xt))
    except Exception as exc:  # shape/dtype not supported by that kernel, or API moved
        res["torch_bsr_ms"] = None
        res["torch_bsr_error"] = f"{type(exc).__name__}: {exc}"[:200]
    target = res["cublas_ms"] * res["real_density"]
    res["target_ms"] = target
    res["ratio_vs_target"] = res["bsbert_ms"] / target
    res["speedup_vs_cublas"] = res["cublas_ms"] / res["bsbert_ms"]
    res["tflops"] = bsm.useful_flops(m) / res["bsbert_ms"] * 1e-9
    return res


def bench_attention(seq, heads, batch=ATTN_BATCH, head_dim=64, dtype=torch.float16,
                    padded=False) -> dict:
    from bsbert.triton.attention import pruned_attention_triton

    hd = heads * head_dim
    qkv = torch.randn(batch, seq, 3 * hd, device="cuda", dtype=dtype)
    scale = 1 / math.sqrt(head_dim)
    mask = None
    if padded:  # lengths spread over [S/2, S]
        lengths = torch.linspace(seq // 2, seq, batch, device="cuda").long()
        mask = torch.arange(seq, device="cuda")[None, :] < lengths[:, None]
    q, k, v = qkv.view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    attn_mask = None if mask is None else mask[:, None, None, :]

    def sdpa():
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        return o.transpose(1, 2).reshape(batch, seq, hd)

    def ours():
        return pruned_attention_triton(qkv, mask, heads, head_dim, scale)

    ref = sdpa()
    out = ours()
    # padded queries attend to the valid keys in both, so every row is comparable
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    res = {"B": batch, "S": seq, "H": heads, "D": head_dim, "padded": padded}
    res["bsbert_ms"] = do_bench(ours)
    res["sdpa_ms"] = do_bench(sdpa)
    if _has_kernel("pruned_attention", "CUDA"):  # the CUDA C++ kernel (csrc/cuda), same inputs
        def cuda_cpp():
            return torch.ops.bsbert.pruned_attention(qkv, mask, heads, head_dim, scale)
        try:  # a failure is recorded in the row, the sweep goes on
            torch.testing.assert_close(cuda_cpp(), ref, atol=2e-2, rtol=2e-2)
            res["cuda_ms"] = do_bench(cuda_cpp)
            res["cuda_speedup_vs_sdpa"] = res["sdpa_ms"] / res["cuda_ms"]
            res["cuda_graph_ms"] = do_bench_graph(cuda_cpp)
        except Exception as exc:
            res["cuda_error"] = f"{type(exc).__name__}: {exc}"[:300]
    res["speedup_vs_sdpa"] = res["sdpa_ms"] / res["bsbert_ms"]
    _graph_ms(res, "triton_graph_ms", ours)
    _graph_ms(res, "sdpa_graph_ms", sdpa)
    return res
