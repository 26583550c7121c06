"""patch() with the fused residual add + LayerNorm (bsbert.nn.DenseAddLayerNorm): the kernel really
runs where it applies (padded, unpadded, DistilBERT unpadded), the model still matches its masked
dense original, the torch fallback is exact, and save/load/unpatch/print see the expected modules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bsbert
from bsbert import _ext
from bsbert.nn import DenseAddLayerNorm, add_layer_norm
from tests.helpers import OpCounter, inputs, rel_err, tiny_pruned, tiny_pruned_distilbert

TOL_FP32 = 1e-4
needs_kernel = pytest.mark.skipif(not _ext.has_op("add_layer_norm"),
                                  reason=f"bsbert::add_layer_norm unavailable: {_ext.reason_unavailable()}")


def _run(model, inp):
    counter = OpCounter()
    with torch.inference_mode(), counter:
        out = model(**inp)
    # the add + LayerNorm tail runs alone or inside the block-sparse GEMM in front of it
    return out, counter.calls["bsbert::add_layer_norm"] + counter.calls["bsbert::bsr_linear_add_layer_norm"]


def _outputs(model):
    layers = model.bert.encoder.layer
    return [m for layer in layers for m in (layer.attention.output, layer.output)]


@needs_kernel
@pytest.mark.parametrize("unpad", [False, True])
def test_fused_kernel_runs_and_matches(unpad):
    model = tiny_pruned()
    originals = [m.LayerNorm for m in _outputs(model)]
    inp = inputs(batch=3, seq=41, pad_from=17)
    ref, _ = _run(model, inp)
    bsbert.patch(model, select="heuristic", progress=False, unpad=unpad)
    out, fused_calls = _run(model, inp)
    assert fused_calls == 2 * len(model.bert.encoder.layer)
    mods = _outputs(model)
    assert all(isinstance(m, DenseAddLayerNorm) for m in mods)
    assert all(m.LayerNorm is ln for m, ln in zip(mods, originals))  # the original module, shared
    if unpad:  # padded positions come out as zeros by design: compare the real tokens' hidden states
        keep = inp["attention_mask"].bool()
        with torch.inference_mode():
            got = model.bert(**inp).last_hidden_state[keep]
            bsbert.unpatch(model)
            want = model.bert(**inp).last_hidden_state[keep]
        assert float((got - want).abs().max() / want.abs().max()) <= TOL_FP32
    else:
        assert rel_err(ref, out) <= TOL_FP32


@needs_kernel
def test_unpadded_distilbert_uses_fused_kernel():
    model = tiny_pruned_distilbert()
    inp = inputs(batch=3, seq=20, vocab=500, pad_from=6)
    ref, _ = _run(model, inp)
    bsbert.patch(model, select="heuristic", progress=False, unpad=True)
    out, fused_calls = _run(model, inp)
    assert fused_calls == 2 * 2
    keep = inp["attention_mask"].bool()
    r, o = ref.last_hidden_state[keep], out.last_hidden_state[keep]
    assert float((o - r).abs().max() / r.abs().max()) <= TOL_FP32


def test_torch_fallback_when_the_kernel_is_missing(monkeypatch):
    import bsbert.nn.norm as norm

    monkeypatch.setattr(norm, "fused_kernel_available", lambda: False)
    model = tiny_pruned()
    inp = inputs(batch=2, seq=30, pad_from=11)
    ref, _ = _run(model, inp)
    bsbert.patch(model, select="heuristic", progress=False)
    out, fused_calls = _run(model, inp)
    assert fused_calls == 0
    assert rel_err(ref, out) <= TOL_FP32
    assert "add+LayerNorm: torch (bsbert::add_layer_norm unavailable)" in repr(model)


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float16), ("meta", torch.float32)])
def test_add_layer_norm_falls_back_to_torch(device, dtype):
    """float16 on CPU and other devices (meta stands in for CUDA here) take torch's path, unchanged."""
    ln = torch.nn.LayerNorm(48, eps=1e-5, device=device, dtype=dtype)
    x = torch.randn(3, 5, 48).to(device=device, dtype=dtype)
    r = torch.randn(3, 5, 48).to(device=device, dtype=dtype)
    counter = OpCounter()
    with torch.no_grad(), counter:
        y = add_layer_norm(x, r, ln)
    assert counter.calls["bsbert::add_layer_norm"] == 0 and y.shape == x.shape and y.dtype == dtype
    if device == "cpu":
        with torch.no_grad():
            assert torch.equal(y, F.layer_norm(x + r, (48,), ln.weight, ln.bias, 1e-5))


@needs_kernel
def test_print_unpatch_and_state_dict_keys():
    model = tiny_pruned()
    keys = list(model.state_dict())
    bsbert.patch(model, select="heuristic", progress=False)
    text = repr(model)
    assert text.count("DenseAddLayerNorm(") == 2 * len(model.bert.encoder.layer)
    assert "add+LayerNorm: fused CPU kernel" in text
    # the LayerNorm keys are unchanged; only the replaced linears' weights leave the state dict
    patched_keys = list(model.state_dict())
    assert [k for k in keys if "LayerNorm" in k] == [k for k in patched_keys if "LayerNorm" in k]
    bsbert.unpatch(model)
    assert type(model.bert.encoder.layer[0].attention.output).__name__ == "BertSelfOutput"
    assert type(model.bert.encoder.layer[0].output).__name__ == "BertOutput"
    assert list(model.state_dict()) == keys


@needs_kernel
@pytest.mark.parametrize("keep_original", [True, False])
def test_save_load_keeps_the_fused_modules(tmp_path, keep_original):
    model = tiny_pruned(task="cls")
    inp = inputs(pad_from=11)
    bsbert.patch(model, select="heuristic", progress=False, keep_original=keep_original)
    out1, _ = _run(model, inp)
    bsbert.save(model, str(tmp_path))
    loaded = bsbert.load(str(tmp_path), select="heuristic")
    out2, fused_calls = _run(loaded, inp)
    assert fused_calls == 2 * len(loaded.bert.encoder.layer)
    assert rel_err(out1, out2) <= 1e-6
    for a, b in zip(_outputs(model), _outputs(loaded)):
        assert isinstance(b, DenseAddLayerNorm)
        assert torch.equal(a.LayerNorm.weight, b.LayerNorm.weight) and a.LayerNorm.eps == b.LayerNorm.eps


def test_unfamiliar_output_block_keeps_its_own_forward():
    """An output block with more than dense/dropout/LayerNorm may compute something else: only its
    linear is swapped, the block (and its forward) stays."""
    model = tiny_pruned()
    odd = model.bert.encoder.layer[1].output
    odd.extra = torch.nn.Identity()
    inp = inputs(batch=2, seq=30, pad_from=11)
    ref, _ = _run(model, inp)
    bsbert.patch(model, select="heuristic", progress=False)
    layers = model.bert.encoder.layer
    assert layers[1].output is odd and type(odd.dense).__name__ == "SparseLinear"
    assert isinstance(layers[0].output, DenseAddLayerNorm) and isinstance(layers[1].attention.output,
                                                                          DenseAddLayerNorm)
    out, _ = _run(model, inp)
    assert rel_err(ref, out) <= TOL_FP32
