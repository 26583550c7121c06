"""The CPU op ``torch.ops.bsbert.bsr_linear_add_layer_norm``: LayerNorm(x @ W^T + bias + residual).

It is defined as bsr_linear (no GELU) followed by add_layer_norm, and must give those values bit for
bit on every path (its own row-tile split for larger M, the two-op fallback for small M, one or two
threads, each ISA); those two ops are checked against float64 references in their own tests, and the
composition is checked against a float64 LayerNorm here as well. No timing assertions here.
"""
from __future__ import annotations

import pytest
import torch

from bsbert import _ext
from bsbert.ops.packing import pack_cpu
from tests.helpers import cpu_isa_levels, with_threads
from tests.test_bsr_linear_cpu import make_bsm

pytestmark = pytest.mark.skipif(not _ext.has_op("bsr_linear_add_layer_norm"),
                                reason=f"bsbert._C / bsr_linear_add_layer_norm unavailable: "
                                       f"{_ext.reason_unavailable()}")

if _ext.available():
    import bsbert.ops.fake  # noqa: F401  (registers the fake kernel used by opcheck)

ISAS = cpu_isa_levels(bf16_level=True)


def _case(m, n, k, block=32, density=0.5, dtype=torch.float32, bias=True, seed=0, lead=()):
    w, bsm = make_bsm(n, k, block, density, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, m, k, generator=g).to(dtype)
    r = torch.randn(*lead, m, n, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    lw, lb = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
    return dict(x=x, w=w, bsm=bsm, packed=pack_cpu(bsm, dtype), bias=b, r=r, lw=lw, lb=lb)


def fused(c, eps=1e-12):
    n, k = c["bsm"].shape
    return torch.ops.bsbert.bsr_linear_add_layer_norm(c["x"], c["bsm"].crow_indices, c["bsm"].col_indices,
                                                      c["packed"], c["bias"], n, k, c["bsm"].block, c["r"],
                                                      c["lw"], c["lb"], eps)


def two_ops(c, eps=1e-12):
    n, k = c["bsm"].shape
    y = torch.ops.bsbert.bsr_linear(c["x"], c["bsm"].crow_indices, c["bsm"].col_indices, c["packed"], c["bias"],
                                    n, k, c["bsm"].block, False)
    return torch.ops.bsbert.add_layer_norm(y, c["r"], c["lw"], c["lb"], eps)


def ref64(c, eps=1e-12):
    h = c["x"].double() @ c["w"].double().T + c["r"].double()
    if c["bias"] is not None:
        h = h + c["bias"].double()
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).pow(2).mean(-1, keepdim=True)
    return (h - mean) / torch.sqrt(var + eps) * c["lw"].double() + c["lb"].double()


# M around the switch between the two-op form (M < 2 * threads * mr; mr = 12 rows for fp32 and 8 for
# bf16 on AVX-512) and the row-tile split, plus 1, odd and BERT-sized M.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [1, 7, 16, 23, 24, 47, 48, 49, 128, 385])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_bsr_linear_then_add_layer_norm(threads, m, dtype):
    c = _case(m, 160, 96, dtype=dtype, seed=m)
    got, want = with_threads(threads, lambda: (fused(c), two_ops(c)))
    assert got.dtype == dtype and got.shape == (m, 160)
    assert torch.equal(got, want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_isa_matches_float64(monkeypatch, isa, dtype):
    monkeypatch.setenv("BSBERT_CPU_ISA", isa)
    c = _case(130, 1024, 200, dtype=dtype, seed=3)
    got = fused(c)
    assert torch.equal(got, two_ops(c))
    err = float((got.double() - ref64(c)).abs().max() / ref64(c).abs().max())
    assert err < (2e-5 if dtype == torch.float32 else 2e-2), err


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_blocks_densities_bias(block, density, bias):
    # 0.0: every block zero, the GEMM gives the bias only; N = 70 and K = 37 are not block multiples
    c = _case(100, 70, 37, block=block, density=density, bias=bias, seed=block)
    got = fused(c)
    assert torch.equal(got, two_ops(c))
    assert float((got.double() - ref64(c)).abs().max()) < 1e-4


def test_leading_dims_and_strided_inputs():
    c = _case(64, 96, 64, lead=(3,), seed=5)
    c["x"] = torch.randn(3, 64, 2 * 64)[..., ::2]        # non-contiguous rows of x
    c["r"] = torch.randn(3, 96, 64).transpose(1, 2)       # residual with a non-unit last stride
    got = fused(c)
    assert got.shape == (3, 64, 96) and got.is_contiguous()
    assert torch.equal(got, two_ops(c))


def test_empty_inputs():
    c = _case(0, 64, 32)
    assert fused(c).shape == (0, 64)
    c = _case(50, 64, 0)   # K = 0: x @ W^T is zero, LayerNorm(bias + residual) remains
    assert torch.allclose(fused(c).double(), ref64(c), atol=1e-5)


def test_errors_name_the_problem():
    c = _case(40, 64, 32)
    c["r"] = torch.randn(40, 63)
    with pytest.raises(RuntimeError, match=r"residual shape \[40, 63\] must equal the output shape \[40, 64\]"):
        fused(c)
    c = _case(40, 64, 32)
    c["r"] = c["r"].to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="residual dtype"):
        fused(c)
    # the LayerNorm's arguments by this op's names (add_layer_norm's "weight" read as the GEMM's weight)
    for m in (1, 40):  # both the row-split and the whole-op paths
        c = _case(m, 64, 32)
        c["lw"] = torch.ones(32)
        with pytest.raises(RuntimeError, match=r"^bsr_linear_add_layer_norm: ln_weight must have shape \[64\] "
                                               r"\(out_features\), got \[32\]"):
            fused(c)
        c = _case(m, 64, 32)
        c["lb"] = c["lb"].double()
        with pytest.raises(RuntimeError, match=r"^bsr_linear_add_layer_norm: ln_bias must be float32"):
            fused(c)
    c = _case(40, 64, 32)
    c["x"] = torch.randn(40, 31)
    with pytest.raises(RuntimeError, match="does not match in_features = 32"):
        fused(c)


@pytest.mark.parametrize("m", [5, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(m, dtype):
    c = _case(m, 64, 64, dtype=dtype)
    n, k = c["bsm"].shape
    args = (c["x"], c["bsm"].crow_indices, c["bsm"].col_indices, c["packed"], c["bias"], n, k, 32, c["r"],
            c["lw"], c["lb"], 1e-12)
    torch.library.opcheck(torch.ops.bsbert.bsr_linear_add_layer_norm.default, args)


def test_patched_output_layers_use_it():
    import bsbert
    from bsbert.nn import DenseAddLayerNorm
    from tests.helpers import inputs, rel_err, tiny_pruned

    model = tiny_pruned()
    inp = inputs(batch=2, seq=40, pad_from=30)
    with torch.inference_mode():
        ref = model(**inp)
    bsbert.patch(model, select="heuristic", backend="cpu-bsr", progress=False)
    outs = [mod for mod in model.modules() if isinstance(mod, DenseAddLayerNorm) and mod.dense.choice is not None]
    assert outs and all(mod._gemm_fused() is not None for mod in outs)
    assert "bsr_linear_add_layer_norm" in repr(outs[0])
    calls = []
    real = outs[0]._gemm_fused()
    outs[0].dense.choice.prepared.add_layer_norm = lambda *a: calls.append(1) or real(*a)
    with torch.inference_mode():
        out = model(**inp)
    assert calls and rel_err(ref, out) < 1e-4
