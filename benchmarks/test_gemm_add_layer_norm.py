"""pytest-benchmark: BERT's output block LayerNorm(x @ W^T + b + residual), N = 1024, three ways:
``bsr_linear_add_layer_norm`` (one op, each thread owns whole rows), ``bsr_linear`` then
``add_layer_norm``, and oneDNN's dense linear then ``add_layer_norm``.

    pytest benchmarks/test_gemm_add_layer_norm.py --benchmark-only
    python -m benchmarks.test_gemm_add_layer_norm [rounds]        # interleaved best-of rounds, table

BSBERT_BENCH_SMALL=1 keeps one case. The weights here stay in cache between calls, which flatters the
two-op forms: inside a model the separate add_layer_norm reads rows that the GEMM's threads wrote by
columns, half of them from the other core (measure in the model with ``python scripts/model_ab.py fused-tail``).
"""
from __future__ import annotations

import sys

import pytest
import torch

from benchmarks.conftest import SMALL, check_close, run_info
from bsbert import _ext
from bsbert.formats import BlockSparseMatrix

N = 1024
# (M, K, block density): a sparse attention-output projection, the seed's in-head density, a packed FFN
CASES = [(128, 1024, 0.5)] if SMALL else [(m, k, d) for m in (128, 384)
                                          for k, d in ((1024, 0.5), (576, 0.64), (1020, 1.0))]

needs_op = pytest.mark.skipif(not _ext.has_op("bsr_linear_add_layer_norm"),
                              reason=f"bsbert::bsr_linear_add_layer_norm unavailable: {_ext.reason_unavailable()}")


def _inputs(m, k, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(N // 32, -(-k // 32), generator=g) < density
    w = torch.randn(N, k, generator=g) * keep.repeat_interleave(32, 0).repeat_interleave(32, 1)[:, :k]
    b, lw, lb = torch.randn(N, generator=g), torch.rand(N, generator=g) + 0.5, torch.randn(N, generator=g)
    x, r = torch.randn(m, k, generator=g), torch.randn(m, N, generator=g)
    return x, w, b, r, lw, lb


def _reference(m, k, density, seed=0):
    """float64 LayerNorm(x @ W^T + b + r) of the same inputs."""
    x, w, b, r, lw, lb = (t.double() for t in _inputs(m, k, density, seed))
    return torch.nn.functional.layer_norm(x @ w.T + b + r, (N,), lw, lb, 1e-12)


def _fns(m, k, density, seed=0):
    from bsbert.ops.packing import pack_cpu

    x, w, b, r, lw, lb = _inputs(m, k, density, seed)
    bsm = BlockSparseMatrix.from_dense(w, 32, pad=True)
    packed, crow, col = pack_cpu(bsm, torch.float32), bsm.crow_indices, bsm.col_indices
    n, kk = bsm.shape
    ops = torch.ops.bsbert
    return {
        "fused": lambda: ops.bsr_linear_add_layer_norm(x, crow, col, packed, b, n, kk, 32, r, lw, lb, 1e-12),
        "bsr+aln": lambda: ops.add_layer_norm(ops.bsr_linear(x, crow, col, packed, b, n, kk, 32, False),
                                              r, lw, lb, 1e-12),
        "onednn+aln": lambda: ops.add_layer_norm(torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""),
                                                 r, lw, lb, 1e-12),
    }


def _name(m, k, density) -> str:
    return f"M={m} K={k} density={density}"


@needs_op
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("impl", ["fused", "bsr+aln", "onednn+aln"])
def test_output_block(benchmark, case, impl):
    benchmark.group = f"output block {_name(*case)}"
    benchmark.extra_info.update(run_info())
    fn = _fns(*case)[impl]
    with torch.inference_mode():
        benchmark.extra_info["max_rel_err"] = check_close(fn(), _reference(*case), torch.float32, impl)
        benchmark(fn)


def table(rounds: int = 10) -> str:
    from bsbert.timing import best_of_interleaved

    lines = [f"threads={torch.get_num_threads()} (best of {rounds} interleaved rounds, us per call)",
             f"{'case':<30} {'fused':>8} {'bsr+aln':>8} {'onednn+aln':>11} {'bsr+aln/fused':>14}"]
    for case in CASES:
        fns = _fns(*case)
        t = dict(zip(fns, best_of_interleaved(list(fns.values()), rounds=rounds, target_s=0.03)))
        us = {k: v * 1e6 for k, v in t.items()}
        lines.append(f"{_name(*case):<30} {us['fused']:8.0f} {us['bsr+aln']:8.0f} {us['onednn+aln']:11.0f} "
                     f"{us['bsr+aln'] / us['fused']:14.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    if not _ext.has_op("bsr_linear_add_layer_norm"):
        sys.exit(f"bsbert::bsr_linear_add_layer_norm unavailable: {_ext.reason_unavailable()}")
    print(table(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
