"""pytest-benchmark: bsbert's CPU block-sparse kernel vs dense torch F.linear and oneDNN.

    pytest benchmarks/test_kernels_cpu.py --benchmark-only            # small default grid
    BSBERT_BENCH_FULL=1 pytest benchmarks/test_kernels_cpu.py --benchmark-only   # full grid

Each case reports useful GFLOP/s in ``extra_info`` (ours: 2*M times the real weight entries its stored
blocks cover, see ``_real_flops``; dense: 2*M*N*K), and each case first checks its result, untimed,
against float64 F.linear on the same weight. bf16 where oneDNN has no bf16 GEMM worth the name (bsbert's
kernels widen bf16 to fp32 there, ``_ext.bf16_widened_on_cpu``): the oneDNN baseline runs in fp32, as
``bsbert.ops.cpu_kernel_report``'s does (``extra_info["onednn_dtype"]``); a dtype oneDNN lacks is skipped.
For the ratio table measured interleaved in one run, use ``python -m bsbert.ops.cpu_kernel_report``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import check_close, env_flag, run_info
from bsbert import _ext
from bsbert.formats import BlockSparseMatrix
from bsbert.ops import linear_backends
from bsbert.ops.cpu_kernel_report import block_sparse_weight
from bsbert.ops.packing import pack_cpu

try:
    FULL = env_flag("BSBERT_BENCH_FULL")
except pytest.UsageError:  # conftest's pytest_configure reports it before collection
    FULL = False

if FULL:
    SHAPES = [(1024, 1024), (4096, 1024), (1024, 4096), (768, 768), (3072, 768), (768, 3072), (70, 100),
              (140, 128)]
    DENSITIES = [1.0, 0.64, 0.5, 0.25, 0.1]
    MS = [1, 2, 3, 8, 16, 384]  # 1-3: the GEMV kernel (where it is on); 8, 16: register tiles, block-row split
    DTYPES = [torch.float32, torch.bfloat16]
else:
    SHAPES = [(1024, 1024), (4096, 1024)]
    DENSITIES = [1.0, 0.25]
    MS = [16, 384]
    DTYPES = [torch.float32]

needs_op = pytest.mark.skipif(not _ext.has_op("bsr_linear"),
                              reason=f"bsbert::bsr_linear unavailable: {_ext.reason_unavailable()}")

_cache = {}


def _setup(n, k, d, m, dtype, block=32):
    key = (n, k, d, m, dtype, block)
    if key not in _cache:
        w32 = block_sparse_weight(n, k, block, d, seed=n + k)
        bsm = BlockSparseMatrix.from_dense(w32, block, pad=True, dtype=dtype)
        _cache[key] = dict(bsm=bsm, packed=pack_cpu(bsm, dtype) if dtype in (torch.float32, torch.bfloat16)
                           else None, w=w32.to(dtype), x=torch.randn(m, k).to(dtype),
                           bias=torch.randn(n).to(dtype))
    return _cache[key]


def _reference(c) -> torch.Tensor:
    """float64 F.linear of the case's x, weight (as stored in its dtype) and bias, computed once per case."""
    if "ref" not in c:
        c["ref"] = F.linear(c["x"].double(), c["w"].double(), c["bias"].double())
    return c["ref"]


def _gflops(benchmark, flops: int) -> dict:
    # benchmark.stats is None under --benchmark-disable (each case then runs once as a test): no rate
    return {"gflops": flops / benchmark.stats.stats.min / 1e9} if benchmark.stats else {}


def _real_flops(bsm: BlockSparseMatrix, m: int) -> int:
    """FLOPs of ``x[m, K] @ W.T`` over the stored blocks, each clipped to the real (unpadded) N x K shape.
    Why not ``bsm.useful_flops(m)``: it counts every stored block as b*b, and with ``from_dense(pad=True)``
    the last block row / column of a shape that is not a multiple of b holds zero padding past N / K (70x100
    at b=32: 96x128 padded, the kernels compute the real 70 outputs only), so the padding would count as
    work and lift our GFLOP/s over the dense baselines', which count the real 2*M*N*K. Clipped, a fully
    dense weight gives exactly 2*M*N*K; on shapes that are multiples of b this equals useful_flops."""
    b, (n, k) = bsm.block, bsm.shape
    per_row = (bsm.crow_indices[1:] - bsm.crow_indices[:-1]).long()
    block_rows = torch.repeat_interleave(torch.arange(bsm.block_rows), per_row)
    rows = (n - block_rows * b).clamp(max=b)  # real rows in each stored block
    cols = (k - bsm.col_indices.long() * b).clamp(max=b)  # real columns in each stored block
    return 2 * m * int((rows * cols).sum())


def _ids(v):
    if isinstance(v, tuple):
        return f"{v[0]}x{v[1]}"
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return str(v)


params = pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
params_m = pytest.mark.parametrize("m", MS)
params_d = pytest.mark.parametrize("density", DENSITIES)
params_s = pytest.mark.parametrize("shape", SHAPES, ids=_ids)


@needs_op
@params
@params_m
@params_d
@params_s
def test_bsr_linear(benchmark, shape, density, m, dtype):
    n, k = shape
    c = _setup(n, k, density, m, dtype)
    bsm = c["bsm"]
    benchmark.group = f"{_ids(dtype)} M={m} {n}x{k} d={density}"
    flops = _real_flops(bsm, m)
    # stored_block_flops: the padded count (useful_flops), kept to show how far padding would inflate it
    benchmark.extra_info.update(useful_flops=flops, stored_block_flops=bsm.useful_flops(m),
                                block_density=bsm.stats.block_density, **run_info())
    args = (c["x"], bsm.crow_indices, bsm.col_indices, c["packed"], c["bias"], n, k, bsm.block, False)
    benchmark.extra_info["max_rel_err"] = check_close(torch.ops.bsbert.bsr_linear(*args), _reference(c), dtype,
                                                      "bsr_linear")
    benchmark(torch.ops.bsbert.bsr_linear, *args)
    benchmark.extra_info.update(_gflops(benchmark, flops))


@params
@params_m
@params_d
@params_s
def test_dense_flinear(benchmark, shape, density, m, dtype):
    n, k = shape
    c = _setup(n, k, density, m, dtype)
    benchmark.group = f"{_ids(dtype)} M={m} {n}x{k} d={density}"
    benchmark.extra_info.update(run_info())
    benchmark.extra_info["max_rel_err"] = check_close(F.linear(c["x"], c["w"], c["bias"]), _reference(c), dtype,
                                                      "F.linear")
    benchmark(F.linear, c["x"], c["w"], c["bias"])
    benchmark.extra_info.update(_gflops(benchmark, 2 * m * n * k))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN unavailable")
@params
@params_m
@params_d
@params_s
def test_dense_onednn(benchmark, shape, density, m, dtype):
    n, k = shape
    c = _setup(n, k, density, m, dtype)
    # bf16 where bsbert widens it to fp32 (AVX2, AVX-512 without a bf16 dot product): oneDNN's bf16 GEMM is
    # missing there (no primitive descriptor) or emulated, and the fp32 one is what bf16 work runs as; the
    # same baseline as bsbert.ops.cpu_kernel_report's
    dnn_dtype = torch.float32 if dtype == torch.bfloat16 and _ext.bf16_widened_on_cpu() else dtype
    why_not = linear_backends._onednn_probe(dnn_dtype)
    if why_not:
        pytest.skip(why_not)
    x, w, bias = (c[name].to(dnn_dtype) for name in ("x", "w", "bias"))
    args = (x, w.to_mkldnn(), bias, "none", [], "")
    benchmark.group = f"{_ids(dtype)} M={m} {n}x{k} d={density}"
    benchmark.extra_info.update(onednn_dtype=_ids(dnn_dtype), **run_info())
    benchmark.extra_info["max_rel_err"] = check_close(torch.ops.mkldnn._linear_pointwise(*args), _reference(c),
                                                      dnn_dtype, "oneDNN linear")
    benchmark(torch.ops.mkldnn._linear_pointwise, *args)
    benchmark.extra_info.update(_gflops(benchmark, 2 * m * n * k))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_cpu_instruction_peak(benchmark, dtype):
    """What the GFLOP/s above are fractions of: the multiply-add instruction's issue rate, every thread
    at once (bsbert.timing.cpu_peak_gflops). extra_info["gflops"]: the best of the rounds."""
    from bsbert.timing import cpu_peak_gflops

    if cpu_peak_gflops(dtype, seconds=0.01) is None:
        pytest.skip(f"no multiply-add instruction to time for {dtype} at this CPU level")
    rates = []
    benchmark.group = f"{_ids(dtype)} instruction peak"
    benchmark.pedantic(lambda: rates.append(cpu_peak_gflops(dtype, seconds=0.1)), rounds=3, iterations=1)
    best = max(rates, key=lambda r: r["gflops"])
    benchmark.extra_info.update(gflops=best["gflops"], instruction=best["instruction"], threads=best["threads"])
