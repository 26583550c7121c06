"""bsbert's CPU attention kernel vs torch SDPA (the torch-sdpa backend's exact call path), interleaved.

Each round times every candidate once per configuration (a few calls each, in alternating order), so
noise from other work on the machine hits all candidates alike; the table shows the best and median
round. GFLOP/s counts 4*B*H*S*S*D (the two matmuls).

With --dtype bfloat16 on a CPU with avx512_bf16, bsbert runs its bf16 dot-product path; the widening
path (bf16 read as fp32, fp32 FMAs; what BSBERT_CPU_ISA=avx512 selects) is timed too, in the same
rounds, as a third candidate ("bsbert widen").

    python scripts/bench_cpu_attention.py [--heads 2 10 16] [--seq 128 384] [--dtype float32] [--rounds 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bsbert import _ext
from bsbert.cli import positive_int
from bsbert.ops.attention_backends import ATTENTION_BACKENDS


def _per_call(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def _with_isa(isa, fn):
    """fn with BSBERT_CPU_ISA=isa for the duration of the call (read by the op on every call)."""
    def call():
        old = os.environ.get("BSBERT_CPU_ISA")
        os.environ["BSBERT_CPU_ISA"] = isa
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["BSBERT_CPU_ISA"]
            else:
                os.environ["BSBERT_CPU_ISA"] = old
    return call


def bench(b, s, h, d, dtype, rounds, padded, widen):
    qkv = torch.randn(b, s, 3 * h * d).to(dtype)
    scale = d ** -0.5
    mask4, kpm = None, None
    if padded:  # last quarter of the keys of every sequence is padding
        kpm = torch.ones(b, s, dtype=torch.bool)
        kpm[:, s - s // 4:] = False
        mask4 = kpm[:, None, None, :]
    sdpa = ATTENTION_BACKENDS["torch-sdpa"]
    fns = {"torch-sdpa": lambda: sdpa(qkv, mask4, h, d, scale),
           "bsbert-cpu": lambda: torch.ops.bsbert.pruned_attention(qkv, kpm, h, d, scale)}
    if widen:
        fns["bsbert-widen"] = _with_isa("avx512", fns["bsbert-cpu"])
    flops = 4 * b * h * s * s * d
    calls = max(1, int(1e8 // flops))  # ~0.5-1 ms per timed sample
    times = {n: [] for n in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for r in range(rounds):
            for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                times[n].append(_per_call(fns[n], calls))
    return {n: (min(t), statistics.median(t), flops / min(t) / 1e9) for n, t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    # positive_int: 0 heads / tokens / rounds failed deep in the timing loop, --threads 0 was silently ignored
    ap.add_argument("--heads", type=positive_int, nargs="+", default=[2, 10, 16])
    ap.add_argument("--seq", type=positive_int, nargs="+", default=[128, 384])
    ap.add_argument("--batch", type=positive_int, default=1)
    ap.add_argument("--head-dim", type=positive_int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=positive_int, default=30)
    ap.add_argument("--padded", action="store_true", help="mask the last quarter of the keys")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not _ext.has_op("pruned_attention"):
        raise SystemExit(f"bsbert extension unavailable: {_ext.reason_unavailable()}")
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU ISA {_ext.load().cpu_isa()}, "
          f"B={args.batch} D={args.head_dim} {args.dtype}{' padded' if args.padded else ''}, "
          f"{args.rounds} rounds")
    widen = dtype == torch.bfloat16 and _ext.load().cpu_isa().startswith("avx512_bf16")
    head = ("| S | H | SDPA best ms | SDPA median ms | SDPA GFLOP/s | bsbert best ms | bsbert median ms "
            "| bsbert GFLOP/s | speed-up (best) |")
    if widen:
        head += " widen best ms | widen median ms | widen GFLOP/s | bsbert vs widen (best) |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for s in args.seq:
        for h in args.heads:
            r = bench(args.batch, s, h, args.head_dim, dtype, args.rounds, args.padded, widen)
            a, c = r["torch-sdpa"], r["bsbert-cpu"]
            row = (f"| {s} | {h} | {a[0]*1e3:.3f} | {a[1]*1e3:.3f} | {a[2]:.0f} | {c[0]*1e3:.3f} | "
                   f"{c[1]*1e3:.3f} | {c[2]:.0f} | {a[0]/c[0]:.2f}x |")
            if widen:
                w = r["bsbert-widen"]
                row += f" {w[0]*1e3:.3f} | {w[1]*1e3:.3f} | {w[2]:.0f} | {w[0]/c[0]:.2f}x |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
