"""Correctness of the CPU block-sparse GEMM ``torch.ops.bsbert.bsr_linear`` (csrc/cpu/bsr_linear*).

Every check compares against a float64 masked-dense reference computed from the very inputs the
kernel saw (bf16 inputs are rounded first), on fresh random data. No timing assertions here.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from bsbert import _ext
from bsbert.formats import BlockSparseMatrix
from bsbert.ops.cpu_reference import bsr_linear_reference
from bsbert.ops.packing import pack_cpu, unpack_cpu
from tests.helpers import BSR_ARG_ERRORS, BSR_INDEX_ERRORS, assert_arg_error, cpu_isa_levels

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

pytestmark = pytest.mark.skipif(not _ext.has_op("bsr_linear"),
                                reason=f"bsbert._C / bsr_linear unavailable: {_ext.reason_unavailable()}")

if _ext.available():
    import bsbert.ops.fake  # noqa: F401  (registers the fake kernel used by opcheck)

FP32_TOL = 1e-5
BF16_TOL = 1e-2


ISAS = cpu_isa_levels(bf16_level=True)


def make_bsm(n, k, block, density, *, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    nb = (-(-n // block), -(-k // block))
    keep = torch.rand(nb, generator=g) < density
    mask = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    w = (w * mask).to(dtype)
    return w, BlockSparseMatrix.from_dense(w, block, pad=True)


def ref64(x, w, bias, gelu):
    y = x.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    if gelu:
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    return y


def run_op(x, bsm, bias=None, gelu=False, packed=None):
    packed = pack_cpu(bsm, x.dtype) if packed is None else packed
    n, k = bsm.shape
    return torch.ops.bsbert.bsr_linear(x, bsm.crow_indices, bsm.col_indices, packed, bias, n, k,
                                       bsm.block, gelu)


def check(y, ref, dtype, x_shape, n):
    assert y.dtype == dtype
    assert tuple(y.shape) == (*x_shape[:-1], n)
    assert y.is_contiguous()
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    err = float((y.double() - ref).abs().max()) if ref.numel() else 0.0
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert err <= tol * scale, f"max abs err {err:.3g} > {tol} * {scale:.3g}"


def case(m, n, k, block, density, dtype, bias, gelu, seed=0, x_shape=None):
    w, bsm = make_bsm(n, k, block, density, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*(x_shape or (m, k)), generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    y = run_op(x, bsm, b, gelu)
    check(y, ref64(x, w, b, gelu), dtype, x.shape, n)
    return y


# ---- basic grid ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("bias,gelu", [(False, False), (True, False), (True, True), (False, True)])
def test_grid(dtype, block, density, bias, gelu):
    case(37, 2 * block + 8, 3 * block - 5, block, density, dtype, bias, gelu, seed=block)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 6, 7, 13, 96, 200])
def test_each_isa(monkeypatch, isa, dtype, m):
    monkeypatch.setenv("BSBERT_CPU_ISA", isa)
    assert _ext.load(warn=False).cpu_isa().startswith(isa)
    for block in (16, 32, 64):
        case(m, 150, 140, block, 0.6, dtype, True, True, seed=m + block)


@pytest.mark.parametrize("isa", ISAS)
def test_isas_agree(monkeypatch, isa):
    w, bsm = make_bsm(256, 320, 32, 0.5, seed=3)
    x = torch.randn(50, 320)
    b = torch.randn(256)
    monkeypatch.setenv("BSBERT_CPU_ISA", "portable")
    y0 = run_op(x, bsm, b, True)
    monkeypatch.setenv("BSBERT_CPU_ISA", isa)
    y1 = run_op(x, bsm, b, True)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)


def test_bert_shapes_fp32():
    for (n, k) in [(768, 768), (3072, 768), (768, 3072)]:
        case(64, n, k, 32, 0.4, torch.float32, True, n == 3072, seed=n + k)


@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("n,k", [(70, 70), (100, 140), (140, 100), (1, 1), (33, 17)])
def test_small_and_tails(m, n, k):
    for block in (16, 32):
        case(m, n, k, block, 0.7, torch.float32, True, True, seed=m * 7 + n)
        case(m, n, k, block, 0.7, torch.bfloat16, True, False, seed=m * 7 + k)


def test_all_zero_matrix_gives_bias():
    w = torch.zeros(96, 64)
    bsm = BlockSparseMatrix.from_dense(w, 32)
    assert bsm.nnz_blocks == 0
    x = torch.randn(9, 64)
    b = torch.randn(96)
    torch.testing.assert_close(run_op(x, bsm, b), b.expand(9, 96).contiguous(), rtol=0, atol=0)
    torch.testing.assert_close(run_op(x, bsm, None), torch.zeros(9, 96), rtol=0, atol=0)
    g = run_op(x, bsm, b, gelu=True)
    torch.testing.assert_close(g, torch.nn.functional.gelu(b).expand(9, 96), rtol=1e-6, atol=1e-6)


def test_fully_dense_matches_linear():
    w, bsm = make_bsm(192, 256, 64, 1.0, seed=5)
    assert bsm.stats.block_density == 1.0
    x = torch.randn(31, 256)
    b = torch.randn(192)
    torch.testing.assert_close(run_op(x, bsm, b), torch.nn.functional.linear(x, w, b),
                               rtol=1e-4, atol=1e-4)


def test_gelu_extremes():
    # large |v| (erf saturates) and values around 0, through an identity weight
    w = torch.eye(64)
    bsm = BlockSparseMatrix.from_dense(w, 32)
    x = torch.linspace(-12, 12, 64 * 8).reshape(8, 64)
    x[0, :5] = torch.tensor([0.0, -0.0, 1e-8, -1e-8, 3e-4])
    y = run_op(x, bsm, None, gelu=True)
    ref = ref64(x, w, None, True)
    assert float((y.double() - ref).abs().max()) <= 2e-6


def test_non_contiguous_and_3d_x():
    w, bsm = make_bsm(96, 80, 16, 0.5, seed=9)
    b = torch.randn(96)
    base = torch.randn(4, 7, 200)
    x = base[:, :, 10:90]  # last dim contiguous, row stride 200
    y = run_op(x, bsm, b, True)
    check(y, ref64(x, w, b, True), torch.float32, x.shape, 96)
    xt = torch.randn(80, 21).T  # fully transposed
    y = run_op(xt, bsm, b)
    check(y, ref64(xt, w, b, False), torch.float32, xt.shape, 96)
    x3 = torch.randn(2, 3, 5, 80)[:, :, ::2]  # strided leading dims
    y = run_op(x3, bsm, None)
    check(y, ref64(x3, w, None, False), torch.float32, x3.shape, 96)
    x1 = torch.randn(80)  # 1-D x
    y = run_op(x1, bsm, b)
    check(y, ref64(x1, w, b, False), torch.float32, x1.shape, 96)


def test_empty_inputs():
    w, bsm = make_bsm(64, 48, 16, 0.5)
    y = run_op(torch.randn(0, 48), bsm, torch.randn(64))
    assert y.shape == (0, 64)
    y = run_op(torch.randn(2, 0, 48), bsm, None)
    assert y.shape == (2, 0, 64)
    # K = 0 (every input feature pruned away): x @ W^T is empty, the bias remains
    w, bsm = make_bsm(64, 0, 16, 0.5)
    b = torch.randn(64)
    y = run_op(torch.randn(3, 5, 0), bsm, b)
    assert y.shape == (3, 5, 64) and torch.equal(y, b.expand(3, 5, 64))


def _check_reads_only_k(k, dtype, rows, seed):
    # x is a view into rows whose tail (beyond K) holds NaN: no ISA path may ever read it
    w, bsm = make_bsm(64, k, 32, 1.0, seed=seed, dtype=dtype)
    base = torch.full((rows, 64), float("nan"), dtype=dtype)
    base[:, :k] = torch.randn(rows, k).to(dtype)
    x = base[:, :k]
    for isa in ISAS:
        os.environ["BSBERT_CPU_ISA"] = isa
        try:
            y = run_op(x, bsm, None)
        finally:
            del os.environ["BSBERT_CPU_ISA"]
        assert torch.isfinite(y).all(), isa
        check(y, ref64(x, w, None, False), dtype, x.shape, 64)


def test_reads_only_k_columns():
    _check_reads_only_k(40, torch.float32, 5, seed=2)  # K=40: the second block column is partial


@pytest.mark.parametrize("k", [39, 40])
def test_reads_only_k_columns_bf16(k):
    # bf16 packs x as 32-bit k-pairs on avx512_bf16: with odd K the last pair must not read column K
    _check_reads_only_k(k, torch.bfloat16, 13, seed=4)


def test_thread_count_does_not_change_result():
    w, bsm = make_bsm(256, 256, 32, 0.5, seed=4)
    x = torch.randn(77, 256)
    b = torch.randn(256)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = run_op(x, bsm, b, True)
        torch.set_num_threads(max(2, old))
        y2 = run_op(x, bsm, b, True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)  # every output is computed by one task: bitwise deterministic


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("env", [{}, {"BSBERT_BSR_MC": "24"}, {"BSBERT_BSR_ORDER": "m"}])
def test_parallel_packing_per_m_tile(monkeypatch, dtype, env):
    # x large enough to be packed by the workers, one M tile at a time (partial last tile, several
    # tiles per worker, more workers than cores): same result as one thread and as the reference.
    # (The block-row split: at this M the row split would be chosen, see test_row_and_block_row_splits_agree.)
    monkeypatch.setenv("BSBERT_BSR_SPLIT", "blocks")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    w, bsm = make_bsm(200, 517, 32, 0.6, seed=11, dtype=dtype)
    x = torch.randn(301, 517).to(dtype)
    b = torch.randn(200).to(dtype)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = run_op(x, bsm, b, True)
        torch.set_num_threads(4)
        y4 = run_op(x, bsm, b, True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y4)
    check(y4, ref64(x, w, b, True), dtype, x.shape, 200)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 23, 24, 47, 48, 64, 97, 128, 385])
@pytest.mark.parametrize("n", [160, 150])
def test_row_and_block_row_splits_agree(monkeypatch, threads, dtype, m, n):
    # the row split (whole rows per thread, from 2 register tiles per thread up; its rows in near-equal
    # register-tile panels, or in panels of mr rows with BSBERT_BSR_PANELS=aligned) and the block-row
    # split (BSBERT_BSR_SPLIT=blocks) compute every output with the same kernel over the same blocks:
    # equal bits. n = 150: the last block row is partial (the scratch epilogue path).
    w, bsm = make_bsm(n, 300, 32, 0.5, seed=m, dtype=dtype)
    x = torch.randn(m, 300).to(dtype)
    b = torch.randn(n).to(dtype)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y_rows = run_op(x, bsm, b, True)
        monkeypatch.setenv("BSBERT_BSR_PANELS", "aligned")
        y_aligned = run_op(x, bsm, b, True)
        monkeypatch.setenv("BSBERT_BSR_SPLIT", "blocks")
        y_blocks = run_op(x, bsm, b, True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y_rows, y_aligned)
    assert torch.equal(y_rows, y_blocks)
    check(y_rows, ref64(x, w, b, True), dtype, x.shape, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 32, 64])
def test_weight_group_size_does_not_change_a_bit(monkeypatch, dtype, block):
    # the K blocking (BSBERT_BSR_KC k values per weight group; defaults 256 fp32, 1024 bf16) only
    # changes where partial sums wait between groups (fp32, exact): the same bits for any group size,
    # including groups of one block and a whole block row in one group
    n, k = 3 * block + 8, 40 * block - 5
    w, bsm = make_bsm(n, k, block, 0.8, seed=block, dtype=dtype)
    x = torch.randn(50, k).to(dtype)
    b = torch.randn(n).to(dtype)
    outs = []
    for kc in (None, block, 2 * block, 256, 1024, 64 * block):
        if kc is None:
            monkeypatch.delenv("BSBERT_BSR_KC", raising=False)
        else:
            monkeypatch.setenv("BSBERT_BSR_KC", str(kc))
        outs.append(run_op(x, bsm, b, True))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    check(outs[0], ref64(x, w, b, True), dtype, x.shape, n)


def test_matches_reference_module():
    w, bsm = make_bsm(130, 70, 32, 0.5, seed=8)
    x = torch.randn(3, 11, 70)
    b = torch.randn(130)
    torch.testing.assert_close(run_op(x, bsm, b, True), bsr_linear_reference(x, bsm, b, True),
                               rtol=1e-5, atol=1e-5)
    check(bsr_linear_reference(x.double(), bsm, b.double(), True), ref64(x, w, b, True),
          torch.float64, x.shape, 130)


# ---- packing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 32, 64])
def test_pack_layout_round_trip(dtype, block):
    _, bsm = make_bsm(2 * block, 3 * block, block, 0.7, seed=block, dtype=dtype)
    p = pack_cpu(bsm, dtype)
    assert p.dtype == dtype and p.is_contiguous() and p.numel() == bsm.values.numel()
    torch.testing.assert_close(unpack_cpu(p, block), bsm.values, rtol=0, atol=0)
    if bsm.nnz_blocks:
        v = bsm.values[0]
        if dtype == torch.float32:
            assert p[0, 3, 5] == v[5, 3]  # [k][n]
        else:
            assert p[0, 1, 5, 1] == v[5, 3]  # [k/2][n][k%2]


def test_pack_rejects_float16():
    _, bsm = make_bsm(32, 32, 16, 1.0)
    with pytest.raises(ValueError, match="float16"):
        pack_cpu(bsm, torch.float16)


# ---- errors ----------------------------------------------------------------------------------------
def _args(n=64, k=48, block=16, dtype=torch.float32):
    _, bsm = make_bsm(n, k, block, 0.6)
    assert bsm.nnz_blocks >= 2  # the shared cases (tests/helpers.py) replace stored entries
    return [torch.randn(5, k).to(dtype), bsm.crow_indices, bsm.col_indices, pack_cpu(bsm, dtype),
            None, n, k, block, False]


def _raises(args, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        torch.ops.bsbert.bsr_linear(*args)


_OWN_ERRORS = [  # the CPU op's own words, where the Triton op (fp16 too, unpacked values) differs
    pytest.param(0, lambda a: a[0].half(), "float16", id="x-float16"),
    pytest.param(0, lambda a: a[0].double(), "float32 or bfloat16", id="x-float64"),
    pytest.param(0, lambda a: a[0].bfloat16(), "packed_values dtype", id="x-bf16-packed-fp32"),
    pytest.param(7, lambda a: 8, "block must be 16, 32 or 64, got 8", id="block-8"),
    pytest.param(3, lambda a: a[3][:-1], "packed_values must hold nnz_blocks", id="packed-short"),
    pytest.param(4, lambda a: torch.randn(63), r"bias must have shape \[64\], got \[63\]", id="bias-shape"),
    pytest.param(4, lambda a: torch.ones(64, dtype=torch.int32), "bias must be floating point", id="bias-int32"),
]


@pytest.mark.parametrize("index,replace,match", BSR_ARG_ERRORS + BSR_INDEX_ERRORS + _OWN_ERRORS)
def test_errors(index, replace, match):
    assert_arg_error(torch.ops.bsbert.bsr_linear, _args(), index, replace, match, (RuntimeError, ValueError))


def test_wrong_device():
    a = _args()
    a[3] = a[3].to("meta")
    _raises(a, "device|meta|CPU|cpu")
    if torch.cuda.is_available():
        a = _args()
        a[1] = a[1].cuda()
        _raises(a, "device|cuda|CPU|cpu")


# ---- opcheck ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,gelu", [(False, False), (True, True)])
def test_opcheck(dtype, bias, gelu):
    _, bsm = make_bsm(70, 50, 16, 0.6, dtype=dtype)
    x = torch.randn(2, 3, 50).to(dtype)
    b = torch.randn(70).to(dtype) if bias else None
    args = (x, bsm.crow_indices, bsm.col_indices, pack_cpu(bsm, dtype), b, 70, 50, 16, gelu)
    torch.library.opcheck(torch.ops.bsbert.bsr_linear.default, args)


# ---- property tests --------------------------------------------------------------------------------
if given is not None:

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(m=st.integers(1, 40), n=st.integers(1, 150), k=st.integers(1, 150),
           block=st.sampled_from([16, 32, 64]), density=st.floats(0.0, 1.0),
           bias=st.booleans(), gelu=st.booleans(),
           dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16),
           isa=st.sampled_from(ISAS))
    def test_property(m, n, k, block, density, bias, gelu, dtype, seed, isa):
        os.environ["BSBERT_CPU_ISA"] = isa
        try:
            case(m, n, k, block, density, dtype, bias, gelu, seed=seed)
        finally:
            del os.environ["BSBERT_CPU_ISA"]


def test_single_openmp_runtime():
    """The extension is built with -fopenmp (else at::parallel_for runs serially); its libgomp
    dependency must resolve to the runtime torch already loaded, never a second copy. Read in a fresh
    process that imports only torch and bsbert: other packages the test session imported may bring
    their own (scikit-learn's wheel carries a libgomp, seen with transformers 5.17)."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    code = ("import torch, bsbert, bsbert._ext as e\n"
            "assert e.available(), e.reason_unavailable()\n"
            "print('\\n'.join(sorted({l.split()[-1] for l in open('/proc/self/maps')\n"
            "                           if 'gomp' in l or 'libomp' in l or 'iomp' in l})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    libs = [line for line in out.stdout.splitlines() if line]
    assert len(libs) <= 1, f"more than one OpenMP runtime loaded: {sorted(libs)}"


@pytest.mark.parametrize("bias_kind", ["strided", "float64", "bfloat16-x-float32-bias", "bfloat16"])
def test_bias_layouts_and_dtypes(bias_kind):
    # the bias is copied (widened) into a padded fp32 buffer per call: every layout / dtype path of that
    # copy gives the reference (N = 150: the last block row is partial, its padding must be zero)
    dtype = torch.bfloat16 if bias_kind.startswith("bfloat16") else torch.float32
    w, bsm = make_bsm(150, 70, 32, 0.6, seed=21, dtype=dtype)
    x = torch.randn(33, 70).to(dtype)
    b = {"strided": torch.randn(300)[::2], "float64": torch.randn(150, dtype=torch.float64),
         "bfloat16-x-float32-bias": torch.randn(150), "bfloat16": torch.randn(150).bfloat16()}[bias_kind]
    y = run_op(x, bsm, b, True)
    check(y, ref64(x, w, b, True), dtype, x.shape, 150)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [64, 40])  # 40: a 16-lane vector and an 8-column tail in the last block row
@pytest.mark.parametrize("stored", [False, True])  # no blocks (epilogue path) / a stored zero block (tile path)
def test_bf16_output_rounding(monkeypatch, isa, n, stored):
    # y = x @ 0 + bias in bf16: every path returns the bias bit for bit for normal values; NaN stays NaN;
    # a denormal bias is either kept or flushed to zero (the AVX512-BF16 path's vcvtneps2bf16 flushes,
    # as its dot products do), never anything else
    monkeypatch.setenv("BSBERT_CPU_ISA", isa)
    nbr = (n + 31) // 32
    if stored:  # one stored all-zero block per block row, so the register-tile epilogue runs
        crow = torch.arange(nbr + 1, dtype=torch.int32)
        bsm = BlockSparseMatrix((n, 64), 32, crow, torch.zeros(nbr, dtype=torch.int32),
                                torch.zeros(nbr, 32, 32, dtype=torch.bfloat16))
    else:
        bsm = BlockSparseMatrix.from_dense(torch.zeros(n, 64), 32, pad=True, dtype=torch.bfloat16)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)).bfloat16()
    special = torch.tensor([float("nan"), -float("nan"), 1e-39, -3e-39]).bfloat16()
    bias[[1, n - 2, 2, n - 1]] = special  # in the first vector and in the tail
    y = run_op(torch.randn(5, 64).bfloat16(), bsm, bias)
    normal = torch.ones(n, dtype=torch.bool)
    normal[[1, n - 2, 2, n - 1]] = False
    assert torch.equal(y[:, normal], bias[normal].expand(5, -1))
    assert y[:, [1, n - 2]].isnan().all()
    for j in (2, n - 1):
        assert torch.equal(y[:, j], bias[j].expand(5)) or bool((y[:, j] == 0).all())
