"""`bsbert profile` / `python -m bsbert.profile`: warm up, then N steady-state steps of the patched
seed-like model (or --model DIR), ready for Nsight.

On CUDA the steps run between cudaProfilerStart/Stop inside NVTX ranges, so

    nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop -t cuda,nvtx \
        -o bsbert bsbert profile --device cuda --dtype float16

captures exactly the steady state, and the printed ncu command profiles bsbert's kernels by name.
On CPU it writes a torch.profiler Chrome trace (same range names) instead.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch

import bsbert
from bsbert import models, nvtx

NCU_KERNEL_REGEX = "regex:bsr|pruned_attention|_attn|bsbert"


def commands(args) -> dict:
    """The nsys / ncu command lines that profile what this run profiled: every option that changes the
    model, its inputs or the steps is carried over (a dropped --model or --small would profile another
    model), only --trace (the CPU trace path) is not; ncu profiles one step (it replays each kernel)."""
    base = (f"bsbert profile --device {args.device} --dtype {args.dtype} --seq {args.seq} --batch {args.batch}"
            f" --warmup {args.warmup}")
    if args.model:
        base += f" --model {shlex.quote(args.model)}"
    if args.small:
        base += " --small"
    return {
        "nsys": ("nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop -t cuda,nvtx "
                 f"-o bsbert-seq{args.seq} {base} --steps {args.steps}"),
        "ncu": (f"ncu --nvtx --nvtx-include 'bsbert/' -k '{NCU_KERNEL_REGEX}' --set full "
                f"-o bsbert-kernels {base} --steps 1"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bsbert profile")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when torch sees a GPU, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--seq", type=int, default=384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--model", default=None, help="local HF checkpoint dir (default: the seed-like model)")
    p.add_argument("--small", action="store_true", help="2-layer seed-like model")
    p.add_argument("--trace", default=None, help="CPU: torch.profiler Chrome trace path (default bsbert-trace.json)")
    args = p.parse_args(argv)
    if args.model and args.small:  # --small shortens the seed-like model; a checkpoint keeps its layers
        p.error("--small applies to the seed-like model only, not with --model")
    if args.trace is not None and torch.device(args.device).type != "cpu":
        p.error(f"--trace: the Chrome trace is written on CPU only (on {args.device} use nsys / ncu)")
    args.trace = args.trace or "bsbert-trace.json"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    dev = torch.device(args.device)
    over = {"num_hidden_layers": 2} if args.small else {}
    model = (models.load_local(args.model, dtype=dtype) if args.model
             else models.seed_like_model(dtype=dtype, **over)).to(dev)
    bsbert.patch(model, tokens=args.batch * args.seq, progress=False)
    ids = torch.randint(1000, model.config.vocab_size, (args.batch, args.seq), device=dev)
    inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(**inp)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            with nvtx.ranges(model, use_nvtx=True):
                for i in range(args.steps):
                    torch.cuda.nvtx.range_push(f"bsbert/step{i}")
                    model(**inp)
                    torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            for k, v in commands(args).items():
                print(f"{k}: {v}")
        else:
            from torch.profiler import ProfilerActivity, profile

            with nvtx.ranges(model, use_nvtx=False), profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    model(**inp)
            prof.export_chrome_trace(args.trace)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            print(f"Chrome trace: {os.path.abspath(args.trace)} (open in chrome://tracing or Perfetto)")
            print("on a GPU: " + commands(argparse.Namespace(**{**vars(args), 'device': 'cuda'}))["nsys"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
