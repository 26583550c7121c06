"""GPU benchmarks of bsbert's Triton kernels (pytest-benchmark; skipped without CUDA).

    pytest benchmarks/test_kernels_triton.py --benchmark-only --benchmark-json=out.json

Each case times every implementation with ``triton.testing.do_bench`` (median, ms) inside one
``benchmark.pedantic`` round and stores the numbers in ``benchmark.extra_info``; the pytest-benchmark
wall time of the round itself is not the metric. See bsbert/triton/_bench.py for the definitions.
``scripts/bench_triton.py`` prints the same cases as a markdown table.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("pytest_benchmark")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from bsbert.triton import _bench  # noqa: E402  (imports no triton kernels by itself)


def _run(benchmark, fn, **kw):
    res = benchmark.pedantic(lambda: fn(**kw), rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({k: v for k, v in res.items() if v is not None})
    return res


@pytest.mark.parametrize("density", _bench.DENSITIES)
@pytest.mark.parametrize("m", _bench.MS)
@pytest.mark.parametrize("nk", _bench.NK, ids=lambda nk: f"N{nk[0]}xK{nk[1]}")
def test_bsr_linear_fp16(benchmark, nk, m, density):
    n, k = nk
    res = _run(benchmark, _bench.bench_linear, m=m, n=n, k=k, density=density, block=32)
    assert res["bsbert_ms"] > 0


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("density", [0.5, 0.1])
def test_bsr_linear_fp16_other_blocks(benchmark, block, density):
    res = _run(benchmark, _bench.bench_linear, m=384 * 8, n=1024, k=1024, density=density,
               block=block)
    assert res["bsbert_ms"] > 0


@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "padded"])
@pytest.mark.parametrize("heads", _bench.HEADS)
@pytest.mark.parametrize("seq", _bench.SEQS)
def test_attention_fp16(benchmark, seq, heads, padded):
    res = _run(benchmark, _bench.bench_attention, seq=seq, heads=heads, padded=padded)
    assert res["bsbert_ms"] > 0
