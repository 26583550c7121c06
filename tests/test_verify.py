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
