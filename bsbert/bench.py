"""`bsbert bench`: dense BERT-large vs the patched seed-like model on this device (with --model: that model,
unpatched vs patched).

For each sequence length it times (median of --repeats, after a warm-up of at least --warmup-s
seconds, the steady state): dense BERT-large in torch
eager, the seed-like model patched with packing only (dead heads/neurons removed, dense kernels), and
the fully patched model (block-sparse kernels where they win; on CPU in --trials blocks with the dense
GEMM probed between them, the median over every block's forwards); checks the patched outputs against the
masked dense model; and computes the FLOP bound (remaining FLOPs at the best dense GEMM rate measured
in the same run: the fastest of the probes before the runs, between the blocks and after the runs).
Writes a table, JSON and a PNG plot.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time

import torch
from rich.console import Console
from rich.table import Table

import bsbert
from bsbert import models
from bsbert.timing import (bert_dense_shapes, bound_probe, cpu_peak_gflops, dense_gemm_gflops, paired_bound_ratio,
                           paired_time_ratio, threads_text, time_fn, time_in_trials)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _inputs(batch, seq, vocab, device, seed=0):
    """Random token ids in [1000, vocab), or the upper half of a vocabulary of <= 1000 ids (a small
    --model checkpoint): never a special token's low id, and always an id every model of the run has."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab > 1000 else vocab // 2, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


# How far a timed variant's outputs may be from the masked dense model's (max relative difference over the
# real tokens' outputs) before its times stop meaning anything: seen so far ~2e-6 in fp32 (CPU), 2.8e-2 to
# 3.2e-2 in bf16 (CPU, seed-like model) and ~3e-3 in fp16 (H200). A run past these is flagged, not timed less.
MAX_REL_DIFF_OK = {"float32": 1e-4, "bfloat16": 6e-2, "float16": 3e-2}


def _outputs_check(results: dict, say) -> None:
    """results["outputs_ok"]: every run's packed and patched outputs within MAX_REL_DIFF_OK of the masked
    dense model; otherwise a warning, the offenders in results["outputs_off"] and the table's caption says so."""
    limit = MAX_REL_DIFF_OK.get(results["dtype"], 6e-2)
    off = [{"seq": r["seq"], "variant": k.removeprefix("max_rel_diff_"), "max_rel_diff": r[k]}
           for r in results["runs"] for k in ("max_rel_diff_packed", "max_rel_diff_patched") if not r[k] <= limit]
    results["outputs_ok"], results["outputs_limit"] = not off, limit
    if off:
        results["outputs_off"] = off
        say(f"[bold red]OUTPUTS DIFFER from the masked dense model beyond {limit:g}: "
            + ", ".join(f"seq {o['seq']} {o['variant']} {o['max_rel_diff']:.2e}" for o in off)
            + " -- these times are not a valid comparison[/]")


def _max_rel_diff(ref, out, inp) -> float:
    from bsbert.verify import compare_outputs

    return max(v["max_rel"] for v in compare_outputs(ref, out, inp["attention_mask"]).values())


def _runner(model, compile_mode):
    """The model itself, or torch.compile of it (a fresh compile per variant: dense, packed, patched).
    On CUDA ``reduce-overhead`` replays the forward from CUDA graphs, which takes the host launch cost
    out of the comparison at small batch."""
    if not compile_mode:
        return model
    torch._dynamo.reset()
    return torch.compile(model, mode=None if compile_mode == "default" else compile_mode)


def default_select(device, compile_mode) -> str:
    """How `patch` should rank backends for this bench: by GPU time when the forward will replay CUDA
    graphs (torch.compile "reduce-overhead" on CUDA: the host's launch cost is gone there, so wall-clock
    timings of single calls would rank host overhead, not kernels), else by wall clock."""
    return "measure-gpu" if torch.device(device).type == "cuda" and compile_mode == "reduce-overhead" else "measure"


def default_trials(device) -> int:
    """How many blocks the patched forward is timed in (``time_in_trials``): 5 on CPU, where a shared
    machine's slow stretches of seconds moved single runs' ratios by up to 25%; 1 on CUDA, whose bound
    is the dense rate at each run's own M (measured after the run) and whose timings were steady."""
    return 1 if torch.device(device).type == "cuda" else 5


def prepare_out_dir(out_dir: str, flag: str = "--out") -> None:
    """Create ``out_dir`` and check that a file can be written there, before the run: the JSON and PNG are
    written at its end, and an --out that is a file or not writable would otherwise throw the whole run away.
    ``flag``: the option the error names (``bsbert profile --trace`` checks its file's directory too)."""
    import tempfile

    from bsbert.errors import BsbertError

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise BsbertError(f"{flag} {out_dir!r}: is a file, not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        raise BsbertError(f"{flag} {out_dir!r}: cannot write the results there ({exc.strerror or exc})") from exc


def run_bench(seqs=(384,), batch=1, dtype="float32", device="cpu", threads=None, model_path=None,
              repeats=3, out_dir="bench-out", select=None, small=False, console=None,
              compile_mode=None, warmup_s: float = 1.0, trials: int | None = None, engines=()) -> dict:
    console = console or Console(stderr=True)
    select = select or default_select(device, compile_mode)
    if trials is None:
        trials = default_trials(device)
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    prepare_out_dir(out_dir)
    if threads:
        torch.set_num_threads(threads)
    dt = DTYPES[dtype]
    dev = torch.device(device)
    overrides = {"num_hidden_layers": 2} if small else {}
    say = console.log
    say(f"bsbert bench: seqs={list(seqs)} batch={batch} dtype={dtype} device={device} "
        f"threads={torch.get_num_threads()} repeats={repeats} trials={trials}{' (small: 2 layers)' if small else ''}")
    # The pruned model first: a --model that cannot be loaded or patched (no checkpoint, not BERT-like) or a
    # --seq longer than a model's position table fails here, in seconds, not after the dense probes and
    # dense BERT-large's build.
    say("building the pruned model ...")
    pruned = (models.load_local(model_path, dtype=dt) if model_path is not None
              else models.seed_like_model(dtype=dt, **overrides)).to(dev)
    plan = bsbert.analyze(pruned)
    models.check_seq_len(models.max_seq_len(pruned), seqs,
                         f"the model {model_path!r}" if model_path else "the seed-like model")
    if model_path is None:
        models.check_seq_len(models.bert_large_config().max_position_embeddings, seqs, "dense BERT-large")
    # the bound's rate: the best dense GEMM over a layer's four shapes, BERT-large's or the --model's own
    cfg = pruned.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "dim")
    shapes = bert_dense_shapes(hidden, getattr(cfg, "intermediate_size", None)
                               or getattr(cfg, "hidden_dim", 4 * hidden))
    say(f"measuring the best dense GEMM rate (FLOP-bound denominator; M=384, (K, N) in {shapes}) ...")
    peak = dense_gemm_gflops(dev, dt, shapes=shapes)
    say(f"  {peak['label']}: {peak['gflops']:.1f} GFLOP/s")
    if peak.get("widened"):
        say(f"  no bf16 dot product on this CPU: bf16 runs widened to fp32 here (the bound uses the fp32 "
            f"dense rate; {', '.join(f'{k} {v:.0f}' for k, v in peak['all_gflops'].items())} GFLOP/s), "
            "and a float32 model may run faster than a bf16 one")
    isa_peak = cpu_peak_gflops(dt) if dev.type == "cpu" else None
    if isa_peak:
        say(f"  instruction peak ({isa_peak['instruction']}, {threads_text(isa_peak['threads'])} at once): "
            f"{isa_peak['gflops']:.1f} GFLOP/s; the dense GEMM reaches {peak['gflops'] / isa_peak['gflops']:.0%} of it")

    # The dense baseline has the pruned model's own architecture, as the FLOP bound's dense FLOPs do: BERT-large for
    # the seed-like model; for a --model checkpoint its own masked dense form (the loaded model before patching:
    # every weight at full size, zeros where pruned), which a BERT-large baseline would not match (a BERT-base
    # checkpoint "ran 3x faster than dense" partly for being smaller)
    if model_path is not None:
        dense, dense_name = pruned, "the model unpatched (masked dense)"
    else:
        say("building dense BERT-large (random weights) ...")
        dense = models.dense_bert_large(dtype=dt, **overrides).to(dev)
        dense_name = "dense BERT-large (2 layers)" if small else "dense BERT-large"
    results = {"device": str(dev), "device_name": _device_name(dev), "dtype": dtype, "batch": batch,
               "threads": torch.get_num_threads(), "warmup_s": warmup_s, "torch": torch.__version__,
               "bsbert": bsbert.__version__, **_provenance(dev),
               "compile": compile_mode, "select": select, "trials": trials, "dense_gemm": peak,
               "model": model_path or ("seed-like (2 layers)" if small else "seed-like"), "dense_model": dense_name,
               "plan_summary": plan.summary(), "runs": [], "isa_peak": isa_peak, "engines": list(engines),
               "plan_tables": {}}
    warm = 3 if compile_mode else 1  # compile, then cudagraph-tree recording runs
    for seq in seqs:
        # ids both models have (a --model checkpoint's vocabulary may be smaller than BERT-large's)
        inp = _inputs(batch, seq, min(dense.config.vocab_size, pruned.get_input_embeddings().num_embeddings), dev)
        say(f"\\[seq {seq}] {dense_name}, torch {'compile ' + compile_mode if compile_mode else 'eager'} ...")
        fwd = _runner(dense, compile_mode)
        t_dense = time_fn(lambda: fwd(**inp), repeats=repeats, warmup=warm, device=dev, warmup_s=warmup_s)
        with torch.inference_mode():
            ref = pruned(**inp)
        say(f"\\[seq {seq}] packing only (dense kernels) ...")
        bsbert.patch(pruned, format="dense", select=select, tokens=batch * seq, seq=seq, progress=False)
        fwd = _runner(pruned, compile_mode)
        t_pack = time_fn(lambda: fwd(**inp), repeats=repeats, warmup=warm, device=dev, warmup_s=warmup_s)
        with torch.inference_mode():
            diff_pack = _max_rel_diff(ref, pruned(**inp), inp)
        pack_backends = _backend_counts(pruned.bsbert_plan)
        bsbert.unpatch(pruned)
        # each engine timed on its own here, and against the patched forward in pairs below (its runner
        # kept until then: it holds its own copy of the packed weights)
        engine_runs, engine_fns = {}, {}
        for name in engines:
            engine_runs[name], engine_fns[name] = _time_engine(name, pruned, inp, ref, repeats, dev, warmup_s, say,
                                                               seq)
        say(f"\\[seq {seq}] full patch (block-sparse where faster) ...")
        bsbert.patch(pruned, select=select, tokens=batch * seq, seq=seq, progress=False)
        fwd = _runner(pruned, compile_mode)
        # the bound's dense GEMM, probed between the patched blocks and paired with forwards below
        m_probe = batch * seq if dev.type == "cuda" else peak["shape"][0]  # as for the bound below
        probe, probe_flops = bound_probe(peak, dev, m_probe)
        if trials > 1:  # spread over the run, the bound's dense GEMM probed between the blocks
            # (on CUDA these probes are recorded only: its bound is the rate at this M measured after the run)
            t_full = time_in_trials(lambda: fwd(**inp), probe, probe_flops, trials=trials, repeats=repeats,
                                    warmup=warm, device=dev, warmup_s=warmup_s)
            rates, medians = t_full["probe_gflops"], [b["median_ms"] for b in t_full["trials"]]
            say(f"\\[seq {seq}] patched in {trials} blocks of {repeats}: block medians "
                f"{', '.join(f'{m:.1f}' for m in medians)} ms; the dense probe between them "
                f"{min(rates):.0f}-{max(rates):.0f} GFLOP/s")
        else:
            t_full = time_fn(lambda: fwd(**inp), repeats=repeats, warmup=warm, device=dev, warmup_s=warmup_s)
        full_plan = pruned.bsbert_plan
        if full_plan.model_check.get("checked"):
            say(f"\\[seq {seq}] model check: {full_plan.model_check['reason']}")
        remaining = batch * full_plan.flops(seq, "remaining")
        paired = paired_bound_ratio(lambda: fwd(**inp), probe, probe_flops, remaining, rounds=repeats, device=dev)
        # The same ratio with the dense GEMM probed at this run's M = batch * seq, the M of the forward's
        # own GEMMs (oneDNN runs an M=128 GEMM ~8% slower than an M=384 one on the 2-core Zen 5). The
        # column above (M=384 on CPU) is the stricter one; this one answers "as close to dense GEMM
        # speed as the same-shaped dense work would be".
        if m_probe == batch * seq:
            paired_m = paired
        else:
            probe_m, probe_m_flops = bound_probe(peak, dev, batch * seq)
            paired_m = paired_bound_ratio(lambda: fwd(**inp), probe_m, probe_m_flops, remaining, rounds=repeats,
                                          device=dev)
        for name, engine_fn in engine_fns.items():
            if engine_fn is not None:  # engine time / patched time, one call of each per round
                pair = paired_time_ratio(engine_fn, lambda: fwd(**inp), rounds=max(10, repeats), device=dev)
                engine_runs[name]["patched_speedup_paired"] = pair
                say(f"\\[seq {seq}] {name} / patched, paired: {pair['median']:.2f}x")
        engine_fns.clear()
        with torch.inference_mode():
            diff_full = _max_rel_diff(ref, pruned(**inp), inp)
        full_backends = _backend_counts(full_plan)
        # each seq's own plan: its backends were chosen for this seq (keyed by str(seq), as JSON keys are)
        results["plan_tables"][str(seq)] = full_plan.table(seq)
        bsbert.unpatch(pruned)
        if dev.type == "cuda":
            # A GPU's dense rate depends strongly on M (an M=384 GEMM leaves an H100 mostly idle), so
            # the bound for this run uses the rate at this run's M = batch * seq.
            peak = dense_gemm_gflops(dev, dt, m=batch * seq, shapes=shapes)
            say(f"\\[seq {seq}] {peak['label']} at M={batch * seq}: {peak['gflops']:.1f} GFLOP/s")
        packed = batch * full_plan.flops(seq, "packed")
        dense_fl = batch * full_plan.flops(seq, "dense")
        run = {"seq": seq, "dense_ms": t_dense["median_ms"], "packed_ms": t_pack["median_ms"],
               "patched_ms": t_full["median_ms"],
               "remaining_flops": remaining, "dense_flops": dense_fl,
               "speedup_vs_dense": t_dense["median_ms"] / t_full["median_ms"],
               "packing_speedup_vs_dense": t_dense["median_ms"] / t_pack["median_ms"],
               "speedup_vs_packing": t_pack["median_ms"] / t_full["median_ms"],
               "flop_bound_speedup": dense_fl / remaining, "packing_flop_bound_speedup": dense_fl / packed,
               "patched_paired_over_bound": paired,
               "patched_paired_over_bound_at_m": {**paired_m, "m": batch * seq},
               "max_rel_diff_packed": diff_pack, "max_rel_diff_patched": diff_full,
               "backends_packed": pack_backends, "backends_patched": full_backends,
               "model_check": full_plan.model_check,
               "timings": {"dense": t_dense, "packed": t_pack, "patched": t_full}}
        if engines:
            for e in engine_runs.values():
                if "ms" in e:  # bsbert's speedup over the engine, and the engine's rate on the packed FLOPs
                    e["patched_speedup"] = e["ms"] / run["patched_ms"]
                    e["gflops_on_packed"] = packed / (e["ms"] * 1e6)
            run["engines"] = engine_runs
        _apply_bound(run, peak)
        results["runs"].append(run)
        say(f"\\[seq {seq}] dense {run['dense_ms']:.1f} ms, packed {run['packed_ms']:.1f} ms, "
            f"patched {run['patched_ms']:.1f} ms")
    if dev.type != "cuda":
        # The same probe again after the runs: a 2-core VM's dense rate moved 832-1005 GFLOP/s (bf16)
        # between runs of this command, and a slow moment at the start made a loose bound. The bound
        # uses the faster of the two (the stricter bound); both are in the JSON.
        say("measuring the dense GEMM rate again ...")
        again = dense_gemm_gflops(dev, dt, shapes=shapes)
        say(f"  {again['label']}: {again['gflops']:.1f} GFLOP/s (at the start: {peak['gflops']:.1f})")
        results["dense_gemm_start"], results["dense_gemm_end"] = peak, again
        between = [g for run in results["runs"] for g in run["timings"]["patched"].get("probe_gflops", [])]
        if between:  # the same GEMM (backend, shape), probed between the patched blocks
            results["dense_gemm_between"] = {**peak, "gflops": max(between), "all_gflops": {peak["label"]: max(between)},
                                             "between_gflops": between}
        best = max((p for p in (peak, again, results.get("dense_gemm_between")) if p), key=lambda p: p["gflops"])
        if best is not peak:
            results["dense_gemm"] = best
            for run in results["runs"]:
                _apply_bound(run, best)
        if isa_peak:
            _apply_isa_peak(results, isa_peak, cpu_peak_gflops(dt))
        _apply_steady(results, say)  # also without an instruction peak (no extension, BSBERT_CPU_ISA=portable)
    results["plan_table"] = results["plan_tables"][str(seqs[-1])]  # the last seq's, as before plan_tables
    _outputs_check(results, say)
    _write(results, out_dir, console)
    return results


def _time_engine(name, model, inp, ref, repeats, dev, warmup_s, say, seq) -> tuple:
    """One engine (bsbert.engines) on the packed structure of ``model``: its median forward time, its
    outputs against the masked dense model, and its settings, and its runner (for the paired timing against
    the patched forward); ({"unavailable": why}, None) when it cannot run."""
    from bsbert import engines

    say(f"\\[seq {seq}] {name} on the packed model ...")
    try:
        runner = engines.engine_runner(name, model, inp, torch.get_num_threads())
    except engines.EngineUnavailable as exc:
        say(f"  {name} skipped: {exc}")
        return {"unavailable": str(exc)}, None
    try:  # an engine that builds but fails to run costs its own column, not the run
        t = time_fn(runner.run, repeats=repeats, warmup=1, device=dev, warmup_s=warmup_s)
    except Exception as exc:  # noqa: BLE001 (the engine's own error types)
        say(f"  {name} skipped: it failed to run: {type(exc).__name__}: {exc}")
        return {"unavailable": f"failed to run: {type(exc).__name__}: {exc}"}, None
    diff = _max_rel_diff(ref, runner.run(), inp)
    info = runner.info
    say(f"  {name} ({info['precision']}): {t['median_ms']:.1f} ms, max rel diff {diff:.1e}")
    return {"ms": t["median_ms"], "max_rel_diff": diff, "info": info, "timing": t}, runner.run_beside


def _apply_isa_peak(results: dict, start: dict, end: dict | None) -> None:
    """The instruction peak probed before and after the runs: the faster is the machine's issue rate
    (each run's ``isa_peak_bound_ms``, the hard floor: every remaining FLOP at that rate)."""
    best = max([p for p in (start, end) if p], key=lambda p: p["gflops"])
    results["isa_peak"], results["isa_peak_start"], results["isa_peak_end"] = best, start, end
    for run in results["runs"]:
        run["isa_peak_bound_ms"] = run["remaining_flops"] / (best["gflops"] * 1e9) * 1e3
        run["patched_over_isa_peak_bound"] = run["patched_ms"] / run["isa_peak_bound_ms"]


def _apply_steady(results: dict, say) -> None:
    """``steady``: False when the dense GEMM probe (at the run's two ends and between the patched blocks,
    ``--trials``) or the instruction peak (two ends; it touches no memory) moved by more than 5%. Then the
    cores were not all this process's for part of the run (other guests on a shared VM, throttling), and
    the table says so, since such a run's ratios mix two machines. The instruction peak may be missing (no
    extension, or a portable-only path): the dense probes still decide."""
    between = results.get("dense_gemm_between", {}).get("between_gflops", [])
    dense = [results["dense_gemm_start"]["gflops"], *between, results["dense_gemm_end"]["gflops"]]
    start, end = results.get("isa_peak_start"), results.get("isa_peak_end")
    pairs = [(start["gflops"], end["gflops"]) if start and end else None, dense]
    results["steady"] = all(p is None or min(p) >= 0.95 * max(p) for p in pairs)
    if not results["steady"]:
        peak = (f"instruction peak {start['gflops']:.0f} -> {end['gflops'] if end else float('nan'):.0f} GFLOP/s, "
                if start else "")
        say(f"  the machine was not steady during this run: {peak}dense GEMM {dense[0]:.0f} -> {dense[-1]:.0f}"
            + (f" ({min(between):.0f}-{max(between):.0f} between the patched blocks)" if between else "")
            + "; its ratios mix a fast and a slow machine")


def _apply_bound(run: dict, peak: dict) -> None:
    """The bound-dependent fields of one run: its FLOPs at the dense rate ``peak``."""
    t = run["timings"]["patched"]
    bound_ms = run["remaining_flops"] / (peak["gflops"] * 1e9) * 1e3
    run.update({"dense_gemm": peak, "remaining_bound_ms": bound_ms,
                "dense_bound_ms": run["dense_flops"] / (peak["gflops"] * 1e9) * 1e3,
                "patched_over_bound": t["median_ms"] / bound_ms,
                # the fastest repeat: what the code can do when the machine is quiet (a 2-core VM's
                # medians move +-5% between processes with nothing else running)
                "patched_best_over_bound": t["min_ms"] / bound_ms})
    if "trials" in t:  # each block's median over the same bound: how far one block could stray
        run["patched_trials_over_bound"] = [b["median_ms"] / bound_ms for b in t["trials"]]


def _backend_counts(plan) -> dict:
    counts = {}
    for lp in plan.layers:
        for lin in lp.linears.values():
            key = lin.backend + (f"@{lin.block}" if lin.format == "bsr" else "")
            counts[key] = counts.get(key, 0) + 1
    return counts


def _device_name(dev) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


# Switches that change which kernels or library paths run: a result file records the ones that were set
_CAP_VARS = ("BSBERT_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS",
             "BSBERT_TRITON_AUTOTUNE", "BSBERT_HUGEPAGES")


def _provenance(dev) -> dict:
    """What tells two result files apart beyond the device name (every Zen 3 and Zen 5 VM is "AMD EPYC"):
    bsbert's git commit (when it runs from a checkout), the CPU kernels' SIMD path, the CPU's family/model and
    the capping environment variables that were set."""
    import subprocess

    from bsbert import _ext

    out = {"commit": None, "cpu_isa": None, "cpu_id": None,
           "env": {k: os.environ[k] for k in _CAP_VARS if k in os.environ}}
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(bsbert.__file__)))
        r = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            out["commit"] = r.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    mod = _ext.load(warn=False)
    if mod is not None and hasattr(mod, "cpu_isa"):
        out["cpu_isa"] = mod.cpu_isa()
    if dev.type == "cpu":
        try:
            fields = {}
            with open("/proc/cpuinfo") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k.strip() in ("cpu family", "model", "stepping") and k.strip() not in fields:
                        fields[k.strip()] = v.strip()
                    if not line.strip():
                        break
            out["cpu_id"] = ", ".join(f"{k} {v}" for k, v in fields.items()) or None
        except OSError:
            pass
    return out


def _finite(obj):
    """The results with NaN / inf as null: json.dump wrote them as NaN / Infinity, which is not JSON (a wrong
    run's max_rel_diff is inf: exactly the file that must be readable)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _flags(results) -> list[str]:
    """What makes a run not a valid comparison, as the table caption and the plot say it."""
    flags = []
    if results.get("outputs_ok") is False:
        flags.append("OUTPUTS DIFFER: not a valid comparison")
    if not results.get("steady", True):
        flags.append("NOT STEADY: a probe moved > 5%")
    return flags


def table(results) -> Table:
    t = Table(title=f"bsbert bench — {results['model']} on {results['device_name']} "
                    f"({results['device']}, {results['dtype']}, batch {results['batch']}, "
                    f"{threads_text(results['threads'])}"
                    f"{', torch.compile ' + results['compile'] if results.get('compile') else ''})")
    if results.get("isa_peak"):
        ip, dg = results["isa_peak"], results["dense_gemm"]
        # a GEMM cannot beat the multiply-add issue rate: above it, the peak probe ran in a slow moment
        share = (f"{dg['gflops'] / ip['gflops']:.0%} of the instruction peak" if dg["gflops"] <= ip["gflops"] else
                 "above the instruction peak probe, which is therefore not valid in this run")
        t.caption = (f"FLOP bound at {dg.get('label', dg['backend'])} {dg['gflops']:.0f} GFLOP/s = "
                     f"{share} ({ip['instruction']}, {ip['gflops']:.0f} GFLOP/s on {threads_text(ip['threads'])})"
                     + ("; bf16 runs widened to fp32 on this CPU (no bf16 dot product)" if dg.get("widened") else "")
                     + ("" if results.get("steady", True) else
                        "; NOT STEADY: a probe moved > 5% during the run (see the log), compare steady runs"))
    if results.get("dense_model", "dense BERT-large") != "dense BERT-large":
        t.caption = ((t.caption + "; ") if t.caption else "") + f"dense = {results['dense_model']}"
    if results.get("outputs_ok") is False:
        t.caption = ((t.caption + "; ") if t.caption else "") + (
            f"OUTPUTS DIFFER from the masked dense model beyond {results['outputs_limit']:g}: not a valid comparison")
    engines = results.get("engines", [])
    for col in ("seq", "dense ms", "packed ms", "patched ms", "speedup", "packing speedup",
                "patched vs packed", *(c for e in engines for c in (f"{e} ms", f"patched vs {e} alone / paired")),
                "speedup bound", "bound ms", "patched/bound", "best/bound",
                "blocks/bound", "paired/bound", "paired/bound@M", "max rel diff"):
        t.add_column(col, justify="right")
    for r in results["runs"]:
        t.add_row(str(r["seq"]), f"{r['dense_ms']:.1f}", f"{r['packed_ms']:.1f}", f"{r['patched_ms']:.1f}",
                  f"{r['speedup_vs_dense']:.2f}x", f"{r['packing_speedup_vs_dense']:.2f}x",
                  f"{r['speedup_vs_packing']:.2f}x", *_engine_cells(r, engines),
                  f"{r['flop_bound_speedup']:.2f}x", f"{r['remaining_bound_ms']:.1f}",
                  f"{r['patched_over_bound']:.2f}", f"{r['patched_best_over_bound']:.2f}",
                  _range(r.get("patched_trials_over_bound")),
                  f"{r['patched_paired_over_bound']['median']:.2f}",
                  f"{r['patched_paired_over_bound_at_m']['median']:.2f}" if "patched_paired_over_bound_at_m" in r else "-",
                  f"{r['max_rel_diff_patched']:.1e}")
    return t


def _engine_cells(run, engines) -> list[str]:
    cells = []
    for e in engines:
        er = run.get("engines", {}).get(e, {})
        # bsbert's speedup over the engine: each timed alone (medians), and from calls timed in pairs (a
        # shared machine's phases hit both; the engine then also runs right after bsbert's forward)
        cells += [f"{er['ms']:.1f}", f"{er['patched_speedup']:.2f} / {er['patched_speedup_paired']['median']:.2f}x"] \
            if "ms" in er else ["-", "-"]
    return cells


def _range(values) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def _write(results, out_dir, console):
    os.makedirs(out_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(out_dir, f"bench-{results['device']}-{results['dtype']}-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump(_finite(results), f, indent=2, allow_nan=False)
    try:
        _plot(results, base + ".png")
        results["png"] = base + ".png"
    except Exception as exc:  # plotting is a convenience; the JSON is the record
        console.log(f"plot skipped: {exc}")
    results["json"] = base + ".json"


def _block_spread(runs):
    """Error bars for the patched bars: from the slowest to the fastest block median (``--trials``)."""
    lo, hi = [], []
    for r in runs:
        blocks = [b["median_ms"] for b in r["timings"]["patched"].get("trials", [])] or [r["patched_ms"]]
        lo.append(max(0.0, r["patched_ms"] - min(blocks)))
        hi.append(max(0.0, max(blocks) - r["patched_ms"]))
    return [lo, hi]


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    labels = [f"seq {r['seq']}" for r in runs]
    series = [("dense (torch eager)", "dense_ms"), ("packing only", "packed_ms"),
              *((f"{e} (packed model)", e) for e in results.get("engines", [])
                if all("ms" in r.get("engines", {}).get(e, {}) for r in runs)),
              ("bsbert patched (whiskers: block medians)", "patched_ms"), ("FLOP bound", "remaining_bound_ms")]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (name, key) in enumerate(series):
        xs = [j + i * width for j in range(len(runs))]
        ys = [r[key] if key in r else r["engines"][key]["ms"] for r in runs]
        ax.bar(xs, ys, width, label=name, yerr=_block_spread(runs) if key == "patched_ms" else None, capsize=3)
    k = next(i for i, (_, key) in enumerate(series) if key == "patched_ms")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(runs))], labels)
    ax.set_ylabel("ms per forward (median)")
    for j, r in enumerate(runs):  # the ratio the targets are stated in, above the patched bar
        ax.annotate(f"{r['patched_over_bound']:.2f}x bound", (j + k * width, r["patched_ms"]), ha="center",
                    va="bottom", fontsize=7, xytext=(0, 4), textcoords="offset points")
    dense_name = results.get("dense_model", "dense BERT-large")
    flags = _flags(results)
    ax.set_title(f"{results['model']} vs {dense_name}\n{results['device_name']}, {results['dtype']}, "
                 f"batch {results['batch']}, {threads_text(results['threads'])}"
                 + ("\n" + "; ".join(flags) if flags else ""), fontsize=9, color="red" if flags else "black")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
