"""The `bsbert` console script: bench (the main job), analyze, info."""
from __future__ import annotations

import argparse
import sys


def _bench(args):
    if args.kernels:
        import torch

        from bsbert.ops.cpu_kernel_report import format_table, run_kernel_report

        print(format_table(run_kernel_report(ms=(args.batch * args.seq[0],),
                                             dtypes=(getattr(torch, args.dtype if args.dtype != "float16" else "float32"),))))
        return 0
    if args.sweep:
        from bsbert.sweep import run_sweep, sweep_table

        res = run_sweep(batches=args.batches, seqs=args.seq if args.seq_given else (128, 384),
                        dtypes=args.dtypes, device=args.device, repeats=args.repeats, out_dir=args.out,
                        small=args.small, memory=args.memory, warmup_s=args.warmup_s)
        return _print_result(sweep_table(res), res, width=160)

    from bsbert.bench import run_bench, table

    res = run_bench(seqs=args.seq, batch=args.batch, dtype=args.dtype, device=args.device,
                    threads=args.threads, model_path=args.model, repeats=args.repeats, out_dir=args.out,
                    select=args.select, small=args.small, compile_mode=args.compile, warmup_s=args.warmup_s,
                    trials=args.trials, engines=args.engines)
    return _print_result(table(res), res, width=175 + 30 * len(args.engines))


def _print_result(tbl, res, width: int) -> int:
    from rich.console import Console

    out = Console(width=max(width, Console().width))
    out.print(tbl)
    out.print(f"JSON: {res['json']}" + (f"   plot: {res['png']}" if "png" in res else ""))
    return 0


def _analyze(args):
    import torch

    import bsbert
    from bsbert import models

    model = models.load_local(args.model) if args.model else models.seed_like_model(dtype=torch.float32)
    print(bsbert.analyze(model).table(args.seq))
    return 0


def _info(args):
    from bsbert.info import main as info_main

    info_main()
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv=None) -> int:
    from bsbert.engines import ENGINES

    p = argparse.ArgumentParser(prog="bsbert", description="fast kernels for pruned BERT models")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="dense BERT-large vs the patched seed-like model on this device")
    b.add_argument("--seq", type=int, nargs="+", default=[384], help="sequence length(s) (default 384)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    b.add_argument("--device", default="cpu")
    b.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    b.add_argument("--model", default=None, help="local HF checkpoint dir (default: seed-like model)")
    b.add_argument("--repeats", type=int, default=3, help="timed forwards per variant (per block for the patched one)")
    b.add_argument("--trials", type=_positive_int, default=None,
                   help="time the patched forward in this many blocks of --repeats, the FLOP bound's dense GEMM "
                        "probed between them (default 5 on CPU, 1 on CUDA): one slow stretch of a shared "
                        "machine moves one block, not the median")
    b.add_argument("--warmup-s", type=float, default=1.0,
                   help="seconds of untimed forwards before each timed variant (default 1: the first forwards "
                        "after patch can run slower than the steady state)")
    b.add_argument("--select", choices=["measure", "measure-gpu", "heuristic"], default=None,
                   help="how patch picks each linear's and attention's backend: wall clock ('measure'), GPU "
                        "time from CUDA graphs ('measure-gpu'), a density rule ('heuristic'); default "
                        "measure-gpu with --compile reduce-overhead on CUDA, else measure")
    b.add_argument("--engines", nargs="+", choices=list(ENGINES), default=[], metavar="ENGINE",
                   help=f"also time other inference engines on the packed model (dead heads / neurons "
                        f"removed, dense kernels) and bsbert's speedup over each; of: {', '.join(ENGINES)} "
                        f"(CPU; pip install 'bsbert[engines]'; onnxruntime in float32 only)")
    b.add_argument("--out", default="bench-out", help="directory for the JSON and PNG")
    b.add_argument("--compile", choices=["default", "reduce-overhead", "max-autotune"], default=None,
                   help="time torch.compile(model, mode=...) of every variant (reduce-overhead on CUDA: "
                        "CUDA graphs, no host launch cost)")
    b.add_argument("--small", action="store_true", help="2-layer models (smoke test)")
    b.add_argument("--sweep", action="store_true",
                   help="dense vs patched over --batches x seq x --dtypes (latency, throughput, memory)")
    b.add_argument("--kernels", action="store_true",
                   help="CPU kernel table instead: bsbert's BSR GEMM vs oneDNN/torch dense (M = batch*seq)")
    b.add_argument("--memory", action="store_true",
                   help="with --sweep on CPU: measure peak activation memory in child processes (slower)")
    b.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="with --sweep")
    b.add_argument("--dtypes", nargs="+", default=None, help="with --sweep (default float32 bfloat16 [+float16 on cuda])")
    b.set_defaults(fn=_bench)
    a = sub.add_parser("analyze", help="print the pruning structure and FLOP bound of a model")
    a.add_argument("--model", default=None)
    a.add_argument("--seq", type=int, default=384)
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
    args.seq_given = "--seq" in argv
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
