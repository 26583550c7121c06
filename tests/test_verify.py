import pytest
import torch

import bsbert
from tests.helpers import inputs, tiny_pruned


def test_verify_passes_and_reports_per_output():
    model = tiny_pruned()
    bsbert.patch(model, select="heuristic", progress=False)
    rep = bsbert.verify(model)
    assert rep.passed and set(rep.outputs) >= {"start_logits", "end_logits"}
    assert all(v["max_rel"] < 1e-4 for v in rep.outputs.values())
    assert "PASS" in str(rep)
    rep2 = bsbert.verify(model, inputs(batch=3, seq=19, pad_from=4))
    assert rep2.passed
    assert bsbert.is_patched(model) and "PrunedSelfAttention" in repr(model)  # unchanged by verify


def test_verify_catches_a_wrong_kernel_and_patch_refuses(monkeypatch):
    model = tiny_pruned()
    before = repr(model)
    import bsbert.patching as P

    real = P.fold_dead_neurons
    # a broken fold (not a uniform shift: LayerNorm would cancel that)
    monkeypatch.setattr(P, "fold_dead_neurons",
                        lambda lins, act: real(lins, act) + torch.linspace(0, 0.5, lins["ffn_out"].out_features))
    with pytest.raises(bsbert.BsbertError, match="patch refused"):
        bsbert.patch(model, select="heuristic", progress=False, verify=True)
    assert repr(model) == before and not bsbert.is_patched(model)


def test_verify_true_attaches_report_and_keep_original_false():
    model = tiny_pruned()
    bsbert.patch(model, select="heuristic", progress=False, verify=True)
    assert model.bsbert_verify_report.passed
    model2 = tiny_pruned()
    bsbert.patch(model2, select="heuristic", progress=False, keep_original=False)
    with pytest.raises(bsbert.NotPatchedError, match="dropped"):
        bsbert.unpatch(model2)
    with pytest.raises(ValueError, match="keep_original"):
        bsbert.patch(tiny_pruned(), keep_original=False, verify=True)


def test_verify_unpatched_model():
    with pytest.raises(bsbert.NotPatchedError):
        bsbert.verify(tiny_pruned())


def test_example_inputs_are_capped_at_the_position_table_only():
    # the model check times forwards on these inputs at the run's length (384 of BERT's 512 positions): a cap at
    # half the table would have timed 256 tokens instead
    from bsbert.verify import example_inputs
    from tests.helpers import tiny_pruned

    model = tiny_pruned()  # 512 positions
    assert example_inputs(model, 1, 384, padded=False)["input_ids"].shape == (1, 384)
    assert example_inputs(model, 1, 600, padded=False)["input_ids"].shape == (1, 512)


def test_nested_outputs_are_compared_too():
    """hidden_states / attentions are tuples inside the output: a difference there once went unseen
    (only top-level tensors were compared), and a missing or reshaped output raised a KeyError / broadcast."""
    from bsbert.verify import compare_outputs

    t = torch.randn(2, 5, 8)
    ref = {"last": t, "hidden_states": (t, t * 2), "ids": torch.ones(2, dtype=torch.long)}
    res = compare_outputs(ref, {"last": t, "hidden_states": (t, t * 2 + 1), "ids": torch.zeros(2)})
    assert set(res) == {"last", "hidden_states.0", "hidden_states.1"}
    assert res["hidden_states.0"]["max_rel"] == 0 and res["hidden_states.1"]["max_rel"] > 0.01
    res = compare_outputs(ref, {"last": t[:, :4], "hidden_states": (t,)})
    assert res["last"]["max_rel"] == float("inf") and "shape (2, 4, 8) instead of (2, 5, 8)" in res["last"]["problem"]
    assert "missing" in res["hidden_states.1"]["problem"]


def test_verify_covers_hidden_states():
    model = tiny_pruned()
    bsbert.patch(model, select="heuristic", progress=False)
    inp = {**inputs(batch=2, seq=9, pad_from=5), "output_hidden_states": True}
    rep = bsbert.verify(model, inp)
    n = model.config.num_hidden_layers
    assert {f"hidden_states.{i}" for i in range(n + 1)} <= set(rep.outputs), sorted(rep.outputs)
    assert rep.passed, str(rep)
