"""Peak activation memory of one CPU forward, measured in a fresh process.

CPU has no allocator counter with a peak, and RSS does not grow when glibc reuses freed heap pages.
So the probe runs in a child process started with ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB: every
large tensor is then its own mmap, returned to the OS on free, and RSS follows live memory. The child
builds the model, runs one warm-up forward (persistent buffers stay in the baseline), resets the
high-water mark (/proc/self/clear_refs), runs the measured forward and reports VmHWM - VmRSS(before).

    python -m bsbert.memprobe --which dense|patched --batch 1 --seq 384 --dtype float32 [--small]
                              [--threads N] [--plan PLAN.json]

The caller's thread count and, for the patched model, the caller's plan (its backends: a forward on other
kernels allocates other scratch) go to the child, so that it measures the forward the caller timed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_in_process(fn) -> float:
    """MB above the current RSS that ``fn()`` peaks at (valid only under the ENV malloc setting)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - base) / 1024


def probe(which: str, batch: int, seq: int, dtype: str, small: bool = False, timeout: float = 1800,
          threads: int | None = None, plan=None) -> float | None:
    """Run the probe in a child process; None when it cannot run here (not Linux, child failed):
    :func:`probe_with_reason` says why."""
    return probe_with_reason(which, batch, seq, dtype, small, timeout, threads=threads, plan=plan)[0]


def probe_with_reason(which: str, batch: int, seq: int, dtype: str, small: bool = False,
                      timeout: float = 1800, threads: int | None = None, plan=None) -> tuple[float | None, str]:
    """(peak MB, "") from a child process, or (None, why not): not Linux, the child failed (its return code
    and last stderr line, e.g. a PermissionError on /proc/self/clear_refs in a sandbox) or ran past
    ``timeout`` seconds (said, not raised: a sweep goes on with its other configurations).
    ``threads``: torch.set_num_threads in the child (default: torch's default there). ``plan``: the
    :class:`bsbert.plan.Plan` (or its dict) the patched model is patched with (``select='plan'``, the
    caller's backends); without one the child chooses by the block-density heuristic."""
    if not sys.platform.startswith("linux"):
        return None, f"needs Linux's /proc/self (platform {sys.platform})"
    cmd = [sys.executable, "-m", "bsbert.memprobe", "--which", which, "--batch", str(batch), "--seq", str(seq),
           "--dtype", dtype] + (["--small"] if small else [])
    if threads is not None:
        cmd += ["--threads", str(int(threads))]
    with tempfile.TemporaryDirectory(prefix="bsbert-memprobe-") as tmp:
        if plan is not None and which == "patched":
            path = os.path.join(tmp, "plan.json")
            with open(path, "w") as f:
                json.dump(plan if isinstance(plan, dict) else plan.to_dict(), f)
            cmd += ["--plan", path]
        return _run_child(cmd, timeout)


def _run_child(cmd: list[str], timeout: float) -> tuple[float | None, str]:
    import bsbert

    # `-m` puts the working directory first on the child's path: run it where the bsbert imported here lives,
    # or a ./bsbert in the caller's directory (a checkout root, with no compiled extension) is what it measures
    root = os.path.dirname(os.path.dirname(os.path.abspath(bsbert.__file__)))
    try:
        res = subprocess.run(cmd, env={**os.environ, **ENV}, cwd=root, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"the child process ran past {timeout:g} s"
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["peak_activation_mb"], ""
    last = (res.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"the child process exited with code {res.returncode}: {last}"


def main(argv=None) -> int:
    import torch

    import bsbert
    from bsbert import models
    from bsbert.bench import DTYPES, _backend_counts, _inputs

    p = argparse.ArgumentParser(prog="python -m bsbert.memprobe")
    p.add_argument("--which", choices=["dense", "patched"], required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=384)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--small", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--plan", default=None, help="JSON of a Plan to patch with (select='plan')")
    a = p.parse_args(argv)
    if a.threads is not None:
        if a.threads < 1:
            p.error(f"--threads must be at least 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != ENV["MALLOC_MMAP_THRESHOLD_"]:
        print("warning: run through bsbert.memprobe.probe() (needs MALLOC_MMAP_THRESHOLD_)", file=sys.stderr)
    over = {"num_hidden_layers": 2} if a.small else {}
    dt = DTYPES[a.dtype]
    if a.which == "dense":
        model = models.dense_bert_large(dtype=dt, **over)
    elif a.plan:
        from bsbert.plan import Plan

        with open(a.plan) as f:
            plan = Plan.from_dict(json.load(f))
        model = bsbert.patch(models.seed_like_model(dtype=dt, **over), plan=plan, select="plan", progress=False,
                             keep_original=False)
    else:
        model = bsbert.patch(models.seed_like_model(dtype=dt, **over), select="heuristic", progress=False,
                             keep_original=False)
    inp = _inputs(a.batch, a.seq, model.config.vocab_size, "cpu")
    with torch.inference_mode():
        model(**inp)
        mb = measure_in_process(lambda: model(**inp))
    # what the measured forward ran on (the caller can check its plan held)
    backends = _backend_counts(model.bsbert_plan) if a.which == "patched" else {}
    print(json.dumps({"which": a.which, "batch": a.batch, "seq": a.seq, "dtype": a.dtype,
                      "threads": torch.get_num_threads(), "linear_backends": backends,
                      "peak_activation_mb": mb}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
