"""Forward time of the seed-like model with busy processes on the same cores: bsbert patched vs torch
eager (masked dense), per thread count. The CPU kernels synchronise their threads a few times per layer;
when the OS pauses one of them for another process, every thread waits. This shows how much that costs
and what `torch.set_num_threads` does about it.

    python scripts/contention.py --seq 128 --dtype bfloat16 --busy 0 2 --threads 2 1

Each (busy, threads) cell: median and best of --repeats forwards (ms). Busy processes are plain Python
spin loops, one per --busy, started before and stopped after each cell.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch

from bsbert.timing import time_fn


def _spin(stop):
    # a pure CPU hog: the Event (a semaphore underneath) is looked at every 50 ms only; polling it in the
    # loop blocked in futex calls often enough to leave the cores mostly free (2 busy: 79 vs 240 ms)
    while not stop.is_set():
        t = time.monotonic() + 0.05
        while time.monotonic() < t:
            pass


def _time(model, inp, repeats: int) -> tuple[float, float]:
    t = time_fn(lambda: model(**inp), repeats=repeats, warmup=2)
    return t["median_ms"], t["min_ms"]


def main() -> None:
    import bsbert
    from bsbert import models
    from bsbert.cli import non_negative_int, positive_int, seq_fits_or_usage_error
    from bsbert.verify import example_inputs

    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--seq", type=positive_int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--busy", type=non_negative_int, nargs="+", default=[0, 2], help="busy processes per cell")
    ap.add_argument("--threads", type=positive_int, nargs="+", default=[2, 1])
    ap.add_argument("--repeats", type=positive_int, default=20)
    ap.add_argument("--no-dense", action="store_true", help="skip torch eager (slow under contention)")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    dense = models.seed_like_model(dtype=dtype).eval()
    # example_inputs would cap a longer --seq at the position table, and the header would say --seq
    seq_fits_or_usage_error(ap, dense, a.seq)
    inp = example_inputs(dense, 1, a.seq, padded=False)
    patched = bsbert.patch(models.seed_like_model(dtype=dtype).eval(), tokens=a.seq, progress=False)
    print(f"seed-like BERT-large, batch 1, seq {a.seq}, {a.dtype}; ms per forward, median / best of {a.repeats}")
    print(f"{'busy':>4} {'threads':>7} {'bsbert patched':>16} {'torch eager dense':>18}")
    for busy in a.busy:
        for nt in a.threads:
            torch.set_num_threads(nt)
            stop = mp.Event()
            procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
            for p in procs:
                p.start()
            try:
                time.sleep(0.5 if busy else 0)
                pm, pb = _time(patched, inp, a.repeats)
                cell = "-" if a.no_dense else "{:.1f} / {:.1f}".format(*_time(dense, inp, max(3, a.repeats // 4)))
            finally:
                stop.set()
                for p in procs:
                    p.join()
            print(f"{busy:>4} {nt:>7} {f'{pm:.1f} / {pb:.1f}':>16} {cell:>18}", flush=True)


if __name__ == "__main__":
    main()
