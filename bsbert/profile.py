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
from bsbert.errors import BsbertError

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
                 f"--force-overwrite=true -o bsbert-seq{args.seq} {base} --steps {args.steps}"),
        # --profile-from-start off: only kernels between cudaProfilerStart/Stop (the steady steps, not patch's
        # candidate timings). An NVTX filter 'bsbert/' matched a range named exactly that: none of bsbert's
        # ranges (bsbert/step0, bsbert/layer0/qkv), so ncu profiled no kernel (seen on an H200, ncu 2025.3).
        "ncu": (f"ncu --profile-from-start off -k '{NCU_KERNEL_REGEX}' --set full "
                f"-o bsbert-kernels {base} --steps 1"),
    }


def _trace_path(text: str) -> str:
    """--trace: never empty (``--trace "$OUT"`` with the variable unset wrote the default file silently)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path: give the Chrome trace file's path")
    return text


def main(argv=None) -> int:
    from bsbert.cli import device_problem, model_dir, non_negative_int, positive_int

    p = argparse.ArgumentParser(prog="bsbert profile")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when torch sees a GPU, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    # (0 or fewer steps would write an empty trace and exit 0; seq / batch 0 failed deep inside patch)
    p.add_argument("--seq", type=positive_int, default=384)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--steps", type=positive_int, default=5)
    p.add_argument("--warmup", type=non_negative_int, default=3)
    p.add_argument("--model", type=model_dir, default=None,
                   help="local HF checkpoint dir (default: the seed-like model)")
    p.add_argument("--small", action="store_true", help="2-layer seed-like model")
    p.add_argument("--trace", default=None, type=_trace_path,
                   help="CPU: torch.profiler Chrome trace path (default bsbert-trace.json)")
    args = p.parse_args(argv)
    why = device_problem(args.device)  # before the model is built and patched
    if why:
        p.error(why)
    if args.model and args.small:  # --small shortens the seed-like model; a checkpoint keeps its layers
        p.error("--small applies to the seed-like model only, not with --model")
    if args.trace is not None and torch.device(args.device).type != "cpu":
        p.error(f"--trace: the Chrome trace is written on CPU only (on {args.device} use nsys / ncu)")
    args.trace = args.trace or "bsbert-trace.json"
    if torch.device(args.device).type == "cpu":  # torch.profiler's export writes nothing, and says nothing, where it
        # cannot write (a missing directory, a directory as the path): checked before the work
        if os.path.isdir(args.trace) or args.trace.endswith(os.sep):  # (a new directory's name too: abspath
            # drops the slash, and the run failed only at its end)
            p.error(f"--trace {args.trace}: is a directory; give the trace file's path")
        try:
            from bsbert.bench import prepare_out_dir

            prepare_out_dir(os.path.dirname(os.path.abspath(args.trace)), "--trace's directory")
        except BsbertError as exc:
            p.error(str(exc))
    try:
        return _run(args)
    except BsbertError as exc:  # a --model that is no BERT checkpoint, a --seq past its positions: one line
        p.exit(1, f"bsbert profile: error: {exc}\n")


def _run(args) -> int:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    dev = torch.device(args.device)
    over = {"num_hidden_layers": 2} if args.small else {}
    # progress on stderr (stdout has the profile table / commands): building and patching BERT-large
    # (patch times each layer's candidates) takes a minute or more on a small CPU
    print(f"bsbert profile: building {args.model or 'the seed-like model'} ...", file=sys.stderr, flush=True)
    model = (models.load_local(args.model, dtype=dtype) if args.model
             else models.seed_like_model(dtype=dtype, **over)).to(dev)
    models.check_seq_len(models.max_seq_len(model), [args.seq],  # before patch, not in the first forward
                         f"the model {args.model!r}" if args.model else "the seed-like model")
    # seq=: the attention candidates and the model check at the profiled B x S, as bench does (without it they
    # ran at min(tokens, 512) tokens per sequence: 8 x 512 for --batch 32 --seq 128)
    bsbert.patch(model, tokens=args.batch * args.seq, seq=args.seq, progress=True)
    print(f"bsbert profile: {args.warmup} warm-up steps, then {args.steps} profiled steps ...", file=sys.stderr,
          flush=True)
    from bsbert.bench import _inputs

    # bench's ids (from a small checkpoint's vocabulary too); its token types are left out, as before
    ids = _inputs(args.batch, args.seq, model.config.vocab_size, dev)["input_ids"]
    inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(**inp)
        if dev.type == "cuda":
            # that GPU's work (not the current one's: --device cuda:1), and its context current for the profiler
            torch.cuda.set_device(dev)
            torch.cuda.synchronize(dev)
            torch.cuda.cudart().cudaProfilerStart()
            with nvtx.ranges(model, use_nvtx=True):
                for i in range(args.steps):
                    torch.cuda.nvtx.range_push(f"bsbert/step{i}")
                    model(**inp)
                    torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize(dev)
            torch.cuda.cudart().cudaProfilerStop()
            for k, v in commands(args).items():
                print(f"{k}: {v}")
        else:
            from torch.profiler import ProfilerActivity, profile

            with nvtx.ranges(model, use_nvtx=False), profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    model(**inp)
            prof.export_chrome_trace(args.trace)
            if not os.path.isfile(args.trace):  # (the export does not raise when it fails)
                raise BsbertError(f"--trace {args.trace}: torch.profiler wrote no trace there")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            print(f"Chrome trace: {os.path.abspath(args.trace)} (open in chrome://tracing or Perfetto)")
            print("on a GPU: " + commands(argparse.Namespace(**{**vars(args), 'device': 'cuda'}))["nsys"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
