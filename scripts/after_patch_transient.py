"""How long the patched model takes to reach its steady state: the forwards right after `patch`, timed
one by one. Prints the median of forwards 2-11 (what a one-call warm-up + 10 repeats measured before
`bsbert bench --warmup-s`), 21-40 and 41-80, and their ratio.

    python scripts/after_patch_transient.py [seq] [dtype]
"""
import argparse
import statistics
import time

import torch

import bsbert
from bsbert import models
from bsbert.bench import _inputs
from bsbert.cli import positive_int, seq_fits_or_usage_error


def main():
    # argparse: a bad seq or dtype ("bf16", "-5") is a usage error before the model is built, not a traceback
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("seq", nargs="?", type=positive_int, default=128)
    ap.add_argument("dtype", nargs="?", default="bfloat16", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    seq, dtype = args.seq, getattr(torch, args.dtype)
    model = models.seed_like_model().eval().to(dtype)
    seq_fits_or_usage_error(ap, model, seq)
    inp = _inputs(1, seq, model.config.vocab_size, torch.device("cpu"))
    bsbert.patch(model, tokens=seq, progress=False)
    ts = []
    with torch.inference_mode():
        for _ in range(80):
            t0 = time.perf_counter()
            model(**inp)
            ts.append((time.perf_counter() - t0) * 1e3)
    first, mid, steady = statistics.median(ts[1:11]), statistics.median(ts[20:40]), statistics.median(ts[40:80])
    print(f"seq {seq} {dtype}: forwards 2-11 {first:.2f} ms | 21-40 {mid:.2f} | 41-80 {steady:.2f}"
          f" -> first / steady {first / steady:.3f}")


if __name__ == "__main__":
    main()
