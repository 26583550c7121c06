"""bsbert.triton.bsr_linear against float64 references.

Runs on the GPU when there is one, else on CPU tensors through the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported). Shapes are small: the interpreter is slow.

Error criterion (see ``_assert_close``): measured against a float64 reference computed from the same
(rounded) inputs, the kernel's error may be at most twice the error of the same computation done by
PyTorch in the same dtype, plus a tiny floor: normwise (stable) and elementwise max (the max floor is
half an ulp of the largest output, i.e. one correct final rounding).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import bsbert.triton as bt  # noqa: E402
from bsbert.formats import BlockSparseMatrix  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if bt.not_supported_reasons(DEVICE, torch.float32):
    pytest.skip(f"triton kernels unusable here: {bt.not_supported_reasons(DEVICE, torch.float32)}",
                allow_module_level=True)

from bsbert.triton.bsr_linear import bsr_linear_triton  # noqa: E402
from tests.helpers import BSR_ARG_ERRORS, BSR_INDEX_ERRORS, assert_arg_error, huge_storage  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _assert_close(out, ref64, torch_out, factor=2.0, fp32_bound=None):
    """fp16/bf16: at most ``factor`` x PyTorch's error in the same dtype (normwise and max), plus half an
    ulp. fp32: within ``fp32_bound`` elementwise when given (the rigorous error bound of a length-K dot
    product, which any correct summation order meets). On an H200 the fp32 kernel's error was 2-3x
    cuBLAS's (1.2e-6 vs 5e-7 at K <= 185): cuBLAS's accumulation order is just better, so "2x torch"
    measures cuBLAS, not correctness, in fp32. A wrong index still fails by orders of magnitude."""
    assert out.shape == ref64.shape and out.dtype == torch_out.dtype
    assert torch.isfinite(out).all()
    if out.dtype == torch.float32 and fp32_bound is not None:
        err = (out.double() - ref64).abs()
        worst = (err - fp32_bound).max().item() if out.numel() else -1.0
        assert worst <= 0, f"fp32 error exceeds the dot-product bound by {worst:.3e}"
        return
    out64, t64 = out.double(), torch_out.double()
    eps = torch.finfo(out.dtype).eps
    ref_norm = ref64.norm().item()
    err, terr = (out64 - ref64).norm().item(), (t64 - ref64).norm().item()
    assert err <= factor * terr + 1e-6 * eps * ref_norm + 1e-30, (
        f"normwise error {err:.3e} > {factor} x torch's {terr:.3e}")
    emax = (out64 - ref64).abs().max().item() if out.numel() else 0.0
    tmax = (t64 - ref64).abs().max().item() if out.numel() else 0.0
    amax = ref64.abs().max().item() if out.numel() else 0.0
    assert emax <= factor * tmax + 0.5 * eps * amax + 1e-30, (
        f"max error {emax:.3e} > {factor} x torch's {tmax:.3e} + half ulp of max |y| {amax:.3e}")


def _block_mask(n, k, b, density, gen, empty_rows=(), dense_rows=()):
    nb, kb = math.ceil(n / b), math.ceil(k / b)
    keep = torch.rand(nb, kb, generator=gen) < density
    for r in empty_rows:
        keep[r] = False
    for r in dense_rows:
        keep[r] = True
    return keep.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k]


def _make(n, k, b, dtype, density=0.5, seed=0, empty_rows=(), dense_rows=(), wdtype=None):
    """(bsm, w, gen): the matrix under test and the dense weight it was built from, rounded to the
    stored dtype as the matrix stores it -- references are built from ``w``, never from ``bsm``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) / math.sqrt(max(k, 1))
    w = w * _block_mask(n, k, b, density, gen, empty_rows, dense_rows)
    bsm = BlockSparseMatrix.from_dense(w, b, pad=True, dtype=wdtype or dtype).to(DEVICE)
    return bsm, w.to(wdtype or dtype).to(DEVICE), gen


def _check(x, bsm, w, bias, gelu, **kw):
    """Run the kernel; compare with fp64 and with PyTorch in x.dtype on the same rounded inputs
    (``w``: the dense weight ``bsm`` was built from; the kernel converts weight blocks to x.dtype)."""
    y = bsr_linear_triton(x, bsm, bias, gelu=gelu, **kw)
    w = w.to(x.dtype)
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    tor = F.linear(x, w, bias)
    if gelu:
        ref, tor = F.gelu(ref), F.gelu(tor)
    _assert_close(y, ref, tor, fp32_bound=_fp32_bound(x, w, bias, ref) if x.dtype == torch.float32 else None)
    return y


def _fp32_bound(x, w, bias, ref64):
    """|fl(x @ w.T + b) - exact| <= gamma_(K+1) * (|x| @ |w|.T + |b|), gamma_n = n*u / (1 - n*u), u = 2^-24,
    for any summation order (Higham, Accuracy and Stability, 3.1); plus one rounding of the output and,
    for GELU (|GELU'| < 1.13), its own few-ulp error."""
    u = 2.0 ** -24
    k = x.shape[-1]
    g = (k + 1) * u / (1 - (k + 1) * u)
    mag = x.double().abs() @ w.double().abs().T
    if bias is not None:
        mag = mag + bias.double().abs()
    return 1.13 * g * mag + 4 * u * ref64.abs() + 1e-30


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, block, has_bias, gelu):
    n, k, m = 2 * block + 5, 3 * block - 7, 37  # N, K not multiples of the block; odd M
    bsm, w, gen = _make(n, k, block, dtype, density=0.6, seed=block + 7 * has_bias + 3 * gelu,
                        empty_rows=(1,), dense_rows=(0,))
    assert bsm.stats.empty_block_rows >= 1
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype) if has_bias else None
    y = _check(x, bsm, w, bias, gelu)
    # the empty block row writes exactly bias (+GELU), or zeros
    rows = slice(block, 2 * block)
    expect = torch.zeros_like(y[:, rows]) if bias is None else bias[rows].expand(m, -1)
    if gelu:
        expect = F.gelu(expect.double()).to(dtype)
    torch.testing.assert_close(y[:, rows].double(), expect.double(), atol=0, rtol=0.02)


@pytest.mark.parametrize("m", [1, 2, 33, 70])
def test_any_m(m):
    bsm, w, gen = _make(48, 80, 16, torch.float32, density=0.5, seed=m)
    x = torch.randn(m, 80, generator=gen).to(DEVICE)
    _check(x, bsm, w, torch.randn(48, generator=gen).to(DEVICE), gelu=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [161, 200, 256])
def test_several_m_groups(m, dtype):
    """More M tiles than one launch group (interpreter: BLOCK_M 32, GROUP_M 4 -> 6, 7, 8 tiles: a
    partial last group of 2 or 3 tiles, and two full groups), so the grouped launch order must still
    reach every (M tile, block row) exactly once. On a GPU (BLOCK_M up to 64, GROUP_M 8) these are
    one group; the CUDA-sized cases live in the benchmarks."""
    bsm, w, gen = _make(96, 64, 16, dtype, density=0.6, seed=m, empty_rows=(2,))
    x = torch.randn(m, 64, generator=gen).to(DEVICE, dtype)
    _check(x, bsm, w, torch.randn(96, generator=gen).to(DEVICE, dtype), gelu=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_m_one(dtype):
    bsm, w, gen = _make(64, 48, 16, dtype, density=0.6, seed=21)
    x = torch.randn(1, 48, generator=gen).to(DEVICE, dtype)
    _check(x, bsm, w, torch.randn(64, generator=gen).to(DEVICE, dtype), gelu=False)


def test_m_zero():
    bsm, _, _ = _make(32, 32, 16, torch.float32)
    y = bsr_linear_triton(torch.empty(0, 32, device=DEVICE), bsm)
    assert y.shape == (0, 32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_zero_matrix(dtype):
    w = torch.zeros(40, 24)
    bsm = BlockSparseMatrix.from_dense(w, 16, pad=True, dtype=dtype).to(DEVICE)
    assert bsm.nnz_blocks == 0
    x = torch.randn(5, 24).to(DEVICE, dtype)
    assert bsr_linear_triton(x, bsm).abs().max().item() == 0
    bias = torch.randn(40).to(DEVICE, dtype)
    torch.testing.assert_close(bsr_linear_triton(x, bsm, bias), bias.expand(5, -1), atol=0, rtol=0)
    y = bsr_linear_triton(x, bsm, bias, gelu=True)
    torch.testing.assert_close(y.double(), F.gelu(bias.double()).expand(5, -1), atol=0, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fully_dense(dtype):
    bsm, w, gen = _make(64, 96, 32, dtype, density=1.0, seed=3)
    assert bsm.stats.block_density == 1.0
    x = torch.randn(19, 96, generator=gen).to(DEVICE, dtype)
    _check(x, bsm, w, torch.randn(64, generator=gen).to(DEVICE, dtype), gelu=True)


def test_leading_dims_and_strided_x():
    bsm, w, gen = _make(32, 48, 16, torch.float32, density=0.7, seed=5)
    big = torch.randn(2, 3, 96, generator=gen).to(DEVICE)
    x = big[..., ::2]  # non-contiguous last dim, 3-D
    y = _check(x, bsm, w, None, gelu=False)
    assert y.shape == (2, 3, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_x(dtype):
    """Row stride != K (every other row of a wider tensor) and column-major x (stride_xk = M)."""
    bsm, w, gen = _make(48, 40, 16, dtype, density=0.6, seed=6)
    big = torch.randn(2 * 37, 40 + 8, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(48, generator=gen).to(DEVICE, dtype)
    for x in (big[::2, 3:43], big[:37, :40].t().contiguous().t()):
        assert not x.is_contiguous()
        _check(x, bsm, w, bias, gelu=False)


def test_weight_in_other_dtype():
    """fp32-stored weight blocks are converted on load to the activation dtype."""
    bsm, w, gen = _make(40, 40, 16, torch.bfloat16, density=0.6, seed=9, wdtype=torch.float32)
    x = torch.randn(9, 40, generator=gen).to(DEVICE, torch.bfloat16)
    y = bsr_linear_triton(x, bsm)
    w = w.to(torch.bfloat16)  # stored in fp32, converted to x's dtype on load
    _assert_close(y, F.linear(x.double(), w.double()), F.linear(x, w))
    # bit for bit (up to the summation order) what the GPU computes from the rounded weights: the interpreter
    # path used the fp32 weights unrounded, and ~45% of the outputs differed from it
    same = (y == F.linear(x.float(), w.float()).to(torch.bfloat16)).float().mean().item()
    assert same > 0.9, f"only {same:.0%} of the outputs are what the rounded weights give"


def test_allow_tf32_flag_runs():
    bsm, w, gen = _make(32, 32, 32, torch.float32, density=1.0, seed=2)
    x = torch.randn(4, 32, generator=gen).to(DEVICE)
    y = bsr_linear_triton(x, bsm, allow_tf32=True)
    ref = F.linear(x.double(), w.double())
    # tf32 keeps 10 mantissa bits: allow its error (exact under the interpreter)
    torch.testing.assert_close(y.double(), ref, atol=1e-2, rtol=1e-2)


def test_registered_op_and_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    bsm, _, gen = _make(48, 40, 16, torch.float32, density=0.5, seed=11)
    x = torch.randn(6, 40, generator=gen).to(DEVICE)
    bias = torch.randn(48, generator=gen).to(DEVICE)
    op = torch.ops.bsbert.triton_bsr_linear
    y = op(x, bsm.crow_indices, bsm.col_indices, bsm.values, bias, 48, 40, True, False)
    torch.testing.assert_close(y, bsr_linear_triton(x, bsm, bias, gelu=True))
    x3 = x.reshape(2, 3, 40)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fx = mode.from_tensor(x3)
        args = [mode.from_tensor(t) for t in (bsm.crow_indices, bsm.col_indices, bsm.values, bias)]
        fy = op(fx, *args, 48, 40, False, False)
        assert fy.shape == (2, 3, 48) and fy.dtype == x.dtype


def test_opcheck():
    bsm, _, gen = _make(32, 32, 16, torch.float32, density=0.5, seed=12)
    x = torch.randn(3, 32, generator=gen).to(DEVICE)
    torch.library.opcheck(
        torch.ops.bsbert.triton_bsr_linear.default,
        (x, bsm.crow_indices, bsm.col_indices, bsm.values, None, 32, 32, False, False),
        test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs():
    bsm, _, _ = _make(32, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="in_features"):
        bsr_linear_triton(torch.randn(2, 31, device=DEVICE), bsm)
    with pytest.raises(ValueError, match="bias"):
        bsr_linear_triton(torch.randn(2, 32, device=DEVICE), bsm, torch.zeros(31, device=DEVICE))


# ---- raw op errors: the CPU op's checks in its words (the shared cases in tests/helpers.py) ------
def _args(n=64, k=48, block=16):
    bsm, _, _ = _make(n, k, block, torch.float32, density=0.6, seed=31)
    assert bsm.nnz_blocks >= 2 and bsm.block_rows >= 3
    return [torch.randn(5, k, device=DEVICE), bsm.crow_indices.clone(), bsm.col_indices.clone(),
            bsm.values, None, n, k, False, False]


def _raises(args, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.bsbert.triton_bsr_linear(*args)


_OWN_ERRORS = [  # the Triton op's own words, where the CPU op (packed values, fp32/bf16 only) differs
    pytest.param(0, lambda a: a[0].double(), r"x dtype torch.float64 is not supported", id="x-float64"),
    pytest.param(3, lambda a: a[3][:, :8, :8].contiguous(), "block must be 16, 32 or 64, got 8", id="block-8"),
    pytest.param(3, lambda a: a[3][:, :, :8], r"values must be \[nnz_blocks, block, block\]", id="values-shape"),
    pytest.param(3, lambda a: a[3].double(), "values dtype torch.float64", id="values-float64"),
    # fewer blocks than col_indices entries: the kernel read past values
    pytest.param(3, lambda a: a[3][:-1], "values must hold nnz_blocks", id="values-short"),
    pytest.param(4, lambda a: torch.randn(63, device=DEVICE), r"bias must have shape \[64\], got \(63,\)",
                 id="bias-shape"),
    pytest.param(4, lambda a: torch.ones(64, dtype=torch.int32, device=DEVICE), "bias dtype torch.int32",
                 id="bias-int32"),
]


@pytest.mark.parametrize("index,replace,match", BSR_ARG_ERRORS + _OWN_ERRORS)
def test_errors(index, replace, match):
    assert_arg_error(torch.ops.bsbert.triton_bsr_linear, _args(), index, replace, match)


def test_wrong_device():
    """A meta argument dispatches to the fake kernel: it refuses too (no unwritten output)."""
    for i, name in ((1, "crow_indices"), (2, "col_indices"), (3, "values"), (4, "bias")):
        a = _args()
        a[i] = (a[i] if a[i] is not None else torch.zeros(64, device=DEVICE)).to("meta")
        _raises(a, f"{name} is on meta but x is on")


@pytest.mark.skipif(DEVICE != "cpu", reason="index values are checked where they are free: on the CPU")
@pytest.mark.parametrize("index,replace,match", BSR_INDEX_ERRORS)
def test_corrupt_indices(index, replace, match):
    """Indices that used to give garbage (values ~1e29, inf, plausible junk) or read out of bounds."""
    assert_arg_error(torch.ops.bsbert.triton_bsr_linear, _args(), index, replace, match)


def test_unsorted_columns_accepted():
    """A block row's blocks in any order: the kernel, like the CPU op, does not need them sorted (only
    BlockSparseMatrix keeps them sorted), so the index check does not ask for it; the same result."""
    bsm, w, gen = _make(48, 64, 16, torch.float32, density=1.0, seed=33)
    x = torch.randn(5, 64, generator=gen).to(DEVICE)
    crow = bsm.crow_indices.tolist()
    perm = torch.cat([torch.arange(s, e).flip(0) for s, e in zip(crow[:-1], crow[1:])]).to(DEVICE)
    assert not torch.equal(perm, torch.arange(perm.numel(), device=DEVICE))
    y = torch.ops.bsbert.triton_bsr_linear(x, bsm.crow_indices, bsm.col_indices[perm].contiguous(),
                                           bsm.values[perm].contiguous(), None, 48, 64, False, False)
    ref = F.linear(x.double(), w.double())
    _assert_close(y, ref, F.linear(x, w), fp32_bound=_fp32_bound(x, w, None, ref))


def test_strided_indices_and_k_zero():
    """Non-contiguous crow/col views (the kernel indexes them as dense arrays) give the same result;
    in_features = 0 gives bias (no block can be stored)."""
    bsm, w, gen = _make(64, 48, 16, torch.float32, density=0.6, seed=32)
    x = torch.randn(7, 48, generator=gen).to(DEVICE)
    crow = torch.stack([bsm.crow_indices, bsm.crow_indices * 0 - 7], 1).reshape(-1)[::2]
    col = torch.stack([bsm.col_indices, bsm.col_indices * 0 + 99], 1).reshape(-1)[::2]
    assert not crow.is_contiguous() and not col.is_contiguous()
    y = torch.ops.bsbert.triton_bsr_linear(x, crow, col, bsm.values, None, 64, 48, False, False)
    ref = F.linear(x.double(), w.double())
    _assert_close(y, ref, F.linear(x, w), fp32_bound=_fp32_bound(x, w, None, ref))
    bias = torch.randn(32, generator=gen).to(DEVICE)
    y = torch.ops.bsbert.triton_bsr_linear(
        torch.randn(3, 0, device=DEVICE), torch.zeros(3, dtype=torch.int32, device=DEVICE),
        torch.zeros(0, dtype=torch.int32, device=DEVICE), torch.zeros(0, 16, 16, device=DEVICE), bias,
        32, 0, False, False)
    torch.testing.assert_close(y, bias.expand(3, -1), atol=0, rtol=0)


def test_not_supported_reasons():
    assert bt.available()
    assert bt.not_supported_reasons(DEVICE, torch.float16, block=32, head_dim=64) == []
    r = bt.not_supported_reasons(DEVICE, torch.float32, block=48, head_dim=80)
    assert "block 48 not in (16, 32, 64)" in r
    assert "head_dim 80 not in (32, 64)" in r
    assert any("int64" in s for s in bt.not_supported_reasons(DEVICE, torch.int64))


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter probe applies on CPU only")
def test_interpreter_probe_reason(monkeypatch):
    """On CPU the interpreter is probed once (a loop bounded by a loaded value: triton 3.6's interpreter
    fails it with numpy >= 2.4); here it passes, and a failed probe becomes the backend's reason."""
    assert bt._interpreter_problem() is None
    monkeypatch.setitem(bt._state, "interpreter", "triton 3.6.0's interpreter fails with numpy 2.4.6 (...)")
    assert bt.not_supported_reasons("cpu", torch.float32) == [bt._state["interpreter"]]


@pytest.mark.parametrize("block", [16, 32, 64])
def test_random_shapes(block):
    """A few random shapes / densities per block size (fixed seeds; hypothesis is too slow here)."""
    gen = torch.Generator().manual_seed(100 + block)
    for trial in range(3):
        n = int(torch.randint(1, 3 * block, (1,), generator=gen))
        k = int(torch.randint(1, 3 * block, (1,), generator=gen))
        m = int(torch.randint(1, 50, (1,), generator=gen))
        density = float(torch.rand(1, generator=gen))
        bsm, w, g2 = _make(n, k, block, torch.float32, density=density, seed=1000 * block + trial)
        x = torch.randn(m, k, generator=g2).to(DEVICE)
        _check(x, bsm, w, torch.randn(n, generator=g2).to(DEVICE), gelu=bool(trial % 2))


def test_torch_compile_aot_eager():
    """The ops trace under torch.compile (fake kernels, fullgraph). On GPUs they are triton_ops;
    under the interpreter opaque custom_ops (inductor also works there but takes ~25 s to compile)."""
    from bsbert.triton.attention import pruned_attention_triton

    bsm, _, gen = _make(96, 32, 16, torch.float32, density=0.6, seed=13)
    x = torch.randn(2, 5, 32, generator=gen).to(DEVICE)
    bias = torch.randn(96, generator=gen).to(DEVICE)

    def f(x):
        qkv = bsr_linear_triton(x, bsm, bias, gelu=True)  # [2, 5, 3*1*32]
        return pruned_attention_triton(qkv, None, 1, 32, 0.1) * 2

    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, f(x))


def _tuning_config_ids():
    from bsbert.triton.bsr_linear import _tuning_configs

    return [f"bm{c.kwargs['BLOCK_M']}w{c.num_warps}s{c.num_stages}" for c in _tuning_configs()]


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", range(len(_tuning_config_ids())), ids=_tuning_config_ids())
@pytest.mark.parametrize("block", [16, 32, 64])
def test_every_tuning_config_matches_reference(monkeypatch, cfg, block):
    # The autotuner may pick any of these on a GPU, while the other tests run one fixed config
    # (tests/conftest.py sets BSBERT_TRITON_AUTOTUNE=0): each config, forced, against float64, at an M that
    # spans several GROUP_M groups of its tiles with a partial last one, ragged N and K, an empty block row.
    from bsbert.triton import _common
    from bsbert.triton import bsr_linear as tb

    if DEVICE != "cuda":
        pytest.skip("the tuning configs are compiled for a GPU (the interpreter runs one config)")
    c = tb._tuning_configs()[cfg]
    if block == 64 and c.kwargs["BLOCK_M"] == 256:
        pytest.skip("pruned for block 64 (register pressure), never chosen")
    monkeypatch.setenv("BSBERT_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(tb, "_fixed_kernel", lambda m: _common.fixed_config_kernel(
        tb._bsr_linear_kernel, dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages))
    for dtype in (torch.float16, torch.bfloat16):
        bsm, w, gen = _make(3 * block + 5, 4 * block - 7, block, dtype, density=0.5, seed=cfg, empty_rows=(1,))
        m = 9 * c.kwargs["BLOCK_M"] * c.kwargs["GROUP_M"] // 8 + 3  # > one group of tiles, a partial last one
        x = torch.randn(m, w.shape[1], generator=gen).to(DEVICE, dtype)
        bias = torch.randn(w.shape[0], generator=gen).to(DEVICE, dtype)
        _check(x, bsm, w, bias, gelu=True)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU interpreter: the storage is a host allocation")
def test_column_offsets_past_int32():
    # a column-major x has column stride M: offs_k * stride_xk was int32, so x[0, 2] at 2 * (2^31 - 16)
    # elements wrapped to -32 and read what lay there
    S, O = 2**31 - 16, 64
    store = huge_storage(O + 2 * S + 1)
    x = store.as_strided((1, 3), (3, S), storage_offset=O)
    for k in range(3):
        store[O + k * S] = 1.0
    store[O - 32] = 1000.0
    bsm = BlockSparseMatrix.from_dense(torch.ones(16, 3), 16, pad=True, dtype=torch.float16)
    assert bsr_linear_triton(x, bsm)[0, 0].item() == 3.0


def test_compiled_in_grad_mode_and_backward_says_inference_only():
    """The Triton ops had no backward: torch.compile of a call with an input that requires grad failed to
    compile (AOTAutograd traces the backward: "no autograd formula was registered"), and an eager backward
    named no reason. They take the C++ ops' inference-only backward now."""
    import bsbert

    torch._dynamo.reset()
    bsm = BlockSparseMatrix.from_dense(torch.randn(64, 64, device=DEVICE), 32)
    x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    y = torch.compile(lambda t: bsr_linear_triton(t, bsm) * 2)(x)
    with torch.no_grad():
        torch.testing.assert_close(y, bsr_linear_triton(x, bsm) * 2)
    for out in (y, bsr_linear_triton(x, bsm)):
        with pytest.raises(bsbert.BsbertError, match=r"bsbert::triton_bsr_linear has no backward: .*inference-only"):
            out.sum().backward()
