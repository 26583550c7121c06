"""What the second core costs: the same patched seed-like model (CPU) run on 1 thread and on all threads,
alternating in one process, each thread count with its own probe of the FLOP bound's dense GEMM (the one
`bsbert bench` uses) right after its forwards. Prints, per thread count, the forward's median, the probe's
best rate and forward / bound; then how each scaled from 1 thread to N.

Why: `bsbert bench --threads 1` gives patched/bound 1.04-1.08 (stop 25) where 2-thread runs of bf16 at seq
128 give 1.09-1.17 (stops 24-25, outside the VM's slow phases). The difference splits into the forward's own scaling (serial Python between the ops, threads
that end a region apart, the attention's tail) and the probe's: on the 2-core VM the probe, whose 8 MB of
weights stay in L3, can scale past 2x in a calm phase and falls in a slow one while the 1-thread probe
holds. One process and interleaved rounds put both thread counts in the same phase of the machine.

    python scripts/thread_scaling.py [--seq 128] [--dtype bfloat16] [--rounds 12] [--threads N]
"""
import argparse
import statistics
import time

import torch

import bsbert
from bsbert import models
from bsbert.bench import _inputs
from bsbert.cli import positive_int, seq_fits_or_usage_error
from bsbert.timing import bert_dense_shapes, bound_probe, dense_gemm_gflops, probe_rate, threads_text


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--seq", type=positive_int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=positive_int, default=12)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="N (default: all, as bench)")
    args = ap.parse_args()
    if args.threads < 2:
        ap.error("--threads must be at least 2 (it is compared with 1 thread)")
    dt = getattr(torch, args.dtype)
    counts = (1, args.threads)
    torch.set_num_threads(args.threads)
    model = models.seed_like_model(dtype=dt).eval()
    seq_fits_or_usage_error(ap, model, args.seq)
    # which GEMM is the bound's, chosen as bench chooses it
    peak = dense_gemm_gflops("cpu", dt, shapes=bert_dense_shapes())
    probe, probe_flops = bound_probe(peak, "cpu")
    inp = _inputs(1, args.seq, model.config.vocab_size, torch.device("cpu"))
    bsbert.patch(model, tokens=args.seq, progress=False)
    remaining = model.bsbert_plan.flops(args.seq, "remaining")
    fwd = {n: [] for n in counts}
    rate = {n: [] for n in counts}
    with torch.inference_mode():
        for r in range(args.rounds):
            for n in counts if r % 2 == 0 else counts[::-1]:
                torch.set_num_threads(n)
                for _ in range(2):  # the other thread count's caches and thread pool state
                    model(**inp)
                for _ in range(4 * n):  # about the same wall time of forwards on either thread count
                    t0 = time.perf_counter()
                    model(**inp)
                    fwd[n].append(time.perf_counter() - t0)
                rate[n].append(probe_rate(probe, probe_flops, rounds=5, target_s=0.02))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{threads_text(n)} {fwd[n][-1] * 1e3:.2f} ms, probe {rate[n][-1]:.0f} GFLOP/s" for n in counts),
                flush=True)
    print(f"\nseed-like BERT-large, seq {args.seq}, {args.dtype}, {peak['label']} probe, {args.rounds} rounds")
    rows = {}
    for n in counts:
        f_ms = statistics.median(fwd[n]) * 1e3
        best = max(rate[n])
        bound_ms = remaining / (best * 1e9) * 1e3
        rows[n] = (f_ms, best, bound_ms)
        print(f"{threads_text(n)}: forward median {f_ms:.2f} ms, probe best {best:.0f} GFLOP/s "
              f"(median {statistics.median(rate[n]):.0f}), bound {bound_ms:.2f} ms, forward/bound {f_ms / bound_ms:.3f}")
    (f1, p1, b1), (fn, pn, bn) = rows[1], rows[args.threads]
    print(f"1 -> {args.threads} threads: forward {f1 / fn:.3f}x faster, probe {pn / p1:.3f}x; "
          f"forward/bound {f1 / b1:.3f} -> {fn / bn:.3f} = x{(fn / bn) / (f1 / b1):.3f} "
          f"(forward's scaling short of {args.threads}x: x{args.threads * fn / f1:.3f}; "
          f"probe's past {args.threads}x: x{pn / p1 / args.threads:.3f})")


if __name__ == "__main__":
    main()
