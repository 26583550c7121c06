"""How a shared machine's speed moves during a run: forwards of the patched seed-like model (CPU) in
1-second blocks, each block followed by a short probe of the FLOP bound's dense GEMM, then the fastest
and slowest thirds of the blocks side by side. On the 2-core VM (stop 22) the slowest third ran the
forward 10% and the dense probe 19% slower than the fastest: the two do not slow alike, so a bench run
whose probe and forwards fall in different phases mixes two machines.

    python scripts/phase_log.py [--seconds 150] [--seq 128] [--dtype bfloat16]
"""
import argparse
import math
import time

import torch

import bsbert
from bsbert import models
from bsbert.bench import _inputs
from bsbert.cli import positive_int, seq_fits_or_usage_error
from bsbert.timing import bert_dense_shapes, bound_probe, dense_gemm_gflops, probe_rate


def _positive_seconds(text: str) -> float:
    """--seconds: a finite number > 0 (0 ran no block, and the summary then failed on an empty list)."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--seconds", type=_positive_seconds, default=150)
    ap.add_argument("--seq", type=positive_int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    model = models.seed_like_model().eval().to(dt)
    seq_fits_or_usage_error(ap, model, args.seq)
    peak = dense_gemm_gflops("cpu", dt, shapes=bert_dense_shapes())
    probe, flops = bound_probe(peak, "cpu")
    inp = _inputs(1, args.seq, model.config.vocab_size, torch.device("cpu"))
    bsbert.patch(model, tokens=args.seq, progress=False)
    blocks = []
    with torch.inference_mode():
        for _ in range(20):
            model(**inp)
        t_end = time.time() + args.seconds
        while time.time() < t_end:
            ts, t_blk = [], time.perf_counter()
            while time.perf_counter() - t_blk < 1.0:
                t0 = time.perf_counter()
                model(**inp)
                ts.append(time.perf_counter() - t0)
            ts.sort()
            rate = probe_rate(probe, flops, rounds=5, target_s=0.02)
            blocks.append((ts[len(ts) // 2] * 1e3, rate))
            print(f"{time.strftime('%H:%M:%S')} forward median {blocks[-1][0]:.2f} ms ({len(ts)} forwards), "
                  f"{peak['label']} {rate:.0f} GFLOP/s", flush=True)
    blocks.sort()
    third = max(1, len(blocks) // 3)
    for name, part in (("fastest", blocks[:third]), ("slowest", blocks[-third:])):
        fwd = sum(b[0] for b in part) / len(part)
        rate = sum(b[1] for b in part) / len(part)
        print(f"{name} third of {len(blocks)} blocks: forward {fwd:.2f} ms, dense probe {rate:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
