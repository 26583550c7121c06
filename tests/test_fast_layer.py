"""patch(fast_layers=...): bsbert's lean layer forward computes exactly what transformers' layer
forward computes with the same modules, keeps transformers' hooks working, and comes off with
unpatch / verify's swap to the original."""
import copy

import pytest
import torch

import bsbert
from bsbert import fast_layer
from tests.helpers import inputs, tiny_pruned, tiny_pruned_distilbert


def _patched(fast, **kw):
    model = tiny_pruned(**kw)
    bsbert.patch(model, select="heuristic", progress=False, fast_layers=fast)
    return model


def _run(model, inp, **kw):
    with torch.inference_mode():
        return model(**inp, **kw)


def test_same_values_as_transformers_layer_forward():
    inp = inputs(batch=3, seq=29, pad_from=11)
    a, b = _patched(True), _patched(False)
    layers = a.bert.encoder.layer
    assert a.bsbert_plan.fast_layers and all(fast_layer.installed(layer) for layer in layers)
    assert not b.bsbert_plan.fast_layers and b.bsbert_plan.fast_layers_reason == "fast_layers=False"
    assert not any(fast_layer.installed(layer) for layer in b.bert.encoder.layer)
    ra, rb = _run(a, inp, output_hidden_states=True), _run(b, inp, output_hidden_states=True)
    # same modules, same kernels, same order: bit for bit
    assert torch.equal(ra.start_logits, rb.start_logits) and torch.equal(ra.end_logits, rb.end_logits)
    # transformers collects hidden states with hooks on the layer modules: they still fire
    assert len(ra.hidden_states) == len(layers) + 1
    for ha, hb in zip(ra.hidden_states, rb.hidden_states):
        assert torch.equal(ha, hb)
    assert "bsbert lean layer" in repr(layers[0])
    assert "lean layer forward" in a.bsbert_plan.table(29)


def test_matches_masked_dense_original():
    inp = inputs(batch=2, seq=17, pad_from=5)
    model = tiny_pruned()
    ref = _run(model, inp)
    bsbert.patch(model, select="heuristic", progress=False)
    out = _run(model, inp)
    scale = ref.start_logits.abs().max()
    assert ((out.start_logits - ref.start_logits).abs().max() / scale).item() < 1e-4


def test_unpatch_and_verify_restore_the_layer_forward():
    model = _patched(True)
    layers = list(model.bert.encoder.layer)
    rep = bsbert.verify(model)  # swaps the original modules in (lean forward off) and back
    assert rep.passed, str(rep)
    assert all(fast_layer.installed(layer) for layer in layers)
    bsbert.unpatch(model)
    assert not any(fast_layer.installed(layer) for layer in layers)
    assert "bsbert lean layer" not in repr(layers[0])


def test_cache_goes_to_transformers_forward_and_its_clear_error():
    model = _patched(True)
    layer = model.bert.encoder.layer[0]
    x = torch.randn(1, 4, model.config.hidden_size)
    with torch.inference_mode(), pytest.raises(ValueError, match="KV cache is not supported"):
        layer(x, None, cache=object())


def test_save_load_keeps_the_setting(tmp_path):
    inp = inputs(batch=2, seq=13, pad_from=7)
    for fast in (True, False):
        model = _patched(fast)
        ref = _run(model, inp)
        bsbert.save(model, str(tmp_path / str(fast)))
        loaded = bsbert.load(str(tmp_path / str(fast)), select="heuristic")
        assert loaded.bsbert_plan.fast_layers is fast
        assert fast_layer.installed(loaded.bert.encoder.layer[0]) is fast
        assert torch.equal(_run(loaded, inp).start_logits, ref.start_logits)


def test_tuple_returning_layers_keep_their_forward(monkeypatch):
    # transformers < 5 layers return a tuple: the lean form (a tensor) must then stay off
    monkeypatch.setattr(fast_layer, "_returns_tensor", lambda layer, hidden: False)
    model = _patched(True)
    assert not model.bsbert_plan.fast_layers
    assert "returns a tuple" in model.bsbert_plan.fast_layers_reason
    assert not any(fast_layer.installed(layer) for layer in model.bert.encoder.layer)


def test_distilbert_keeps_transformers_forward():
    model = tiny_pruned_distilbert()
    inp = inputs(batch=2, seq=9, vocab=500, pad_from=4)
    with torch.inference_mode():
        ref = model(**inp).last_hidden_state
    bsbert.patch(model, select="heuristic", progress=False)
    assert not model.bsbert_plan.fast_layers
    assert "distilbert" in model.bsbert_plan.fast_layers_reason
    with torch.inference_mode():
        out = model(**inp).last_hidden_state
    keep = inp["attention_mask"].bool()
    assert ((out - ref)[keep].abs().max() / ref[keep].abs().max()).item() <= 1e-4


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("where", ["attention", "global"])
def test_hooks_on_the_attention_block_run(where, unpad):
    # The lean layer forward calls attention.self and attention.output directly, never the BertAttention
    # module: a hook on it (or a global one) takes the class's forward, as in the unpatched model.
    model = tiny_pruned(heads=(2, 3, 4), ffn=(100, 37, 60))
    ref = copy.deepcopy(model)
    inp = inputs(pad_from=20)
    handles = []
    for m in (ref, model):
        def double(mod, args, out):
            return (out[0] * 2,) + tuple(out[1:]) if isinstance(out, tuple) else out * 2

        if where == "attention":
            handles.append(m.bert.encoder.layer[1].attention.register_forward_hook(double))
    if where == "global":  # counts BertAttention calls in both models
        calls = []
        handles.append(torch.nn.modules.module.register_module_forward_hook(
            lambda mod, a, o: calls.append(1) if type(mod).__name__ == "BertAttention" else None))
    try:
        want = _run(ref, inp)
        bsbert.patch(model, select="heuristic", progress=False, unpad=unpad)
        n = len(calls) if where == "global" else 0
        got = _run(model, inp)
        if where == "global":
            assert len(calls) - n == 3  # one BertAttention call per layer, as in the unpatched model
    finally:
        for h in handles:
            h.remove()
    real = inp["attention_mask"].bool()
    for k in ("start_logits", "end_logits"):
        assert torch.allclose(want[k][real], got[k][real], atol=1e-4, rtol=1e-4)
