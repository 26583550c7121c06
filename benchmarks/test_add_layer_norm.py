"""pytest-benchmark: bsbert's fused residual add + LayerNorm (torch.ops.bsbert.add_layer_norm) vs
torch's ``F.layer_norm(x + r)``, the tail of every BERT sub-block, at BERT-large width.

    pytest benchmarks/test_add_layer_norm.py --benchmark-only      # one group per shape and dtype
    python -m benchmarks.test_add_layer_norm [rounds]              # interleaved rounds, ratio table

BSBERT_BENCH_SMALL=1 keeps only [1, 128, 1024] fp32. pytest-benchmark times one candidate after the
other; on a shared machine prefer the interleaved form, which alternates them round by round.
"""
from __future__ import annotations

import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import SMALL, check_close, run_info
from bsbert import _ext

SHAPES = [(1, 128, 1024)] if SMALL else [(1, 384, 1024), (1, 128, 1024)]
DTYPES = [torch.float32] if SMALL else [torch.float32, torch.bfloat16]
EPS = 1e-12  # BERT's layer_norm_eps

needs_op = pytest.mark.skipif(not _ext.has_op("add_layer_norm"),
                              reason=f"bsbert::add_layer_norm unavailable: {_ext.reason_unavailable()}")


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x, r = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    w, b = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    return x, r, w, b


def _case(shape, dtype, seed=0):
    x, r, w, b = _inputs(shape, dtype, seed)
    n = shape[-1]
    return {
        "fused": lambda: torch.ops.bsbert.add_layer_norm(x, r, w, b, EPS),
        "torch": lambda: F.layer_norm(x + r, (n,), w, b, EPS),
    }


def _reference(shape, dtype, seed=0):
    """float64 LayerNorm(x + r) of the same (dtype-rounded) inputs."""
    x, r, w, b = (t.double() for t in _inputs(shape, dtype, seed))
    return F.layer_norm(x + r, (shape[-1],), w, b, EPS)


def _name(shape, dtype) -> str:
    return f"{'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')}"


@needs_op
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_add_layer_norm(benchmark, shape, dtype, impl):
    benchmark.group = f"add+LayerNorm {_name(shape, dtype)}"
    benchmark.extra_info.update(run_info())
    fn = _case(shape, dtype)[impl]
    with torch.inference_mode():
        benchmark.extra_info["max_rel_err"] = check_close(fn(), _reference(shape, dtype), dtype, impl)
        benchmark(fn)


def interleaved(rounds: int = 30, calls: int = 50) -> list[dict]:
    """Median microseconds per call of each candidate, the candidates alternating every round."""
    rows = []
    for shape in SHAPES:
        for dtype in DTYPES:
            fns = _case(shape, dtype)
            ts = {k: [] for k in fns}
            with torch.inference_mode():
                for f in fns.values():
                    f()
                for _ in range(rounds):
                    for k, f in fns.items():
                        t0 = time.perf_counter()
                        for _ in range(calls):
                            f()
                        ts[k].append((time.perf_counter() - t0) / calls * 1e6)
            med = {k: statistics.median(v) for k, v in ts.items()}
            rows.append({"case": _name(shape, dtype), **med, "speedup": med["torch"] / med["fused"]})
    return rows


if __name__ == "__main__":
    if not _ext.has_op("add_layer_norm"):
        sys.exit(f"bsbert::add_layer_norm unavailable: {_ext.reason_unavailable()}")
    print(f"threads={torch.get_num_threads()} isa={_ext.load().cpu_isa()}")
    print(f"{'case':<22} {'fused us':>9} {'torch us':>9} {'torch/fused':>11}")
    for row in interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 30):
        print(f"{row['case']:<22} {row['fused']:>9.1f} {row['torch']:>9.1f} {row['speedup']:>11.2f}")
