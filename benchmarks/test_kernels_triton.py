"""GPU benchmarks of bsbert's Triton kernels (pytest-benchmark; skipped without CUDA).

    pytest benchmarks/test_kernels_triton.py --benchmark-only --benchmark-json=out.json

Each case times every implementation with ``triton.testing.do_bench`` (median, ms) inside one
``benchmark.pedantic`` round and stores the numbers in ``benchmark.extra_info``; the pytest-benchmark
wall time of the round itself is not the metric. See bsbert/triton/_bench.py for the definitions.
``scripts/bench_triton.py`` prints the same cases as a markdown table.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
pytest.importorskip("pytest_benchmark")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from bsbert.triton import _bench  # noqa: E402  (imports no triton kernels by itself)

# _bench records a failing call as a "<name>_error" string so that a sweep goes on; here a failure must
# fail the case. Exempt: torch's own Triton BSR kernel (bsr_dense_mm), a private API that supports only
# some shapes / dtypes -- a missing comparison column, not a bsbert failure.
_MAY_FAIL = {"torch_bsr_error"}


def _run(benchmark, fn, **kw):
    res = benchmark.pedantic(lambda: fn(**kw), rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({k: v for k, v in res.items() if v is not None})
    errors = {k: v for k, v in res.items() if k.endswith("_error") and k not in _MAY_FAIL}
    assert not errors, f"calls failed: {errors}"
    # a forced CUDA tile may not fit (its x slab too wide for shared memory); any other failure counts
    tile_errors = {t: e for t, e in res.get("cuda_tile_errors", {}).items() if "shared memory" not in e}
    assert not tile_errors, f"CUDA tiles failed: {tile_errors}"
    assert res["bsbert_ms"] > 0
    return res


def _check_linear(m, n, k, density, block, dtype=torch.float16):
    """bsbert's Triton linear at the benchmark's shape against float64 F.linear on the dense weight the
    matrix is built from (not on the matrix itself). Loose: fp16 with K up to 4096."""
    from bsbert.formats import BlockSparseMatrix
    from bsbert.triton.bsr_linear import bsr_linear_triton

    gen = torch.Generator().manual_seed(m + n + k + block)
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    keep = torch.rand(nb, kb, generator=gen) < density
    mask = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k) * mask).to("cuda", dtype)
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    y = bsr_linear_triton(x, BlockSparseMatrix.from_dense(w, block, pad=True))
    torch.testing.assert_close(y.double(), F.linear(x.double(), w.double()), atol=2e-2, rtol=2e-2)


def _check_attention(seq, heads, padded, batch=_bench.ATTN_BATCH, d=64):
    """bsbert's Triton attention against a float64 softmax(q k^T * scale) v of the same fp16 qkv."""
    from bsbert.triton.attention import pruned_attention_triton

    gen = torch.Generator().manual_seed(seq + heads)
    qkv = torch.randn(batch, seq, 3 * heads * d, generator=gen).to("cuda", torch.float16)
    mask = None
    if padded:
        lengths = torch.linspace(seq // 2, seq, batch, device="cuda").long()
        mask = torch.arange(seq, device="cuda")[None, :] < lengths[:, None]
    out = pruned_attention_triton(qkv, mask, heads, d, 1 / math.sqrt(d))
    q, k, v = qkv.double().view(batch, seq, 3, heads, d).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    ref = (torch.softmax(scores, -1) @ v).permute(0, 2, 1, 3).reshape(batch, seq, heads * d)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("density", _bench.DENSITIES)
@pytest.mark.parametrize("m", _bench.MS)
@pytest.mark.parametrize("nk", _bench.NK, ids=lambda nk: f"N{nk[0]}xK{nk[1]}")
def test_bsr_linear_fp16(benchmark, nk, m, density):
    n, k = nk
    _run(benchmark, _bench.bench_linear, m=m, n=n, k=k, density=density, block=32)
    _check_linear(m, n, k, density, 32)


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("density", [0.5, 0.1])
def test_bsr_linear_fp16_other_blocks(benchmark, block, density):
    _run(benchmark, _bench.bench_linear, m=384 * 8, n=1024, k=1024, density=density, block=block)
    _check_linear(384 * 8, 1024, 1024, density, block)


@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "padded"])
@pytest.mark.parametrize("heads", _bench.HEADS)
@pytest.mark.parametrize("seq", _bench.SEQS)
def test_attention_fp16(benchmark, seq, heads, padded):
    _run(benchmark, _bench.bench_attention, seq=seq, heads=heads, padded=padded)
    _check_attention(seq, heads, padded)
