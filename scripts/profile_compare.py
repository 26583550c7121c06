"""Where a forward's time goes, packed vs patched: the seed-like model patched with dense kernels only
(format="dense") and fully (per-linear backends by measurement), each profiled over a few forwards with
torch.profiler; prints the chosen backends and the top kernels / ops by device time (self CPU time on CPU).
For finding why the patched model is slower than the packed one at some batch / sequence.

    python scripts/profile_compare.py --device cuda --dtype float16 --batch 32 --seq 128
    python scripts/profile_compare.py --small        # 2 layers, CPU, quick
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import bsbert
from bsbert import models
from bsbert.bench import _backend_counts, _inputs
from bsbert.cli import positive_int, seq_fits_or_usage_error
from bsbert.timing import time_fn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=positive_int, default=1)
    ap.add_argument("--seq", type=positive_int, default=128)
    ap.add_argument("--steps", type=positive_int, default=3)
    ap.add_argument("--top", type=positive_int, default=15)
    ap.add_argument("--small", action="store_true", help="2 encoder layers")
    a = ap.parse_args()
    dev, dt = torch.device(a.device), getattr(torch, a.dtype)
    model = models.seed_like_model(dtype=dt, **({"num_hidden_layers": 2} if a.small else {})).to(dev).eval()
    seq_fits_or_usage_error(ap, model, a.seq)
    inp = _inputs(a.batch, a.seq, model.config.vocab_size, dev)
    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for fmt in ("dense", None):
        # check_model=False: the per-linear choices as measured (patch's model check would put dense
        # linears back where they lose, hiding what this script is for)
        bsbert.patch(model, **({"format": fmt} if fmt else {"check_model": False}), tokens=a.batch * a.seq,
                     seq=a.seq, progress=False)
        name = "packed (format=dense)" if fmt else "patched (per-linear choices, no model check)"
        t = time_fn(lambda: model(**inp), repeats=10, warmup=2, device=dev)
        print(f"\n== {name}: median {t['median_ms']:.2f} ms; backends {_backend_counts(model.bsbert_plan)}")
        with torch.inference_mode(), profile(activities=acts) as prof:
            for _ in range(a.steps):
                model(**inp)
            if cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=a.top, max_name_column_width=70))
        if not fmt:
            _print_sparse_choices(model.bsbert_plan)
        bsbert.unpatch(model)


def _print_sparse_choices(plan) -> None:
    """What patch measured, alone, for each linear it made block-sparse: to set beside the kernel's time in
    the forward above (stop 30, H200, batch 32: 29 us a call in the forward for linears whose own
    measurement had picked them over cuBLAS, whose calls took 11 us)."""
    rows = [(i, lp) for i, layer in enumerate(plan.layers) for lp in layer.linears.values() if lp.format == "bsr"]
    print(f"\n== {len(rows)} block-sparse linears, as measured alone by patch (ms per call):")
    for i, lp in rows:
        times = ", ".join(f"{k} {v:.4f}" for k, v in sorted(lp.timings_ms.items(), key=lambda kv: kv[1]))
        print(f"  layer {i:2d} {lp.name:8s} packed {lp.packed_shape} block density {lp.block_density:.2f}: "
              f"{lp.backend}; {times or 'not measured'}")


if __name__ == "__main__":
    main()
