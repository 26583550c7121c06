"""Correctness of the CPU op ``torch.ops.bsbert.add_layer_norm`` (csrc/cpu/add_layer_norm*):
LayerNorm(x + residual) * weight + bias over the last dim.

Every check compares against a float64 LayerNorm of the sum the op is defined on, on fresh random
data: for fp32 inputs the fp32 sum x + residual (what torch's add produces too), for bf16 inputs the
exact sum (the op adds in fp32; torch's bf16 add rounds first, which is why bf16 is judged against
2x torch's own bf16 error). No timing assertions here.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bsbert import _ext
from tests.helpers import cpu_isa_levels, with_threads

pytestmark = pytest.mark.skipif(not _ext.has_op("add_layer_norm"),
                                reason=f"bsbert._C / add_layer_norm unavailable: {_ext.reason_unavailable()}")

if _ext.available():
    import bsbert.ops.fake  # noqa: F401  (registers the fake kernel used by opcheck)

ISAS = cpu_isa_levels()
FP32_TOL = 2e-6  # max |y - ref| / max |ref|; fp32 rounding of mean, rstd and the affine step
ROW_SHAPES = {1: (), 3: (3,), 128: (2, 64), 385: (5, 77)}  # rows -> leading shape (1-D, 2-D, 3-D)


def op(x, r, w, b, eps=1e-12):
    return torch.ops.bsbert.add_layer_norm(x, r, w, b, eps)


def ref64(x, r, w, b, eps=1e-12):
    h = (x + r).double() if x.dtype == torch.float32 else x.double() + r.double()
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).pow(2).mean(-1, keepdim=True)
    return (h - mean) / torch.sqrt(var + eps) * w.double() + b.double()


def rel(y, ref) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def inputs(shape, dtype, *, mean=0.0, scale=1.0, seed=0, affine_dtype=None):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (mean + scale * torch.randn(shape, generator=g)).to(dtype)
    r = (scale * torch.randn(shape, generator=g)).to(dtype)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(affine_dtype or dtype)
    b = (0.5 * torch.randn(n, generator=g)).to(affine_dtype or dtype)
    return x, r, w, b


def check(x, r, w, b, eps=1e-12):
    y = op(x, r, w, b, eps)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    ref = ref64(x, r, w, b, eps)
    err = rel(y, ref)
    if x.dtype == torch.float32:
        assert err <= FP32_TOL, err
    else:
        torch_err = rel(F.layer_norm(x + r, (x.shape[-1],), w.to(x.dtype), b.to(x.dtype), eps), ref)
        assert err <= 2 * torch_err + 1e-6, (err, torch_err)
    return y


# ---- values ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", sorted(ROW_SHAPES))
@pytest.mark.parametrize("n", [1, 7, 64, 768, 1024, 1031])
def test_grid(monkeypatch, isa, dtype, rows, n):
    monkeypatch.setenv("BSBERT_CPU_ISA", isa)
    assert _ext.load(warn=False).cpu_isa().startswith(isa)
    check(*inputs((*ROW_SHAPES[rows], n), dtype, seed=rows * 7919 + n))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [7, 1024, 1031])
def test_large_mean(monkeypatch, isa, dtype, n):
    """|mean| >> std: E[h^2] - E[h]^2 in fp32 would lose every digit of the variance here."""
    monkeypatch.setenv("BSBERT_CPU_ISA", isa)
    for mean in (1e3, -3e4):
        check(*inputs((33, n), dtype, mean=mean, seed=n))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-5, 1e-3, 1.0])
def test_eps(monkeypatch, isa, eps):
    """Inputs with variance ~1e-6, so that eps >= 1e-5 visibly changes the result."""
    monkeypatch.setenv("BSBERT_CPU_ISA", isa)
    x, r, w, b = inputs((9, 300), torch.float32, scale=1e-3, seed=5)
    y = check(x, r, w, b, eps)
    if eps >= 1e-5:
        assert rel(y, ref64(x, r, w, b, 0.0)) > 1e-3  # eps was applied, not ignored


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_torch_layer_norm(dtype):
    x, r, w, b = inputs((2, 384, 1024), dtype, seed=11)
    y = op(x, r, w, b, 1e-12)
    t = F.layer_norm(x + r, (1024,), w, b, 1e-12)
    if dtype == torch.float32:
        torch.testing.assert_close(y, t, rtol=1e-5, atol=1e-5)
    else:  # the op does not round the sum to bf16 first: one bf16 step apart at most
        torch.testing.assert_close(y, t, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("w_dtype,b_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_bf16_affine_dtypes(monkeypatch, isa, w_dtype, b_dtype):
    """bf16 x with weight / bias in bf16 or fp32, each (read as stored, or widened when mixed)."""
    monkeypatch.setenv("BSBERT_CPU_ISA", isa)
    for n in (7, 200):
        x, r, w, b = inputs((17, n), torch.bfloat16, seed=n, affine_dtype=torch.float32)
        check(x, r, w.to(w_dtype), b.to(b_dtype))


@pytest.mark.parametrize("isa", ISAS)
def test_isas_agree(monkeypatch, isa):
    x, r, w, b = inputs((50, 1031), torch.float32, seed=8)
    monkeypatch.setenv("BSBERT_CPU_ISA", "portable")
    y0 = op(x, r, w, b)
    monkeypatch.setenv("BSBERT_CPU_ISA", isa)
    torch.testing.assert_close(op(x, r, w, b), y0, rtol=1e-5, atol=1e-5)


def test_thread_count_does_not_change_values():
    """Rows are independent: splitting them over threads must give bit-identical results."""
    x, r, w, b = inputs((385, 1024), torch.float32, seed=2)
    y1 = with_threads(1, lambda: op(x, r, w, b))
    y2 = with_threads(2, lambda: op(x, r, w, b))
    assert torch.equal(y1, y2)


# ---- layouts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_row_strides_and_no_reads_past_the_row(monkeypatch, isa, dtype):
    """Rows that are slices of wider rows: the values beyond N are huge, so any tail lane that read
    them would wreck the mean."""
    monkeypatch.setenv("BSBERT_CPU_ISA", isa)
    for n in (7, 23, 1031):
        x_wide, r_wide, _, _ = inputs((6, n + 9), dtype, seed=n)
        x_wide[:, n:] = 1e30
        r_wide[:, n:] = -3e29
        _, _, w, b = inputs((n,), dtype, seed=n + 1)
        check(x_wide[:, :n], r_wide[:, :n], w, b)


def test_non_contiguous_last_dim_and_broadcast_rows():
    x, r, w, b = inputs((40, 64), torch.float32, seed=4)
    check(x.t().contiguous().t(), r, w, b)  # last dim strided: copied first
    check(x, r[:1].expand(40, 64), w, b)  # stride-0 rows
    check(x[::3], r[::3], w, b)  # every third row
    check(x, r, w[::1].clone(), torch.randn(128)[::2])  # strided bias


def test_empty_inputs():
    for shape in [(0, 64), (3, 0), (2, 0, 5)]:
        x, r, w, b = inputs(shape, torch.float32)
        y = op(x, r, w, b)
        assert y.shape == x.shape and y.numel() == 0


def test_nan_and_inf_stay_in_their_row():
    x, r, w, b = inputs((4, 100), torch.float32, seed=6)
    x[1, 99] = float("nan")
    x[2, 0] = float("inf")
    y = op(x, r, w, b)
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    keep = torch.tensor([0, 3])
    assert rel(y[keep], ref64(x[keep], r[keep], w, b)) <= FP32_TOL


@pytest.mark.parametrize("isa", ISAS)
def test_rows_whose_variance_overflows_give_nan_not_huge_values(monkeypatch, isa):
    """Rows of ~1e30 overflow the fp32 squares (Inf - Inf): the variance was clamped to 0 and the output came
    out as finite values of ~1e36 (or Inf) that look like numbers; torch's layer_norm gives NaN there. Any
    finite output must stay within LayerNorm's bound sqrt(N) * max|w| + max|b|."""
    monkeypatch.setenv("BSBERT_CPU_ISA", isa)
    n = 100
    g = torch.Generator().manual_seed(9)
    w, b = torch.ones(n), torch.zeros(n)
    bound = math.sqrt(n) + 1e-3
    for scale in (1e28, 1e30, 1e33, 1e36):
        x = torch.randn(3, n, generator=g) * scale
        y = op(x, torch.zeros_like(x), w, b)
        finite = torch.isfinite(y)
        assert (y[finite].abs() <= bound).all(), (scale, float(y[finite].abs().max()))
        assert (~finite).any() or torch.equal(y, torch.zeros_like(y)), scale  # not silently "normalised"


def test_bf16_rounding_to_nearest_even():
    """bias only (x + r constant per row, so the normalised part is 0): y must be bias rounded
    to bf16 exactly as torch rounds."""
    n = 64
    b32 = torch.randn(n) * 100
    x = torch.ones(3, n, dtype=torch.bfloat16)
    y = op(x, torch.zeros_like(x), torch.ones(n), b32)
    assert torch.equal(y, b32.to(torch.bfloat16).expand(3, n))


# ---- errors ----------------------------------------------------------------------------------------
def _err(match, x, r, w, b, eps=1e-5):
    with pytest.raises(RuntimeError, match=match):
        op(x, r, w, b, eps)


def test_errors():
    x, r, w, b = inputs((4, 16), torch.float32)
    _err("float16 is not supported", x.half(), r.half(), w.half(), b.half())
    _err("must be float32 or bfloat16", x.double(), r.double(), w.double(), b.double())
    _err(r"residual dtype \(BFloat16\) must match", x, r.bfloat16(), w, b)
    _err("residual shape .* must equal x's shape", x, r[:3], w, b)
    _err("residual shape .* must equal x's shape", x, r[:1], w, b)  # no broadcasting
    _err(r"weight must have shape \[16\]", x, r, w[:15], b)
    _err(r"bias must have shape \[16\]", x, r, w, b.view(4, 4))
    _err("weight must be float32 or x's dtype", x, r, w.bfloat16(), b)
    _err("bias must be float32 or x's dtype", x, r, w, b.double())
    _err("at least 1 dimension", x[0, 0], r[0, 0], w[:1], b[:1])
    _err("eps must be finite and >= 0", x, r, w, b, -1e-5)
    _err("eps must be finite and >= 0", x, r, w, b, math.nan)
    _err("weight is on meta but x is on cpu", x, r, w.to("meta"), b)


# ---- torch.library ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(5, 33), (2, 3, 64)])
def test_opcheck(dtype, shape):
    x, r, w, b = inputs(shape, dtype)
    torch.library.opcheck(torch.ops.bsbert.add_layer_norm.default, (x, r, w, b, 1e-5))
    torch.library.opcheck(torch.ops.bsbert.add_layer_norm.default, (x, r, w.float(), b.float(), 1e-5))
