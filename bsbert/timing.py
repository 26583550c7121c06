"""Wall-clock timing that is honest on both devices: warm-up first, synchronise CUDA, median of repeats."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _synchronizer(device) -> Callable[[], None]:
    """What waits for the device's queued work: torch.cuda.synchronize of *that* GPU on CUDA (not the
    current one: timing ``cuda:1`` while ``cuda:0`` is current must wait for ``cuda:1``), nothing on the CPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return lambda: None
    return lambda: torch.cuda.synchronize(dev)


def _call_seconds(fn, sync) -> float:
    """Wall-clock seconds of one ``fn()``, its device work included."""
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def time_fn(fn, *, repeats: int = 5, warmup: int = 1, device: str | torch.device = "cpu",
            warmup_s: float = 0.0) -> dict:
    """Median / min / max of ``repeats`` timed calls after ``warmup`` calls, and after at least
    ``warmup_s`` seconds of calls: on the 2-core VM the first ~10-20 forwards after ``patch`` ran 8-75%
    slower than the steady state (four runs, bf16 seq 128, median of forwards 2-11 vs 41-80), so a
    count-only warm-up measured that transient."""
    sync = _synchronizer(device)
    with torch.inference_mode():
        t_start = time.perf_counter()
        done = 0
        while done < warmup or time.perf_counter() - t_start < warmup_s:
            fn()
            sync()
            done += 1
        ts = [_call_seconds(fn, sync) for _ in range(repeats)]
    return {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
            "max_ms": 1e3 * max(ts), "repeats": repeats, "times_ms": [1e3 * t for t in ts]}


def time_in_trials(fn, probe, probe_flops: float, *, trials: int = 5, repeats: int = 5, warmup: int = 1,
                   device: str | torch.device = "cpu", warmup_s: float = 0.0, probe_rounds: int = 8) -> dict:
    """``time_fn`` of ``fn`` spread over the run: ``trials`` blocks of ``repeats`` timed calls, with the
    dense GEMM ``probe`` (``probe_flops`` per call) timed before each block and after the last (best of
    ``probe_rounds`` rounds). The median is over every timed call of every block, so one slow stretch
    of a shared machine (on the 2-core VM, stretches of seconds in which a forward ran 10-25% slower while
    both the start and end probes looked normal) moves one block, not the result. The probe rates let the
    caller make its FLOP bound out of the fastest rate seen anywhere in the run (a stricter bound, not a
    looser one); each block's median and its two neighbouring probe rates are returned too.
    After a probe, one untimed call of ``fn`` re-warms what the probe evicted from the caches."""
    dev = torch.device(device)

    def probe_gflops():
        return probe_rate(probe, probe_flops, rounds=probe_rounds, target_s=0.04, device=dev)

    rates = [probe_gflops()]
    blocks, ts = [], []
    for i in range(trials):
        r = time_fn(fn, repeats=repeats, warmup=warmup if i == 0 else 1, device=dev,
                    warmup_s=warmup_s if i == 0 else 0.0)
        ts += r["times_ms"]
        rates.append(probe_gflops())
        blocks.append({"median_ms": r["median_ms"], "min_ms": r["min_ms"], "probe_gflops": rates[-2:]})
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "repeats": len(ts),
            "times_ms": ts, "trials": blocks, "probe_gflops": rates}


def probe_rate(probe, probe_flops: float, rounds: int = 8, target_s: float = 0.04, device="cpu") -> float:
    """GFLOP/s of the GEMM ``probe`` (``probe_flops`` per call): its best of ``rounds`` rounds of ~``target_s``."""
    return probe_flops / best_of_interleaved([probe], rounds=rounds, target_s=target_s, device=device)[0] / 1e9


def best_of_interleaved(fns, rounds: int = 5, target_s: float = 0.01, device="cpu") -> list[float]:
    """Seconds per call of each ``fns[i]()``, timed round-robin: each round runs every candidate once
    (a few calls each, about ``target_s``), and the best round counts. Load from other processes
    only ever adds time and hits the candidates alike, so this ranks them correctly on a busy
    machine where a median of back-to-back runs of one candidate after the other does not."""
    sync = _synchronizer(device)
    with torch.inference_mode():
        reps = []
        for f in fns:  # warm-up (allocations, primitive caches, packing buffers), then calibrate
            f()
            sync()
            reps.append(max(1, int(target_s / max(_call_seconds(f, sync), 1e-7))))
        best = [float("inf")] * len(fns)
        for _ in range(rounds):
            for i, f in enumerate(fns):
                t0 = time.perf_counter()
                for _ in range(reps[i]):
                    f()
                sync()
                best[i] = min(best[i], (time.perf_counter() - t0) / reps[i])
    return best


def best_of_interleaved_graphs(fns, rounds: int = 5, replays: int = 20, device=None) -> list[float]:
    """GPU seconds per call of each ``fns[i]()`` with the host taken out: each is captured once in a CUDA
    graph, then the graphs are replayed round-robin (``replays`` back to back between two CUDA events per
    round) and the best round counts. This ranks kernels as a model run under CUDA graphs (torch.compile's
    "reduce-overhead") sees them; wall-clock timing (``best_of_interleaved``) ranks them as an eager caller
    sees them, launch overhead included, which at small batch is mostly host time. A candidate that cannot
    be captured (a host sync inside) gets ``inf``. ``device``: the GPU the calls run on (streams, graphs and
    events are made on the current device: a model on cuda:1 while cuda:0 is current captured empty graphs)."""
    with torch.cuda.device(device):
        return _best_of_interleaved_graphs(fns, rounds, replays)


def _best_of_interleaved_graphs(fns, rounds: int, replays: int) -> list[float]:
    graphs = []
    with torch.inference_mode():
        for f in fns:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side):  # warm-up outside the capture (lazy init, allocator)
                    f()
                    f()
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    f()
                graphs.append(g)
            except RuntimeError:
                torch.cuda.synchronize()
                graphs.append(None)
        best = [float("inf")] * len(fns)
        for _ in range(rounds):
            for i, g in enumerate(graphs):
                if g is None:
                    continue
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(replays):
                    g.replay()
                end.record()
                end.synchronize()
                best[i] = min(best[i], start.elapsed_time(end) / 1e3 / replays)
    return best


def paired_bound_ratio(fwd, probe, probe_flops: float, flops: float, rounds: int = 10, device="cpu") -> dict:
    """Time/bound measured in pairs: each round times one ``fwd()`` and then the dense GEMM ``probe``
    (repeated for about as long), and the round's ratio is fwd's time over ``flops`` at the probe's
    rate of that round. A slow stretch of a shared machine slows both halves of a round alike, so the
    median of the per-round ratios is stable where a median time over a rate measured minutes earlier
    is not (on a 2-core VM the latter moved 1.06-1.21 between two runs of the same code)."""
    sync = _synchronizer(device)
    ratios = []
    with torch.inference_mode():
        fwd(), probe()
        sync()
        t_probe1 = max(_call_seconds(probe, sync), 1e-7)
        for _ in range(rounds):
            t_fwd = _call_seconds(fwd, sync)
            n = max(1, round(t_fwd / t_probe1))
            t0 = time.perf_counter()
            for _ in range(n):
                probe()
            sync()
            rate = probe_flops * n / (time.perf_counter() - t0)
            ratios.append(t_fwd / (flops / rate))
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": rounds}


def paired_time_ratio(a, b, rounds: int = 10, device="cpu") -> dict:
    """Time of ``a()`` over time of ``b()``, measured in pairs: each round times one call of each (which
    goes first alternates), and the result is the median of the per-round ratios. Why: two programs timed
    minutes apart on a shared VM can meet machines 10-20% apart; a pair of calls meets the same one."""
    sync = _synchronizer(device)
    ratios, ta, tb = [], [], []
    with torch.inference_mode():
        a(), b()
        sync()
        for r in range(rounds):
            if r % 2:
                tb.append(_call_seconds(b, sync))
                ta.append(_call_seconds(a, sync))
            else:
                ta.append(_call_seconds(a, sync))
                tb.append(_call_seconds(b, sync))
            ratios.append(ta[-1] / max(tb[-1], 1e-9))
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": rounds,
            "a_median_ms": statistics.median(ta) * 1e3, "b_median_ms": statistics.median(tb) * 1e3}


def dense_gemm_probe(backend: str, device="cpu", dtype=torch.float32, m=384, k=1024, n=4096):
    """(callable, FLOPs per call): one dense GEMM of the given shape through ``backend``."""
    from bsbert.ops.linear_backends import BACKENDS

    dev = torch.device(device)
    x = torch.randn(m, k, device=dev).to(dtype)
    prepared = BACKENDS[backend].prepare(torch.randn(n, k, device=dev).to(dtype), None, False, None)
    return (lambda: prepared(x)), 2.0 * m * k * n


def bert_dense_shapes(hidden: int = 1024, intermediate: int = 4096) -> list[tuple[int, int]]:
    """(K, N) of a BERT layer's dense GEMMs: attention output, fused Q/K/V, FFN in, FFN out. The bound's
    rate is the best over them: one shape alone (FFN in, the probe up to stop 25) ran 3-6% under the
    fastest (1024 x 1024) on the 2-core Zen 5, a looser bound than the model's own shapes give."""
    return [(hidden, hidden), (hidden, 3 * hidden), (hidden, intermediate), (intermediate, hidden)]


def dense_gemm_gflops(device="cpu", dtype=torch.float32, m=384, k=1024, n=4096, rounds=30,
                      shapes: list[tuple[int, int]] | None = None) -> dict:
    """The best dense GEMM rate this device offers torch here (oneDNN on CPU when it supports the
    dtype, torch's default F.linear; cuBLAS on CUDA): the denominator of FLOP bounds. The candidates
    are timed in interleaved rounds and the best round counts, so the bound is the machine's rate,
    not one lowered by a busy moment (30 rounds: with 10, a 2-core VM gave 417-434 GFLOP/s where the
    kernel report measured oneDNN at 450-477 the same hour).

    bf16 on a CPU without a bf16 dot product (``_ext.bf16_widened_on_cpu``): the same GEMMs in fp32 are
    candidates too, since fp32 is what bf16 work runs as there (a user could run the model in fp32), and
    a bound at the emulated bf16 rate would be ~4x too loose. ``probe_dtype`` says which dtype won,
    ``widened`` whether it is fp32 for bf16 work, ``label`` names both; ``bound_probe`` rebuilds it.

    ``shapes``: (K, N) pairs to probe at M = ``m`` (default: ``k`` x ``n`` alone); the fastest shape and
    backend count (``shape``: the winner's [m, k, n], which ``bound_probe`` probes again)."""
    from bsbert import _ext
    from bsbert.ops.linear_backends import BACKENDS

    dev = torch.device(device)
    dtypes = [dtype]
    if dev.type == "cpu" and dtype == torch.bfloat16 and _ext.bf16_widened_on_cpu():
        dtypes.append(torch.float32)
    shapes = [tuple(s) for s in shapes] if shapes else [(k, n)]
    cands = [(nm, dt, kn) for dt in dtypes for nm in ("onednn-dense", "torch-dense")
             if not BACKENDS[nm].not_supported_reasons(dev, dt, None) for kn in shapes]

    def label(nm, dt, kn):
        return nm + (f" {kn[0]}x{kn[1]}" if len(shapes) > 1 else "") + ("" if dt == dtype else f" ({_dtype_name(dt)})")

    labels = [label(*c) for c in cands]
    probes = [dense_gemm_probe(nm, dev, dt, m, *kn) for nm, dt, kn in cands]
    secs = best_of_interleaved([probe for probe, _ in probes], rounds=rounds, target_s=0.05, device=dev)
    rates = {lb: flops / t / 1e9 for lb, (_, flops), t in zip(labels, probes, secs)}
    i = max(range(len(cands)), key=lambda j: rates[labels[j]])
    return {"backend": cands[i][0], "label": labels[i], "gflops": rates[labels[i]], "all_gflops": rates,
            "shape": [m, *cands[i][2]], "shapes": [list(kn) for kn in shapes], "dtype": str(dtype),
            "probe_dtype": _dtype_name(cands[i][1]), "widened": cands[i][1] != dtype}


def bound_probe(peak: dict, device="cpu", m: int | None = None):
    """(callable, FLOPs per call): the GEMM a ``dense_gemm_gflops`` result timed (backend, dtype, shape),
    at M = ``m`` if given: the same rate probed again between and beside other work."""
    m0, k, n = peak["shape"]
    return dense_gemm_probe(peak["backend"], device, getattr(torch, peak["probe_dtype"]), m or m0, k, n)


def threads_text(n: int) -> str:
    """A thread count as text, "1 thread" or "n threads" (the bench, info and the scripts)."""
    return f"{n} thread" + ("" if n == 1 else "s")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cpu_peak_gflops(dtype=torch.float32, seconds: float = 0.25) -> dict | None:
    """The CPU's instruction peak for the GEMMs' multiply-add at ``dtype`` (bf16: vdpbf16ps, else fp32
    FMA), every one of torch's threads running register-only chains at once (bsbert._C, isa_peak.cpp):
    ``{"gflops": sum over threads, "per_thread": [...], "instruction": ..., "kind": ...}``, or None when
    there is nothing to time (no extension, no AVX2 / AVX-512, float16). What a dense GEMM rate or the
    FLOP bound is a fraction of: the 2-core Zen 5 issues two vdpbf16ps a cycle per core, ~510 GFLOP/s a
    core with both busy, where oneDNN's dense bf16 GEMM reaches ~485. bf16 on a CPU level without
    vdpbf16ps (``_ext.bf16_widened_on_cpu``): the fp32 FMA rate, what bsbert's kernels widen bf16 to there
    (``"kind": "fp32", "widened": True``)."""
    from bsbert import _ext

    mod = _ext.load(warn=False)
    if mod is None or not hasattr(mod, "cpu_peak_gflops") or dtype not in (torch.float32, torch.bfloat16):
        return None
    widened = dtype == torch.bfloat16 and _ext.bf16_widened_on_cpu()
    kind = "bf16" if dtype == torch.bfloat16 and not widened else "fp32"
    try:
        instruction = mod.cpu_peak_instruction(kind)
        rates = mod.cpu_peak_gflops(kind, seconds)
    except RuntimeError:  # the CPU (or BSBERT_CPU_ISA) lacks the instruction: nothing to compare with
        return None
    return {"gflops": sum(rates), "per_thread": list(rates), "instruction": instruction, "kind": kind,
            "widened": widened, "threads": len(rates), "seconds": seconds}
