"""nn.Module / transformers calls that would leave a patched model half converted, unreadable or silently
different are refused with a clear error, before anything changes: dtype/device conversions, train(),
pickling, save_pretrained. What still works: no-op conversions, eval(), deepcopy, bsbert.save/load, and
everything once the model is unpatched."""
import copy
import io
import pickle

import pytest
import torch

import bsbert
from tests.helpers import inputs, tiny_pruned

FUSED = dict(heads=(2, 3, 4), ffn=(100, 37, 60))  # every layer has heads: the fused encoder is on


def _run(model, inp):
    with torch.inference_mode():
        return model(**inp).start_logits


def _patched():
    model = tiny_pruned(**FUSED).eval()
    bsbert.patch(model, select="heuristic", progress=False)
    assert model.bsbert_plan.fused_encoder
    return model


def _snapshot(model):
    """Every tensor of the model (parameters, buffers) as it is now, with its dtype and device."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {n: (t.dtype, t.device, t.detach().clone()) for n, t in named}


def _assert_unchanged(model, before, inp, out):
    after = _snapshot(model)
    assert after.keys() == before.keys()
    for n, (dtype, device, value) in before.items():
        assert (after[n][0], after[n][1]) == (dtype, device), n
        assert torch.equal(after[n][2], value), n
    assert torch.equal(_run(model, inp), out)


CONVERSIONS = {
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
    "half()": lambda m: m.half(),
    "double()": lambda m: m.double(),
    "bfloat16()": lambda m: m.bfloat16(),
    "to(meta)": lambda m: m.to("meta"),
    "cuda()": lambda m: m.cuda(),  # without CUDA, refused too (the conversion itself fails)
    "to_empty(cpu)": lambda m: m.to_empty(device="cpu"),
    "bert.to(bfloat16)": lambda m: m.bert.to(torch.bfloat16),
    "encoder.half()": lambda m: m.bert.encoder.half(),
    "layer.double()": lambda m: m.bert.encoder.layer[1].double(),
    "patched linear.to(bfloat16)": lambda m: m.bert.encoder.layer[0].output.dense.to(torch.bfloat16),
}


@pytest.mark.parametrize("convert", CONVERSIONS, ids=list(CONVERSIONS))
def test_dtype_and_device_changes_are_refused_before_anything_converts(convert):
    model = _patched()
    inp = inputs(pad_from=20)
    out = _run(model, inp)
    before = _snapshot(model)
    with pytest.raises(bsbert.BsbertError, match=r"cannot change dtype or device.*nothing was converted.*unpatch"):
        CONVERSIONS[convert](model)
    _assert_unchanged(model, before, inp, out)


def test_to_empty_is_named_as_what_it_does():
    # the message said "float32 on cpu -> float32 on cpu": no change of dtype or device at all
    model = _patched()
    with pytest.raises(bsbert.BsbertError, match=r"float32 on cpu kept, but every tensor replaced.*to_empty"):
        model.to_empty(device="cpu")


@pytest.mark.parametrize("convert", ["float()", "to(float32)", "half()"])
def test_a_bf16_model_with_fp32_layer_norms_refuses_before_anything_converts(convert):
    # the guard judged one tensor, the smallest (an fp32 LayerNorm weight here): .float() passed the model's,
    # the embeddings' and the encoder's guards, converted the embeddings, and only a patched module refused
    model = tiny_pruned(**FUSED).eval().to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.float()
    bsbert.patch(model, select="heuristic", progress=False)
    # the lean forwards probe in the packed linears' dtype (they probed in the fp32 of a LayerNorm weight,
    # failed, and turned both off)
    assert model.bsbert_plan.fast_layers and model.bsbert_plan.fused_encoder, model.bsbert_plan.fused_encoder_reason
    inp = inputs(pad_from=20)
    out = _run(model, inp)
    before = _snapshot(model)
    with pytest.raises(bsbert.BsbertError, match=r"cannot change dtype or device.*nothing was converted"):
        {"float()": lambda: model.float(), "to(float32)": lambda: model.to(torch.float32),
         "half()": lambda: model.half()}[convert]()
    _assert_unchanged(model, before, inp, out)


def test_no_op_conversions_still_work():
    model = _patched()
    inp = inputs(pad_from=20)
    out = _run(model, inp)
    before = _snapshot(model)
    assert model.float() is model
    assert model.to(torch.float32) is model
    assert model.to("cpu") is model
    assert model.cpu() is model
    assert model.to(torch.device("cpu"), torch.float32) is model
    _assert_unchanged(model, before, inp, out)


def test_unpatch_removes_the_guards():
    model = _patched()
    inp = inputs(pad_from=20)
    bsbert.unpatch(model)
    assert not any(name in vars(m) for m in model.modules() for name in ("_apply", "train", "save_pretrained"))
    model.to(torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.float()
    bsbert.patch(model, select="heuristic", progress=False)  # and patch again, guarded again
    with pytest.raises(bsbert.BsbertError, match="cannot change dtype"):
        model.half()
    _run(model, inp)


def test_copies_loaded_and_compiled_models_are_guarded(tmp_path):
    model = _patched()
    inp = inputs(pad_from=20)
    out = _run(model, inp)
    twin = copy.deepcopy(model)  # the copy's guards belong to the copy
    assert torch.equal(_run(twin, inp), out)
    with pytest.raises(bsbert.BsbertError, match="cannot change dtype"):
        twin.to(torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {p.dtype for p in twin.parameters()} == {torch.float32}

    bsbert.save(model, str(tmp_path))
    loaded = bsbert.load(str(tmp_path), select="plan")
    assert loaded.to("cpu") is loaded
    before = _snapshot(loaded)
    with pytest.raises(bsbert.BsbertError, match=r"bsbert\.load\(dir, device=\.\.\.\)"):
        loaded.to(torch.bfloat16)
    with pytest.raises(bsbert.BsbertError, match="inference-only"):
        loaded.train()
    with pytest.raises(bsbert.BsbertError, match="save_pretrained"):
        loaded.save_pretrained(str(tmp_path / "hf"))
    _assert_unchanged(loaded, before, inp, _run(loaded, inp))

    compiled = torch.compile(model)
    with pytest.raises(bsbert.BsbertError, match="cannot change dtype"):
        compiled.to(torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_train_is_refused_eval_works():
    model = _patched()
    inp = inputs(pad_from=20)
    out = _run(model, inp)
    for call in (lambda: model.train(), lambda: model.train(True), lambda: model.bert.train(),
                 lambda: model.bert.encoder.layer[0].train()):
        with pytest.raises(bsbert.BsbertError, match="inference-only.*eval"):
            call()
        assert not any(m.training for m in model.modules())
    model.eval()
    model.train(False)
    model.bert.encoder.eval()
    assert not any(m.training for m in model.modules())
    assert torch.equal(_run(model, inp), out)
    bsbert.unpatch(model)
    model.train()  # the dense model trains as before
    assert model.training and model.bert.encoder.layer[0].attention.self.training


def test_pickling_is_refused_deepcopy_works():
    model = _patched()
    inp = inputs(pad_from=20)
    out = _run(model, inp)
    for obj in (model, model.bert.encoder.layer[0], model.bert.encoder.layer[2].intermediate):
        with pytest.raises(bsbert.BsbertError, match=r"cannot be pickled.*bsbert\.save"):
            pickle.dumps(obj)
    with pytest.raises(bsbert.BsbertError, match="cannot be pickled"):
        torch.save(model, io.BytesIO())
    twin = copy.deepcopy(model)
    assert bsbert.is_patched(twin)
    assert torch.equal(_run(twin, inp), out)
    # a deep copy is independent: editing its LayerNorm leaves the original as it was
    with torch.no_grad():
        twin.bert.encoder.layer[0].output.LayerNorm.weight.mul_(2)
    assert torch.equal(_run(model, inp), out)
    assert not torch.equal(_run(twin, inp), out)
    bsbert.unpatch(model)
    pickle.loads(pickle.dumps(model))  # the dense model pickles as before


def test_save_pretrained_is_refused(tmp_path):
    model = _patched()
    for owner in (model, model.bert):
        with pytest.raises(bsbert.BsbertError, match=r"save_pretrained.*random weights.*bsbert\.save"):
            owner.save_pretrained(str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    bsbert.unpatch(model)
    model.save_pretrained(str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "config.json").exists()
