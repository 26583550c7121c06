"""torch.compile of a patched model runs and matches the masked dense model."""
import pytest
import torch

import bsbert
from tests.helpers import inputs, rel_err, skip_unless_backend_fits, tiny_pruned


@pytest.mark.parametrize("backend", ["cpu-bsr", "onednn-dense"])
def test_compiled_patched_model_matches(backend):
    skip_unless_backend_fits(backend)
    torch._dynamo.reset()
    model = tiny_pruned(heads=(2, 3), ffn=(100, 37))
    inp = inputs(pad_from=20)
    with torch.inference_mode():
        ref = model(**inp)
    bsbert.patch(model, backend=backend, progress=False)
    compiled = torch.compile(model)
    with torch.inference_mode():
        out = compiled(**inp)
    assert rel_err(ref, out) <= 1e-4


@pytest.mark.parametrize("attention", ["cpu", "torch-sdpa"])
@pytest.mark.parametrize("pad_from", [None, 20])
def test_patched_model_compiles_to_one_graph(attention, pad_from):
    """No graph break anywhere in a patched forward. A break inside the attention (once: a data-dependent
    'is there any padding?' check) made every layer's attention a frame of its own; with a different
    head count per layer those frames hit dynamo's recompile limit and ran eager behind guards, so the
    compiled patched BERT-large was 6x slower than eager on an H200 (benchmarks/results/gpu-h200.md)."""
    torch._dynamo.reset()
    model = tiny_pruned(heads=(2, 3, 4), ffn=(100, 37, 64))
    bsbert.patch(model, attention=attention, progress=False)
    inp = inputs(pad_from=pad_from)
    with torch.inference_mode():
        ref = model(**inp)
        explained = torch._dynamo.explain(model)(**inp)
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()
    with torch.inference_mode():
        out = torch.compile(model)(**inp)
    assert rel_err(ref, out) <= 1e-4


@pytest.mark.parametrize("fused_encoder", [True, False])
def test_compiled_patched_model_runs_in_grad_mode_and_its_backward_says_inference_only(fused_encoder):
    """A plain call (grad mode on, as `model(**inputs)` is) of torch.compile(patched) failed to compile:
    AOTAutograd traces the backward when an input requires grad (the kept LayerNorms' weights do), and the
    ops' backward raised while being traced. Now the forward runs as eagerly, and a backward still raises."""
    torch._dynamo.reset()
    model = tiny_pruned(heads=(2, 3), ffn=(100, 37))
    inp = inputs(pad_from=20)
    with torch.no_grad():
        ref = model(**inp)
    bsbert.patch(model, select="heuristic", progress=False, fused_encoder=fused_encoder)
    out = torch.compile(model)(**inp)
    assert rel_err(ref, out) <= 1e-4
    if not out.start_logits.requires_grad:
        pytest.skip("no op of this build is on the autograd path (no extension)")
    with pytest.raises(bsbert.BsbertError, match=r"bsbert::\w+ has no backward: .*inference-only"):
        out.start_logits.sum().backward()


def test_export_of_an_unpadded_model_is_refused_with_the_reason():
    # torch's own error was a data-dependent guard failure ("Could not guard on ... Eq(u0, 1)") in unpad.py
    model = tiny_pruned(heads=(2, 3), ffn=(100, 37))
    bsbert.patch(model, select="heuristic", progress=False, unpad=True)
    with pytest.raises(bsbert.BsbertError, match=r"unpad=True.*export a model patched without unpad"):
        with torch.inference_mode():
            torch.export.export(model, (), inputs(pad_from=20))


def test_dynamic_compile_does_not_pin_the_sequence_to_a_packed_size():
    """Packed weights are plain attributes: under dynamic=True their sizes got symbols, and duck sizing gave a
    first call at seq 37 the symbol of a layer's 37 kept neurons; the linears' shape checks pinned it and the
    next length recompiled. They are marked static now: one graph for every length, as for the dense model."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_pruned(heads=(2, 3), ffn=(100, 37))
    bsbert.patch(model, select="heuristic", progress=False)
    compiled = torch.compile(model, dynamic=True)
    with torch.inference_mode():
        for seq in (37, 16, 23):
            out = compiled(**inputs(batch=2, seq=seq, pad_from=5))
            assert rel_err(model(**inputs(batch=2, seq=seq, pad_from=5)), out) <= 1e-5
    assert counters["stats"]["unique_graphs"] == 1
