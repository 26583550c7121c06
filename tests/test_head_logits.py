"""Correctness of the CPU op ``torch.ops.bsbert.head_logits`` (csrc/cpu/head_logits*): a linear with few
outputs written as planes, y[n] = x @ weight[n] + bias[n] of shape [N, *x.shape[:-1]] (the lean QA
forward's start / end logits).

Every check compares against a float64 product on fresh random data: the error may be at most twice
torch's F.linear's in the same dtype, plus the typical error of an fp32 sum of K products (the orders of
the sums differ) and one rounding step of the output dtype. No timing assertions here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bsbert import _ext
from tests.helpers import cpu_isa_levels, with_threads

pytestmark = pytest.mark.skipif(not _ext.has_op("head_logits"),
                                reason=f"bsbert._C / head_logits unavailable: {_ext.reason_unavailable()}")

if _ext.available():
    import bsbert.ops.fake  # noqa: F401  (registers the fake kernel used by opcheck)

ISAS = cpu_isa_levels()
LEADING = {1: (), 3: (3,), 74: (2, 37), 128: (1, 128)}  # rows -> leading shape (1-D x, 2-D, 3-D)


def op(x, w, b):
    return torch.ops.bsbert.head_logits(x, w, b)


def data(lead, k, n, dtype, *, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((*lead, k), generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def check(x, w, b):
    y = op(x, w, b)
    n = w.shape[0]
    assert y.dtype == x.dtype and y.shape == (n, *x.shape[:-1]) and y.is_contiguous()
    ref = x.double() @ w.double().T + (b.double() if b is not None else 0)
    ref = ref.movedim(-1, 0)
    err = (y.double() - ref).abs().max().item() if ref.numel() else 0.0
    if ref.numel():
        torch_err = (F.linear(x, w, b).movedim(-1, 0).double() - ref).abs().max().item()
        sum_err = x.shape[-1] ** 0.5 * torch.finfo(torch.float32).eps * (x.double().abs() @ w.double().abs().T).max().item()
        step = torch.finfo(x.dtype).eps * ref.abs().max().item()
        assert err <= 2 * torch_err + sum_err + step, (err, torch_err, sum_err, step)
    return y


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", sorted(LEADING))
@pytest.mark.parametrize("k", [1, 7, 16, 100, 1024])
def test_grid(monkeypatch, isa, dtype, rows, k):
    monkeypatch.setenv("BSBERT_CPU_ISA", isa)
    for n, bias in ((2, True), (1, False), (3, True)):
        check(*data(LEADING[rows], k, n, dtype, bias=bias, seed=rows * 7919 + k * 31 + n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layouts_and_edge_cases(dtype):
    x, w, b = data((6, 40), 96, 2, dtype, seed=5)
    want = op(x.contiguous(), w, b)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # the leading dims in the other order in memory
    assert torch.equal(op(xt, w, b), want)
    assert torch.equal(op(x[:, ::2], w, b), op(x[:, ::2].contiguous(), w, b))  # row stride, every other row
    wide = torch.randn(6, 40, 2 * 96).to(dtype)[..., :96]  # unit stride, row stride 192
    assert torch.equal(op(wide, w, b), op(wide.contiguous(), w, b))
    assert torch.equal(op(x, w.T.contiguous().T, b), want)  # non-contiguous weight
    zeros = torch.zeros(3, 96, dtype=dtype)
    assert torch.equal(op(zeros, w, b), b[:, None].expand(2, 3))  # all-zero rows: the bias exactly
    assert torch.equal(op(zeros, w, None), torch.zeros(2, 3, dtype=dtype))
    assert op(torch.empty(0, 96, dtype=dtype), w, b).shape == (2, 0)  # no rows
    empty_k = op(torch.empty(4, 0, dtype=dtype), torch.empty(2, 0, dtype=dtype), b)  # no inputs: bias only
    assert torch.equal(empty_k, b[:, None].expand(2, 4))
    assert torch.equal(op(torch.empty(4, 0, dtype=dtype), torch.empty(2, 0, dtype=dtype), None),
                       torch.zeros(2, 4, dtype=dtype))


def test_threads_do_not_change_the_values():
    x, w, b = data((3, 129), 1024, 2, torch.bfloat16, seed=9)
    one = with_threads(1, lambda: op(x, w, b))
    assert torch.equal(with_threads(3, lambda: op(x, w, b)), one)
    assert torch.equal(with_threads(2, lambda: op(x, w, b)), one)


def test_errors_name_the_problem():
    x, w, b = data((4,), 8, 2, torch.float32)
    with pytest.raises(RuntimeError, match=r"weight must be \[out_features, 8\]"):
        op(x, torch.randn(2, 9), b)
    with pytest.raises(RuntimeError, match="weight dtype .*must match x's dtype"):
        op(x, w.bfloat16(), b)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[2\]"):
        op(x, w, torch.randn(3))
    with pytest.raises(RuntimeError, match="bias dtype .*must match"):
        op(x, w, b.double())
    with pytest.raises(RuntimeError, match="must be float32 or bfloat16"):
        op(x.half(), w.half(), b.half())
    with pytest.raises(RuntimeError, match="at least 1 dimension"):
        op(torch.tensor(1.0), torch.randn(2, 1), None)


def test_opcheck():
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b = data((2, 5), 64, 2, dtype)
        for bias in (b, None):
            torch.library.opcheck(torch.ops.bsbert.head_logits.default, (x, w, bias),
                                  test_utils=("test_schema", "test_faketensor"))
