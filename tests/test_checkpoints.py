"""Checkpoints saved by transformers 4 with pruned heads (nn_pruning's hub models): load_local puts
the kept heads back into full-size tensors, and the result equals the masked dense model."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForQuestionAnswering, DistilBertConfig, DistilBertForQuestionAnswering

import bsbert
from bsbert import checkpoints, models
from bsbert.cli import main

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

HEADS, HIDDEN = 4, 64
HEAD_DIM = HIDDEN // HEADS
PRUNED = {0: [1, 2], 1: [0, 1, 2, 3], 2: [3]}  # layer 1 loses every head


NAMES = {  # a layer's head-row tensors and its output projection, per naming style
    "bert": ("bert.encoder.layer.{}.attention.self.{}", ("query", "key", "value"),
             "bert.encoder.layer.{}.attention.output.dense.weight"),
    "distilbert": ("distilbert.transformer.layer.{}.attention.{}", ("q_lin", "k_lin", "v_lin"),
                   "distilbert.transformer.layer.{}.attention.out_lin.weight"),
}




def _head_tensors(style, layer):
    """(name, dim) of each tensor of `layer` that holds one slice per head: Q/K/V rows, O columns."""
    rows_t, lins, cols_t = NAMES[style]
    return [(rows_t.format(layer, lin) + "." + p, 0) for lin in lins for p in ("weight", "bias")] + \
        [(cols_t.format(layer), 1)]


def _kept_index(heads):
    kept = [h for h in range(HEADS) if h not in heads]
    return torch.tensor([h * HEAD_DIM + i for h in kept for i in range(HEAD_DIM)], dtype=torch.long)


def _mask_heads(model, style):
    """Zero PRUNED's heads in place: the masked dense reference."""
    sd = model.state_dict()
    with torch.no_grad():
        for layer, heads in PRUNED.items():
            for name, dim in _head_tensors(style, layer):
                for h in heads:
                    sd[name].narrow(dim, h * HEAD_DIM, HEAD_DIM).zero_()
    return model


def _pruned_state_dict(model, style="bert"):
    """What transformers 4 saved after model.prune_heads(PRUNED): only the kept heads' rows / columns."""
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    for layer, heads in PRUNED.items():
        for name, dim in _head_tensors(style, layer):
            sd[name] = sd[name].index_select(dim, _kept_index(heads)).contiguous()
    return sd


def _masked_dense(seed=0, vocab=100):
    """The reference: a random BERT QA model with PRUNED's heads zeroed (Q/K/V rows and biases, O columns)."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
                     intermediate_size=128, max_position_embeddings=64)
    return _mask_heads(BertForQuestionAnswering(cfg).eval(), "bert")


def _save(model, path, fmt, pruned=PRUNED, style="bert"):
    model.config.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["architectures"] = [type(model).__name__]
    cfg["pruned_heads"] = {str(k): v for k, v in pruned.items()}  # as JSON stores transformers 4's dict
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    sd = _pruned_state_dict(model, style)
    if fmt == "safetensors":
        save_file(sd, os.path.join(path, "model.safetensors"))
    elif fmt == "bin":
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    else:  # two safetensors shards and their index
        keys = sorted(sd)
        half = len(keys) // 2
        weight_map = {}
        for i, part in enumerate((keys[:half], keys[half:])):
            name = f"model-0000{i + 1}-of-00002.safetensors"
            save_file({k: sd[k] for k in part}, os.path.join(path, name))
            weight_map.update({k: name for k in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    return dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded"])
def test_load_equals_masked_dense(tmp_path, fmt):
    ref = _masked_dense()
    _save(ref, str(tmp_path), fmt)
    got = models.load_local(str(tmp_path))
    assert not hasattr(got.config, "pruned_heads")
    for k, v in ref.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    with torch.inference_mode():
        a, b = ref(**_inputs()), got(**_inputs())
    torch.testing.assert_close(b.start_logits, a.start_logits, rtol=0, atol=0)
    torch.testing.assert_close(b.end_logits, a.end_logits, rtol=0, atol=0)


def test_load_in_bfloat16(tmp_path):
    ref = _masked_dense()
    _save(ref, str(tmp_path), "bin")
    got = models.load_local(str(tmp_path), dtype=torch.bfloat16)
    for k, v in ref.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(got.state_dict()[k], v.to(torch.bfloat16)), k


def test_loaded_model_patches_with_those_heads_removed(tmp_path):
    ref = _masked_dense()
    _save(ref, str(tmp_path), "safetensors")
    model = models.load_local(str(tmp_path))
    plan = bsbert.analyze(model)
    for layer, heads in PRUNED.items():
        assert not set(plan.layers[layer].kept_heads) & set(heads), (layer, plan.layers[layer].kept_heads)
    assert plan.layers[1].kept_heads == []
    bsbert.patch(model, progress=False)
    with torch.inference_mode():
        a, b = ref(**_inputs()), model(**_inputs())
    torch.testing.assert_close(b.start_logits, a.start_logits, rtol=1e-4, atol=1e-4)


def test_bench_takes_such_a_checkpoint(tmp_path):
    """`bsbert bench --model DIR` (no --small: it would shrink only a BERT-large baseline, and is refused)."""
    _save(_masked_dense(vocab=30522), str(tmp_path / "ckpt"), "safetensors")
    assert main(["bench", "--model", str(tmp_path / "ckpt"), "--seq", "16", "--repeats", "1", "--trials", "1",
                 "--select", "heuristic", "--out", str(tmp_path / "out")]) == 0
    res = json.loads(next((tmp_path / "out").glob("bench-*.json")).read_text())
    assert res["model"] == str(tmp_path / "ckpt")
    assert res["dense_model"] == "the model unpatched (masked dense)"
    assert res["runs"][0]["max_rel_diff_patched"] <= 1e-4


def test_pruned_heads_parsing():
    assert checkpoints.pruned_heads({}) == {}
    assert checkpoints.pruned_heads({"pruned_heads": {"3": [2, 0, 2], "5": []}}) == {3: [0, 2]}
    with pytest.raises(ValueError, match="pruned_heads"):
        checkpoints.pruned_heads({"pruned_heads": [1, 2]})
    with pytest.raises(ValueError, match=r"pruned_heads\['x'\]"):
        checkpoints.pruned_heads({"pruned_heads": {"x": ["a"]}})


def test_shapes_that_do_not_fit_pruned_heads_name_the_tensor(tmp_path):
    ref = _masked_dense()
    _save(ref, str(tmp_path), "safetensors")
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg["pruned_heads"]["2"] = [2, 3]  # the file kept three heads of layer 2, not two
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"layer\.2\.attention.*does not fit pruned_heads\[2\]"):
        models.load_local(str(tmp_path))


def test_head_outside_the_layer_is_an_error():
    sd = {"bert.encoder.layer.0.attention.self.query.weight": torch.zeros(HEAD_DIM * 3, HIDDEN)}
    with pytest.raises(ValueError, match="outside 0..3"):
        checkpoints.expand_pruned_heads(sd, {0: [7]}, HEADS, HEAD_DIM)


def test_layer_without_attention_tensors_is_an_error():
    with pytest.raises(ValueError, match=r"layers \[4\]"):
        checkpoints.expand_pruned_heads({}, {4: [0]}, HEADS, HEAD_DIM)


def test_directory_without_weights(tmp_path):
    with pytest.raises(ValueError, match="holds no model weights"):
        checkpoints.read_state_dict(str(tmp_path))


def _check_expand(style, num_heads, head_dim, layers, pruned, seed):
    """Full random tensors; the pruned checkpoint keeps the kept heads' slices; expanding it must give
    the full tensors with exactly the removed heads zeroed, and leave every other tensor alone."""
    g = torch.Generator().manual_seed(seed)
    rows_t, lins, cols_t = NAMES[style]
    hid = num_heads * head_dim
    full, saved = {}, {}
    for layer in range(layers):
        kept = [h for h in range(num_heads) if h not in pruned.get(layer, [])]
        idx = torch.tensor([h * head_dim + i for h in kept for i in range(head_dim)], dtype=torch.long)
        for lin in lins:
            for p, shape in (("weight", (hid, 7)), ("bias", (hid,))):
                key = rows_t.format(layer, lin) + "." + p
                full[key] = torch.randn(shape, generator=g)
                saved[key] = full[key].index_select(0, idx)
        key = cols_t.format(layer)
        full[key] = torch.randn(7, hid, generator=g)
        saved[key] = full[key].index_select(1, idx)
    saved["other.weight"] = full["other.weight"] = torch.randn(3, generator=g)
    got = checkpoints.expand_pruned_heads(saved, pruned, num_heads, head_dim)
    assert set(got) == set(full)
    for key, want in full.items():
        want = want.clone()
        m = checkpoints._ROWS.search(key) or checkpoints._COLS.search(key)
        if m is not None:
            for h in pruned.get(int(m.group(1)), []):
                want.narrow(0 if checkpoints._ROWS.search(key) else 1, h * head_dim, head_dim).zero_()
        assert torch.equal(got[key], want), key


if given is not None:
    @settings(max_examples=60, deadline=None)
    @given(style=st.sampled_from(sorted(NAMES)), num_heads=st.integers(1, 8), head_dim=st.sampled_from([1, 2, 8]),
           layers=st.integers(1, 3), data=st.data(), seed=st.integers(0, 2**16))
    def test_expand_property(style, num_heads, head_dim, layers, data, seed):
        pruned = {}
        for layer in range(layers):
            heads = data.draw(st.sets(st.integers(0, num_heads - 1)), label=f"pruned heads of layer {layer}")
            if heads:
                pruned[layer] = sorted(heads)
        _check_expand(style, num_heads, head_dim, layers, pruned, seed)


@pytest.mark.parametrize("style", sorted(NAMES))
def test_expand_fixed_cases(style):
    _check_expand(style, 4, 2, 3, {0: [0], 1: [0, 1, 2, 3], 2: [1, 3]}, seed=3)


def test_distilbert_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=100, dim=HIDDEN, n_layers=3, n_heads=HEADS, hidden_dim=128,
                           max_position_embeddings=64)
    ref = _mask_heads(DistilBertForQuestionAnswering(cfg).eval(), "distilbert")
    _save(ref, str(tmp_path), "safetensors", style="distilbert")
    got = models.load_local(str(tmp_path))
    assert type(got) is DistilBertForQuestionAnswering
    inp = _inputs()
    with torch.inference_mode():
        torch.testing.assert_close(got(**inp).start_logits, ref(**inp).start_logits, rtol=0, atol=0)


def test_albert_with_pruned_heads_is_named_unsupported(tmp_path):
    """ALBERT names its (shared) attention tensors otherwise: the error once said only that the checkpoint had
    no attention tensors for the pruned layers, as if the file were damaged."""
    from transformers import AlbertConfig, AlbertModel

    cfg = AlbertConfig(vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=37, max_position_embeddings=16)
    AlbertModel(cfg).save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["pruned_heads"] = {"0": [1]}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(bsbert.BsbertError, match=r"model_type 'albert' is not an encoder bsbert supports"):
        models.load_local(str(tmp_path))
