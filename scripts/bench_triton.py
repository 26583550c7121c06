#!/usr/bin/env python
r"""Benchmark bsbert's Triton kernels on the GPU and print markdown tables (for benchmarks/results/).

    python scripts/bench_triton.py [--blocks 32] [--quick] [--no-attention] \
        > benchmarks/results/triton_<gpu>.md

Linear: bsbert BSR GEMM (Triton and, when built, CUDA C++) vs cuBLAS dense (F.linear) vs torch.sparse._triton_ops.bsr_dense_mm, fp16,
densities 1.0/0.64/0.5/0.25/0.1, M = 384, 3072, 12288, (N, K) = 1024x1024, 4096x1024, 1024x4096.
``target = cuBLAS x density``; ``ratio`` = bsbert / target (< 1: better than proportional scaling).
Attention: bsbert pruned-head attention vs F.scaled_dot_product_attention (plus the relayout it
needs), fp16, batch 8, D = 64, seq 128/384/512, heads 1..16. Times: do_bench medians in ms.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _fmt(v, digits=3):
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--blocks", default="32", help="comma-separated block sizes (16,32,64)")
    ap.add_argument("--quick", action="store_true", help="M = 12288 only, fewer heads")
    ap.add_argument("--ms", default="", help="comma-separated M values for the linear sweep (overrides --quick)")
    ap.add_argument("--densities", default="", help="comma-separated block densities (default: 1,0.64,0.5,0.25,0.1)")
    ap.add_argument("--nk", default="", help="comma-separated NxK shapes, e.g. 1024x1024,4096x1024 (default: all)")
    ap.add_argument("--tiles", default="", help="comma-separated CUDA tiles to force, e.g. 128x4,slab64x8 "
                    "(default: every tile that runs on this GPU)")
    ap.add_argument("--no-linear", action="store_true")
    ap.add_argument("--no-attention", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from bsbert.triton import _bench

    errors: list[str] = []
    props = torch.cuda.get_device_properties(0)
    print(f"# bsbert Triton kernels on {props.name}\n")
    print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}; "
          f"times are medians (ms), fp16.\n")

    if not args.no_linear:
        ms = tuple(int(v) for v in args.ms.split(",")) if args.ms else (384 * 32,) if args.quick else _bench.MS
        print("## Block-sparse linear y = x @ W.T\n")
        print("Times are GPU time (each call replayed from a CUDA graph, no launch overhead); `wall` is the "
              "plain do_bench time of Triton / CUDA / cuBLAS (includes host overhead). Triton = bsbert's "
              "Triton kernel, CUDA = bsbert's CUDA C++ kernel (csrc/cuda) with its default tile, `CUDA tiles` = "
              "the same forced to each rows x warps tile (BSBERT_CUDA_BSR_TILE), best = the fastest of them. "
              "Useful TFLOP/s count non-zero blocks only; cuBLAS computes the whole "
              "dense matrix. ratio = best bsbert / (cuBLAS x density): <= 1.43 meets '>= 70% of cuBLAS'.\n")
        print("| block | N | K | M | density | Triton ms | CUDA ms | CUDA tiles ms | cuBLAS ms | "
              "torch bsr_dense_mm ms (wall) | Triton TFLOP/s | CUDA TFLOP/s | CUDA best tile TFLOP/s | "
              "cuBLAS TFLOP/s | ratio | wall ms T / C / cuBLAS |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        tiles = tuple(args.tiles.split(",")) if args.tiles else None  # None: every tile that runs here
        for block in (int(b) for b in args.blocks.split(",")):
            nks = [tuple(int(v) for v in nk.split("x")) for nk in args.nk.split(",")] if args.nk else _bench.NK
            for n, k in nks:
                for m in ms:
                    for d in (tuple(float(v) for v in args.densities.split(",")) if args.densities
                              else _bench.DENSITIES):
                        r = _bench.bench_linear(m, n, k, d, block=block, tiles=tiles)
                        where = f"linear block={block} M={m} N={n} K={k} d={d}"
                        for key in ("cuda_error", "triton_graph_error", "cublas_graph_error"):
                            if key in r:
                                errors.append(f"{where} {key}: {r[key]}")
                        for tile, err in (r.get("cuda_tile_errors") or {}).items():
                            errors.append(f"{where} tile {tile}: {err}")
                        fl = 2 * m * n * k
                        useful = fl * r["real_density"]
                        # not `tiles`: that is the --tiles choice every later bench_linear call must get
                        tile_ms = r.get("cuda_tiles_graph_ms") or {}
                        if any(v is not None for v in tile_ms.values()):
                            r["cuda_best_tile_graph_ms"] = min(v for v in tile_ms.values() if v is not None)
                        tf = {key: (useful / r[key] * 1e-9 if r.get(key) else None)
                              for key in ("triton_graph_ms", "cuda_graph_ms", "cuda_best_tile_graph_ms")}
                        cub = r.get("cublas_graph_ms")
                        best = min((r[key] for key in tf if r.get(key)), default=None)
                        tiles_s = ", ".join(f"{t} {_fmt(v)}" for t, v in tile_ms.items()) or "n/a"
                        ratio = best / (cub * r["real_density"]) if best and cub else None
                        print(f"| {block} | {n} | {k} | {m} | {r['real_density']:.2f} | "
                              f"{_fmt(r.get('triton_graph_ms'))} | {_fmt(r.get('cuda_graph_ms'))} | "
                              f"{tiles_s} | {_fmt(cub)} | {_fmt(r['torch_bsr_ms'])} | "
                              f"{_fmt(tf['triton_graph_ms'], 1)} | {_fmt(tf['cuda_graph_ms'], 1)} | "
                              f"{_fmt(tf['cuda_best_tile_graph_ms'], 1)} | {_fmt(fl / cub * 1e-9 if cub else None, 1)} | "
                              f"{_fmt(ratio, 2)} | {_fmt(r['bsbert_ms'])} / {_fmt(r.get('cuda_ms'))} / "
                              f"{_fmt(r['cublas_ms'])} |", flush=True)
        print()

    if not args.no_attention:
        heads = (1, 4, 12) if args.quick else _bench.HEADS
        print(f"## Pruned-head attention (B={_bench.ATTN_BATCH}, D=64)\n")
        print("GPU time (CUDA graph replay) in ms; speedup = SDPA / kernel; `wall` = plain do_bench of "
              "Triton / CUDA / SDPA (includes host overhead).\n")
        print("| S | H | padding mask | Triton ms | CUDA ms | SDPA (+relayout) ms | Triton speedup | "
              "CUDA speedup | wall ms T / C / SDPA |")
        print("|---|---|---|---|---|---|---|---|---|")
        for s in _bench.SEQS:
            for h in heads:
                for padded in (False, True):
                    r = _bench.bench_attention(s, h, padded=padded)
                    for key in ("cuda_error", "triton_graph_error", "sdpa_graph_error"):
                        if key in r:
                            errors.append(f"attention S={s} H={h} padded={padded} {key}: {r[key]}")
                    sd, tr, cu = r.get("sdpa_graph_ms"), r.get("triton_graph_ms"), r.get("cuda_graph_ms")
                    print(f"| {s} | {h} | {'yes' if padded else 'no'} | {_fmt(tr)} | {_fmt(cu)} | {_fmt(sd)} | "
                          f"{_fmt(sd / tr if sd and tr else None, 2)} | {_fmt(sd / cu if sd and cu else None, 2)} | "
                          f"{_fmt(r['bsbert_ms'])} / {_fmt(r.get('cuda_ms'))} / {_fmt(r['sdpa_ms'])} |",
                          flush=True)
        print()
    if errors:
        print("## Errors\n")
        print("\n".join(f"- {e}" for e in errors))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
