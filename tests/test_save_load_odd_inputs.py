"""bsbert.save / bsbert.load, packed_bert and pruned-heads checkpoints given odd inputs: edited or mixed save
files, directories that are not a bsbert save, devices, models save cannot store. Each case must end in an
error naming the problem (never a crash deep inside, a silent wrong answer or a changed model)."""
import json
import os
import shutil

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import bsbert
from bsbert import checkpoints, models
from bsbert.packed_export import packed_bert
from tests.helpers import inputs, rel_err, tiny_config


def _tiny(task="qa", seed=0):
    """2 layers, hidden 64, 2 heads of 32 (one dead in layer 0), FFN 128 (pruned to 50 / 20 neurons)."""
    model = models.build_model(tiny_config(layers=2, hidden=64, heads=2, ffn=128), task=task, seed=seed)
    return models.prune_like_seed(model, (1, 2), (50, 20), seed=seed, dead_bias_units=True)


def _patched(seed=0):
    model = _tiny(seed=seed)
    bsbert.patch(model, select="heuristic", progress=False)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(patched model, directory of its save)."""
    model = _patched()
    path = tmp_path_factory.mktemp("good")
    bsbert.save(model, str(path))
    return model, path


def _copy(saved, tmp_path, meta=None, tensors=None):
    """A copy of the good save with bsbert.json replaced by ``meta`` (a dict, or raw text / bytes) and / or the
    weights by ``tensors`` (written with the good file's metadata)."""
    _, good = saved
    d = tmp_path / "edited"
    shutil.copytree(good, d)
    if isinstance(meta, dict):
        (d / "bsbert.json").write_text(json.dumps(meta))
    elif isinstance(meta, (str, bytes)):
        (d / "bsbert.json").write_bytes(meta.encode() if isinstance(meta, str) else meta)
    if tensors is not None:
        from safetensors import safe_open

        with safe_open(str(good / "model.safetensors"), "pt") as f:
            metadata = f.metadata()
        save_file(tensors, str(d / "model.safetensors"), metadata=metadata)
    return str(d)


def _meta(saved):
    return json.loads((saved[1] / "bsbert.json").read_text())


def _load_and_run(path):
    """load, then one forward: an error only the forward raises counts as well."""
    model = bsbert.load(path, select="heuristic")
    with torch.inference_mode():
        return model(**inputs(vocab=1000))


# ---- bsbert.json that cannot be read as a bsbert save --------------------------------------------------------
@pytest.mark.parametrize("text", ["[1, 2]", b"\xff\xfe\x00 not utf-8"], ids=["json-list", "not-utf8"])
def test_unreadable_meta_is_named_corrupt(saved, tmp_path, text):
    # before: AttributeError ('list' object has no attribute 'get') / a bare UnicodeDecodeError
    with pytest.raises(bsbert.BsbertError, match=r"bsbert\.json is corrupt"):
        bsbert.load(_copy(saved, tmp_path, meta=text))


@pytest.mark.parametrize("name", ["AutoConfig", "__version__"])
def test_model_class_that_is_no_model_class(saved, tmp_path, name):
    # before: AttributeError (no attribute 'config_class')
    with pytest.raises(bsbert.BsbertError, match=f"has no model class '{name}'"):
        bsbert.load(_copy(saved, tmp_path, meta={**_meta(saved), "model_class": name}))


@pytest.mark.parametrize("edit", ["config-not-a-dict", "plan-without-layers", "plan-unknown-field", "init-kwargs"])
def test_config_plan_or_init_kwargs_that_cannot_be_read(saved, tmp_path, edit):
    # before: TypeError / KeyError from BertConfig, Plan.from_dict or the model's constructor
    meta = _meta(saved)
    if edit == "config-not-a-dict":
        meta["config"] = "bert"
    elif edit == "plan-without-layers":
        del meta["plan"]["layers"]
    elif edit == "plan-unknown-field":
        meta["plan"]["layers"][0]["from_the_future"] = 1
    else:
        meta["init_kwargs"] = {"no_such_argument": True}
    with pytest.raises(bsbert.BsbertError, match="cannot rebuild BertForQuestionAnswering"):
        bsbert.load(_copy(saved, tmp_path, meta=meta))


@pytest.mark.parametrize("edit", ["config-heads", "plan-kept-heads", "plan-head-dim", "plan-without-qkv"])
def test_plan_that_does_not_fit_the_model(saved, tmp_path, edit):
    # before: config-heads loaded and computed with another attention scale (silently); kept heads / head size
    # loaded and failed inside the attention kernel at the first forward; a linear missing: KeyError 'qkv'
    meta = _meta(saved)
    layer = meta["plan"]["layers"][0]
    if edit == "config-heads":
        meta["config"]["num_attention_heads"] = 4
    elif edit == "plan-kept-heads":
        layer["kept_heads"] = [0, 1]
    elif edit == "plan-head-dim":
        layer["head_dim"] = 16
    else:
        del layer["linears"]["qkv"]
    with pytest.raises(bsbert.BsbertError, match="the plan does not fit the model its config builds: .*layer 0"):
        _load_and_run(_copy(saved, tmp_path, meta=meta))


@pytest.mark.parametrize("edit", [{"position_embedding_type": "relative_key"}, {"is_decoder": True}],
                         ids=["relative", "decoder"])
def test_config_that_patch_refuses_is_refused(saved, tmp_path, edit):
    # before: relative_key loaded and ran absolute attention (silently); is_decoder failed at the first forward
    meta = _meta(saved)
    meta["config"].update(edit)
    with pytest.raises(bsbert.UnsupportedModelError):
        bsbert.load(_copy(saved, tmp_path, meta=meta))


# ---- model.safetensors edited ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["bsbert.layers.0.qkv.bias", "bsbert.layers.1.ffn_out.bias"])
def test_packed_bias_of_the_wrong_size(saved, tmp_path, key):
    # before: loaded, then "bsr_linear: bias must have shape [96]" / an expand error at the first forward
    tensors = load_file(str(saved[1] / "model.safetensors"))
    tensors[key] = tensors[key][:-1].clone()
    with pytest.raises(bsbert.BsbertError, match=r"shape mismatch for layer \d \w+ bias"):
        _load_and_run(_copy(saved, tmp_path, tensors=tensors))


@pytest.mark.parametrize("key,dtype,match", [
    ("bsbert.layers.0.qkv.weight", torch.float16, "packed weights .* must share one floating dtype"),
    ("bsbert.layers.0.qkv.weight", torch.int32, "packed weights .* must share one floating dtype"),
    ("bert.embeddings.LayerNorm.weight", torch.int64, "dtype mismatch for bert.embeddings.LayerNorm.weight"),
], ids=["fp16-packed", "int-packed", "int-layernorm"])
def test_tensors_of_the_wrong_dtype(saved, tmp_path, key, dtype, match):
    # before: loaded, then "self and mat2 must have the same dtype" at the first forward / load_state_dict's
    # RuntimeError
    tensors = load_file(str(saved[1] / "model.safetensors"))
    tensors[key] = tensors[key].to(dtype)
    with pytest.raises(bsbert.BsbertError, match=match):
        _load_and_run(_copy(saved, tmp_path, tensors=tensors))


def test_weights_and_json_from_two_saves(tmp_path, monkeypatch):
    """A save interrupted between its two renames leaves the new weights beside the old JSON."""
    a = _patched(seed=0)
    bsbert.save(a, str(tmp_path))
    b = _patched(seed=1)  # the same shapes, other weights
    real_replace, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bsbert.save(b, str(tmp_path))
    monkeypatch.undo()
    # before: loaded b's weights with a's config and plan, silently
    with pytest.raises(bsbert.BsbertError, match="come from different saves"):
        bsbert.load(str(tmp_path))


# ---- devices --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    ({"tokens": -5}, "tokens must be an int >= 1"),
    ({"select": "bogus"}, "select must be one of"),
    ({"select": "plan", "backend": "torch-dense"}, r"select='plan' takes every backend from the plan, so "
                                                  r"backend='torch-dense' would be ignored"),
    ({"select": "plan", "attention": "torch-sdpa"}, "attention='torch-sdpa' would be ignored"),
])
def test_load_arguments_refused_as_patch_refuses_them(saved, kw, match):
    # before: tokens=-5 failed inside the first measurement (torch's "negative dimension"); select='plan' dropped
    # backend= / attention= silently
    with pytest.raises(ValueError, match=match):
        bsbert.load(str(saved[1]), **kw)


def test_devices(saved):
    model, path = saved
    inp = inputs(vocab=1000)
    loaded = bsbert.load(str(path), "cpu:0", select="heuristic")  # before: "corrupt or unreadable: device cpu:0 is invalid"
    with torch.inference_mode():
        assert rel_err(model(**inp), loaded(**inp)) == 0
    for device, match in (("gpu", "not a torch device"), ("meta", r"load\(device='meta'\): bsbert runs on 'cpu' or 'cuda'")):
        with pytest.raises(bsbert.BsbertError, match=match):  # before: "model.safetensors is corrupt or unreadable"
            bsbert.load(str(path), device)
    if not torch.cuda.is_available():
        with pytest.raises(bsbert.BsbertError, match="no CUDA GPU"):
            bsbert.load(str(path), "cuda")


# ---- save -----------------------------------------------------------------------------------------------------
def test_save_does_not_overwrite_a_hugging_face_checkpoint(tmp_path):
    model = _tiny()
    model.save_pretrained(str(tmp_path))
    before = (tmp_path / "model.safetensors").read_bytes()
    bsbert.patch(model, select="heuristic", progress=False)
    # before: replaced the dense checkpoint with packed weights (from_pretrained then initialises the encoder
    # at random, with only a load report)
    with pytest.raises(bsbert.BsbertError, match=r"holds a Hugging Face checkpoint \(config.json, model.safetensors\)"):
        bsbert.save(model, str(tmp_path))
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    bsbert.save(model, str(tmp_path / "packed"))
    bsbert.save(model, str(tmp_path / "packed"))  # over a bsbert save: fine


def test_save_does_not_sit_beside_a_transformers_4_checkpoint(tmp_path):
    # nn_pruning's era wrote pytorch_model.bin: save() used to check model.safetensors only and put the packed
    # file beside the .bin, which from_pretrained then preferred, loading a randomly initialised encoder
    model = _tiny()
    model.config.save_pretrained(str(tmp_path))
    torch.save(model.state_dict(), str(tmp_path / "pytorch_model.bin"))
    bsbert.patch(model, select="heuristic", progress=False)
    with pytest.raises(bsbert.BsbertError, match=r"holds a Hugging Face checkpoint \(config.json, pytorch_model.bin\)"):
        bsbert.save(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]


@pytest.mark.parametrize("shared", ["layer", "attention"])
def test_a_module_used_twice_in_the_encoder_saves_and_loads(tmp_path, shared):
    # patch supports an encoder that uses one layer (or one attention) twice; save wrote its packed tensors under
    # both layer indices, which safetensors refused ("Some tensors share memory")
    model = models.build_model(tiny_config(layers=3, hidden=64, heads=2, ffn=128), task="qa", seed=0)
    layers = model.bert.encoder.layer
    if shared == "layer":
        layers[2] = layers[0]
    else:
        layers[2].attention = layers[0].attention
    models.prune_like_seed(model, (1, 2, 1), (50, 20, 50), seed=0, dead_bias_units=True)
    bsbert.patch(model, select="heuristic", progress=False)
    bsbert.save(model, str(tmp_path))
    loaded = bsbert.load(str(tmp_path), select="heuristic")
    inp = inputs(batch=2, seq=9, vocab=1000, pad_from=5)
    with torch.inference_mode():
        assert rel_err(model(**inp), loaded(**inp)) == 0.0


def test_save_refuses_layers_the_config_does_not_build(tmp_path):
    # layers dropped from the encoder without lowering num_hidden_layers: the save was written, and every load of
    # it failed ("plan has 1 layers, config builds 2")
    model = _tiny()
    model.bert.encoder.layer = torch.nn.ModuleList([model.bert.encoder.layer[0]])
    bsbert.patch(model, select="heuristic", progress=False)
    with pytest.raises(bsbert.BsbertError, match="encoder has 1 layers, but its config builds 2"):
        bsbert.save(model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    # dropped after patching (the plan still has both): named by the tensors the model lacks
    model = _patched()
    model.bert.encoder.layer = torch.nn.ModuleList([model.bert.encoder.layer[0]])
    with pytest.raises(bsbert.BsbertError, match=r"config \(the model lacks 4 tensors, e.g. \['bert.encoder.layer.1"):
        bsbert.save(model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_save_refuses_tensors_the_config_does_not_build(tmp_path):
    model = _patched()
    model.qa_outputs = torch.nn.Linear(64, 3)  # the config still says 2 labels
    with pytest.raises(bsbert.BsbertError, match=r"could not rebuild this model from its config \(shape mismatch "
                                                 r"for qa_outputs.weight: model \(3, 64\), config \(2, 64\)\)"):
        bsbert.save(model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_save_refuses_what_load_cannot_rebuild(tmp_path):
    class MyQA(tf.BertForQuestionAnswering):
        pass

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    sub = MyQA(_tiny().config).eval()
    sub.load_state_dict(_tiny().state_dict())
    for model in (sub, Wrapper(_tiny()).eval()):
        bsbert.patch(model, select="heuristic", progress=False)
        # before: the subclass saved and only its load failed ("has no class MyQA"); the wrapper: AttributeError
        with pytest.raises(bsbert.BsbertError, match="is not a class of transformers"):
            bsbert.save(model, str(tmp_path / "out"))
        assert not (tmp_path / "out").exists()


def test_save_with_a_config_value_json_cannot_hold(tmp_path):
    model = _patched()
    model.config.my_tensor = torch.zeros(2)
    # before: json's TypeError, with model.safetensors.tmp and a partial bsbert.json.tmp left behind
    with pytest.raises(bsbert.BsbertError, match="config.my_tensor cannot be written as JSON"):
        bsbert.save(model, str(tmp_path))
    assert os.listdir(tmp_path) == []


# ---- packed_bert ----------------------------------------------------------------------------------------------
def test_packed_bert_leaves_a_training_model_training():
    model = _tiny().train()
    packed = packed_bert(model)
    # before: the model's embeddings, LayerNorms, activations and QA head were switched to eval mode
    assert all(m.training for m in model.modules())
    assert not any(m.training for m in packed.modules())
    inp = inputs(vocab=1000)
    with torch.inference_mode():
        ref = model.eval()(**inp)
        s, e = packed(inp["input_ids"], inp["attention_mask"])
    assert rel_err(ref, {"start_logits": s, "end_logits": e}) < 1e-5


# ---- pruned-heads checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_corrupt_checkpoint_file_is_named(tmp_path, name):
    sd = {"w": torch.zeros(64, 64)}
    if name.endswith(".safetensors"):
        save_file(sd, str(tmp_path / name))
    else:
        torch.save(sd, str(tmp_path / name))
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    # before: safetensors' SafetensorError / torch's RuntimeError, neither naming the file
    with pytest.raises(ValueError, match=f"{name} is corrupt or not a weights file"):
        checkpoints.read_state_dict(str(tmp_path))


@pytest.mark.parametrize("text", ["{}", "{oops"])
def test_bad_shard_index_is_named(tmp_path, text):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    # before: KeyError 'weight_map' / a JSONDecodeError without the file's name
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json is not a shard index"):
        checkpoints.read_state_dict(str(tmp_path))


@pytest.mark.parametrize("heads", ["12", [1.7], [True], {"1": 2}], ids=["str", "float", "bool", "dict"])
def test_pruned_heads_that_are_not_a_list_of_indices(heads):
    # before: "12" read as heads 1 and 2, 1.7 as head 1, true as head 1, a dict as its keys: other heads silently
    with pytest.raises(ValueError, match=r"pruned_heads\['0'\] = .* is not a list of head indices"):
        checkpoints.pruned_heads({"pruned_heads": {"0": heads}})
    assert checkpoints.pruned_heads({"pruned_heads": {"0": [1, "2"]}}) == {0: [1, 2]}
