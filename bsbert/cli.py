"""The `bsbert` console script: bench (the main job), analyze, info."""
from __future__ import annotations

import argparse
import sys

from bsbert.errors import BsbertError


def _bench(args):
    if args.kernels or args.sweep:
        import torch

        if args.threads:  # run_bench sets it itself; the table and sweep run on torch's threads
            torch.set_num_threads(args.threads)
    if args.kernels:
        from bsbert.ops.cpu_kernel_report import format_table, run_kernel_report

        print(format_table(run_kernel_report(ms=tuple(args.batch * s for s in args.seq),
                                             dtypes=(getattr(torch, args.dtype),))))
        return 0
    if args.sweep:
        from bsbert.sweep import run_sweep, sweep_table

        res = run_sweep(batches=args.batches, seqs=args.seq if "seq" in args.given else (128, 384),
                        dtypes=args.dtypes, device=args.device, repeats=args.repeats, out_dir=args.out,
                        small=args.small, memory=args.memory, warmup_s=args.warmup_s)
        return _print_result(sweep_table(res), res)

    from bsbert.bench import run_bench, table

    res = run_bench(seqs=args.seq, batch=args.batch, dtype=args.dtype, device=args.device,
                    threads=args.threads, model_path=args.model, repeats=args.repeats, out_dir=args.out,
                    select=args.select, small=args.small, compile_mode=args.compile, warmup_s=args.warmup_s,
                    trials=args.trials, engines=args.engines)
    return _print_result(table(res), res)


# Which of bench's flags each mode uses; a flag given for a mode that does not use it is an error
# rather than silently dropped (a user who asks for --threads 1 or --dtype float16 must not get a
# table measured on something else without noticing).
_SWEEP_ONLY = {"batches", "dtypes", "memory"}
_MODE_FLAGS = {
    "bench": {"seq", "batch", "dtype", "device", "threads", "model", "repeats", "trials", "warmup_s", "select",
              "engines", "out", "compile", "small"},
    "sweep": {"seq", "device", "threads", "repeats", "warmup_s", "out", "small"} | _SWEEP_ONLY,
    "kernels": {"seq", "batch", "dtype", "device", "threads"},
}


def _check_bench_flags(parser: argparse.ArgumentParser, args, given: set) -> None:
    """Reject flags that the chosen bench mode would ignore, and a --device that cannot run here."""
    if args.sweep and args.kernels:
        parser.error("--sweep and --kernels are two different modes: give one of them")
    mode = "kernels" if args.kernels else "sweep" if args.sweep else "bench"
    extra = sorted(given - _MODE_FLAGS[mode] - {"sweep", "kernels"})
    if extra:
        flags = ", ".join("--" + d.replace("_", "-") for d in extra)
        what = {"bench": "only apply with --sweep", "sweep": "do not apply to --sweep",
                "kernels": "do not apply to --kernels"}[mode]
        parser.error(f"{flags}: {what}" + (" (the kernel table is CPU only, rows for each M = batch * seq; "
                                           "it takes --seq, --batch, --dtype float32|bfloat16, --threads)"
                                           if mode == "kernels" else ""))
    if mode == "bench" and args.small and args.model is not None:
        parser.error("--small builds the seed-like model with 2 layers (and dense BERT-large with 2): with --model "
                     "there is nothing for it to shrink, and the dense baseline would not match the model")
    import torch

    if args.device == "auto":  # what `bsbert profile` does too: the GPU when torch sees one
        # (the kernel table is CPU only: there auto is the CPU, whatever GPU the machine has)
        args.device = "cpu" if mode == "kernels" or not torch.cuda.is_available() else "cuda"
    why = device_problem(args.device)
    if why:
        parser.error(why)
    if mode == "bench" and args.select is not None:
        # patch's own check, asked before dense BERT-large and the packed model are timed
        from bsbert.ops.dispatch import check_select

        try:
            check_select(args.select, args.device)
        except ValueError as e:
            parser.error(f"--select: {e}")
    if mode == "kernels":
        if torch.device(args.device).type != "cpu":
            parser.error(f"--device {args.device!r}: --kernels times the CPU kernels only")
        if args.dtype == "float16":
            parser.error("--dtype float16: --kernels has CPU kernels for float32 and bfloat16 only")


def device_problem(device: str) -> str | None:
    """Why ``--device device`` cannot run here (None: it can); shared by bench and profile, whose runs
    would otherwise build (and patch) the model before the first tensor move fails with a traceback."""
    from bsbert import devices

    why = devices.device_problem(device)[1]
    return None if why is None else f"--device {device!r}: {why}"


def _print_result(tbl, res) -> int:
    """The table at its natural width, wider than the terminal if it must be: squeezed to a terminal's
    width, rich cut the one-word headers ("patched/b…", "paired/bo…") of the very columns people compare."""
    from rich.console import Console
    from rich.measure import Measurement

    term = Console()
    out = Console(width=max(Measurement.get(term, term.options.update(width=10_000), tbl).maximum, term.width))
    out.print(tbl)
    out.print(f"JSON: {res['json']}" + (f"   plot: {res['png']}" if "png" in res else ""))
    if res.get("outputs_ok") is False:  # the times of a wrong forward compare nothing: a script must see it
        out.print("[bold red]exit 1: outputs differ from the masked dense model (see the table)[/]")
        return 1
    return 0


def _analyze(args):
    import torch

    import bsbert
    from bsbert import models

    model = models.load_local(args.model) if args.model is not None else models.seed_like_model(dtype=torch.float32)
    # FLOPs at a --seq the model cannot embed are no numbers of this model: refused as bench refuses it
    models.check_seq_len(models.max_seq_len(model), [args.seq],
                         f"the model {args.model!r}" if args.model is not None else "the seed-like model")
    print(bsbert.analyze(model).table(args.seq))
    return 0


def _info(args):
    from bsbert.info import main as info_main

    info_main()
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def seq_fits_or_usage_error(parser: argparse.ArgumentParser, model, seq: int,
                            name: str = "the seed-like model") -> None:
    """``parser.error`` (a usage error, exit 2) when ``model``'s position table cannot embed ``seq`` tokens:
    for the scripts, which check before the first forward (a longer seq failed there, after minutes of
    patching) and before any probe."""
    from bsbert import models

    try:
        models.check_seq_len(models.max_seq_len(model), [seq], name)
    except BsbertError as e:
        parser.error(str(e))


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def model_dir(text: str) -> str:
    """--model: a path, never empty (``--model "$CKPT"`` with the variable unset ran the seed-like model)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path: give a local Hugging Face checkpoint directory")
    return text


def _seconds(text: str) -> float:
    """A finite number of seconds >= 0: --warmup-s inf would warm up forever, nan would skip the warm-up
    and be written to the JSON as NaN, a negative one silently means 0."""
    import math

    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _add_bench_args(b: argparse.ArgumentParser, engines, suppress: bool = False) -> None:
    """bench's flags. With suppress=True every default is argparse.SUPPRESS, so that parsing the same
    command line again yields exactly the flags the user gave (whatever their value): what
    _check_bench_flags needs, and robust to `--flag=value` and abbreviated flags."""
    def d(value):
        return argparse.SUPPRESS if suppress else value

    b.add_argument("--seq", type=positive_int, nargs="+", default=d([384]),
                   help="sequence length(s) (default 384; with --sweep 128 384)")
    b.add_argument("--batch", type=positive_int, default=d(1))
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=d("float32"))
    b.add_argument("--device", default=d("auto"),
                   help="cpu, cuda (or cuda:N), or auto (default): cuda when torch sees a GPU, else cpu")
    b.add_argument("--threads", type=positive_int, default=d(None),
                   help="torch.set_num_threads (default: all cores); also for --sweep and --kernels")
    b.add_argument("--model", type=model_dir, default=d(None),
                   help="local HF checkpoint dir (default: seed-like model); the dense baseline is then that model "
                        "unpatched (masked dense) instead of BERT-large")
    b.add_argument("--repeats", type=positive_int, default=d(3),
                   help="timed forwards per variant (per block for the patched one)")
    b.add_argument("--trials", type=positive_int, default=d(None),
                   help="time the patched forward in this many blocks of --repeats, the FLOP bound's dense GEMM "
                        "probed between them (default 5 on CPU, 1 on CUDA): one slow stretch of a shared "
                        "machine moves one block, not the median")
    b.add_argument("--warmup-s", type=_seconds, default=d(1.0),
                   help="seconds of untimed forwards before each timed variant (default 1: the first forwards "
                        "after patch can run slower than the steady state)")
    b.add_argument("--select", choices=["measure", "measure-gpu", "heuristic"], default=d(None),
                   help="how patch picks each linear's and attention's backend: wall clock ('measure'), GPU "
                        "time from CUDA graphs ('measure-gpu'), a density rule ('heuristic'); default "
                        "measure-gpu with --compile reduce-overhead on CUDA, else measure")
    # bsbert is not on PyPI: the extra installs from the checkout (or name the packages directly)
    b.add_argument("--engines", nargs="+", choices=list(engines), default=d([]), metavar="ENGINE",
                   help=f"also time other inference engines on the packed model (dead heads / neurons "
                        f"removed, dense kernels) and bsbert's speedup over each; of: {', '.join(engines)} "
                        f"(CPU; pip install openvino onnxruntime onnx, or pip install '.[engines]' in the "
                        f"checkout; onnxruntime in float32 only)")
    b.add_argument("--out", default=d("bench-out"), help="directory for the JSON and PNG")
    b.add_argument("--compile", choices=["default", "reduce-overhead", "max-autotune"], default=d(None),
                   help="time torch.compile(model, mode=...) of every variant (reduce-overhead on CUDA: "
                        "CUDA graphs, no host launch cost)")
    b.add_argument("--small", action="store_true", default=d(False), help="2-layer models (smoke test)")
    b.add_argument("--sweep", action="store_true", default=d(False),
                   help="dense vs patched over --batches x seq x --dtypes (latency, throughput, memory); takes "
                        "--seq --device --threads --repeats --warmup-s --out --small --memory")
    b.add_argument("--kernels", action="store_true", default=d(False),
                   help="CPU kernel table instead: bsbert's BSR GEMM vs oneDNN/torch dense, rows for each "
                        "M = batch*seq; takes --seq --batch --dtype float32|bfloat16 --threads --device cpu")
    b.add_argument("--memory", action="store_true", default=d(False),
                   help="with --sweep on CPU: measure peak activation memory in child processes (slower)")
    b.add_argument("--batches", type=positive_int, nargs="+", default=d([1, 8, 32]), help="with --sweep")
    b.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"], default=d(None),
                   help="with --sweep (default float32 bfloat16 [+float16 on cuda])")


def main(argv=None) -> int:
    from bsbert.engines import ENGINES

    p = argparse.ArgumentParser(prog="bsbert", description="fast kernels for pruned BERT models")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="dense BERT-large vs the patched seed-like model on this device")
    _add_bench_args(b, ENGINES)
    b.set_defaults(fn=_bench)
    a = sub.add_parser("analyze", help="print the pruning structure and FLOP bound of a model")
    a.add_argument("--model", type=model_dir, default=None,
                   help="local HF checkpoint dir (default: the seed-like model)")
    a.add_argument("--seq", type=positive_int, default=384, help="sequence length of the FLOP counts (default 384)")
    a.set_defaults(fn=_analyze)
    pr = sub.add_parser("profile", help="steady-state steps for Nsight (CUDA) or a torch.profiler trace (CPU)",
                        add_help=False)
    pr.set_defaults(fn=None)
    i = sub.add_parser("info", help="versions and which backends work here")
    i.set_defaults(fn=_info)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["profile"]:  # its own parser: flags pass straight through
        from bsbert.profile import main as profile_main

        return profile_main(argv[1:])
    args = p.parse_args(argv)
    if args.cmd == "bench":
        given_parser = argparse.ArgumentParser(prog="bsbert bench", add_help=False)
        _add_bench_args(given_parser, ENGINES, suppress=True)
        args.given = set(vars(given_parser.parse_args(argv[1:])))
        _check_bench_flags(b, args, args.given)
    try:
        return args.fn(args)
    except BsbertError as exc:  # a problem found once running (a --model that is no BERT checkpoint, an --out
        # that cannot be written, a --seq past the model's positions): one line naming it, not a traceback
        p.exit(1, f"bsbert {args.cmd}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
