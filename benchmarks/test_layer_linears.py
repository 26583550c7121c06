"""Per-layer linears of the seed-like model at M = seq tokens: the original dense linear (torch F.linear and
oneDNN on a prepacked weight, the full unpruned shape) vs the module patch() put in its place (the packed
shape: dead heads / neurons removed, run by the backend patch() picked). When the patched ffn_in fuses the
GELU, the dense candidates apply it too, so that every candidate does the same work. Each case first checks
its result, untimed, against float64 F.linear on the weight it runs (for the patched module: its packed weight;
that the packing is right is test_model.py's check, against the unpatched model)."""
import pytest
import torch
import torch.nn.functional as F

import bsbert
from benchmarks.conftest import SMALL, check_close, run_info
from bsbert.ops import linear_backends

LAYERS = [0, 1] if SMALL else [0, 11, 16, 23]
M = 128 if SMALL else 384


@pytest.fixture(scope="module")
def patched_linears(seed_model):
    """(layer, name) -> (original weight/bias, SparseLinear) for a few layers."""
    enc = seed_model.bert.encoder
    originals = {}
    for i in LAYERS:
        layer = enc.layer[i]
        originals[(i, "ffn_in")] = layer.intermediate.dense
        originals[(i, "ffn_out")] = layer.output.dense
        originals[(i, "attn_out")] = layer.attention.output.dense
    bsbert.patch(seed_model, tokens=M, progress=False)
    try:
        out = {}
        for (i, name), orig in originals.items():
            layer = enc.layer[i]
            new = {"ffn_in": layer.intermediate.dense, "ffn_out": layer.output.dense,
                   "attn_out": layer.attention.output.dense}[name]
            out[(i, name)] = (orig, new)
        yield out
    finally:
        bsbert.unpatch(seed_model)


def _candidate(variant, orig, new, x, gelu):
    """(the call to time, its weight and bias) for one variant."""
    if variant == "patched":
        return (lambda: new(x)), new.packed_weight(), new.bias
    w, b = orig.weight, orig.bias
    if variant == "dense":
        return (lambda: F.gelu(F.linear(x, w, b)) if gelu else F.linear(x, w, b)), w, b
    why_not = linear_backends._onednn_probe(w.dtype)
    if why_not:
        pytest.skip(why_not)
    # oneDNN's inner product with the GELU fused as a post-op, as bsbert's onednn-dense backend runs it
    attr, alg = ("gelu", "none") if gelu else ("none", "")
    args = (x, w.to_mkldnn(), b, attr, [], alg)
    return (lambda: torch.ops.mkldnn._linear_pointwise(*args)), w, b


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", ["attn_out", "ffn_in", "ffn_out"])
@pytest.mark.parametrize("variant", ["dense", "onednn", "patched"])
def test_linear(benchmark, patched_linears, layer, name, variant):
    orig, new = patched_linears[(layer, name)]
    gelu = bool(getattr(new, "gelu", False))  # the GELU the patched module computes inside (ffn_in, fused)
    benchmark.group = f"linear layer={layer} {name} M={M}"
    mod = new if variant == "patched" else orig
    x = torch.randn(M, mod.in_features, generator=torch.Generator().manual_seed(layer)).to(orig.weight.dtype)
    with torch.inference_mode():
        fn, w, b = _candidate(variant, orig, new, x, gelu)
        ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        benchmark.extra_info.update({"shape": [mod.out_features, mod.in_features], "gelu": gelu, **run_info(),
                                     "max_rel_err": check_close(fn(), F.gelu(ref) if gelu else ref, x.dtype,
                                                                f"{variant} {name}")})
        benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
