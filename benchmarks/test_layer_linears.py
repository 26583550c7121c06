"""Per-layer linears of the seed-like model: the original dense linear vs the packed one (dead heads /
neurons removed) vs the backend patch() picks, at M = seq tokens."""
import pytest
import torch
import torch.nn.functional as F

import bsbert
from benchmarks.conftest import SMALL

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


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", ["attn_out", "ffn_in", "ffn_out"])
@pytest.mark.parametrize("variant", ["dense", "patched"])
def test_linear(benchmark, patched_linears, layer, name, variant):
    orig, new = patched_linears[(layer, name)]
    benchmark.group = f"linear layer={layer} {name} M={M}"
    if variant == "dense":
        x = torch.randn(M, orig.in_features)
        fn = lambda: F.linear(x, orig.weight, orig.bias)  # noqa: E731
    else:
        x = torch.randn(M, new.in_features)
        fn = lambda: new(x)  # noqa: E731
    benchmark.extra_info.update({"shape": [new.out_features, new.in_features] if variant == "patched"
                                 else [orig.out_features, orig.in_features]})
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
