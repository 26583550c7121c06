"""Checkpoints saved by transformers 4 with pruned heads (nn_pruning's hub models): load_local puts
the kept heads back into full-size tensors, and the result equals the masked dense model."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForQuestionAnswering

import bsbert
from bsbert import checkpoints, models
from bsbert.cli import main

HEADS, HIDDEN = 4, 64
HEAD_DIM = HIDDEN // HEADS
PRUNED = {0: [1, 2], 1: [0, 1, 2, 3], 2: [3]}  # layer 1 loses every head


def _masked_dense(seed=0, vocab=100):
    """The reference: a random BERT QA model with PRUNED's heads zeroed (Q/K/V rows and biases, O columns)."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
                     intermediate_size=128, max_position_embeddings=64)
    model = BertForQuestionAnswering(cfg).eval()
    with torch.no_grad():
        for layer, heads in PRUNED.items():
            att = model.bert.encoder.layer[layer].attention
            for h in heads:
                rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                for lin in (att.self.query, att.self.key, att.self.value):
                    lin.weight[rows] = 0
                    lin.bias[rows] = 0
                att.output.dense.weight[:, rows] = 0
    return model


def _pruned_state_dict(model):
    """What transformers 4 saved after model.prune_heads(PRUNED): only the kept heads' rows / columns."""
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    for layer, heads in PRUNED.items():
        kept = [h for h in range(HEADS) if h not in heads]
        idx = torch.tensor([h * HEAD_DIM + i for h in kept for i in range(HEAD_DIM)], dtype=torch.long)
        pre = f"bert.encoder.layer.{layer}.attention."
        for name in ("query", "key", "value"):
            for p in ("weight", "bias"):
                sd[pre + f"self.{name}.{p}"] = sd[pre + f"self.{name}.{p}"].index_select(0, idx).contiguous()
        sd[pre + "output.dense.weight"] = sd[pre + "output.dense.weight"].index_select(1, idx).contiguous()
    return sd


def _save(model, path, fmt, pruned=PRUNED):
    model.config.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["BertForQuestionAnswering"]
    cfg["pruned_heads"] = {str(k): v for k, v in pruned.items()}  # as JSON stores transformers 4's dict
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    sd = _pruned_state_dict(model)
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
    """`bsbert bench --model DIR` (BERT-large's vocabulary: the bench feeds the dense model's token ids)."""
    _save(_masked_dense(vocab=30522), str(tmp_path / "ckpt"), "safetensors")
    assert main(["bench", "--small", "--model", str(tmp_path / "ckpt"), "--seq", "16", "--repeats", "1",
                 "--select", "heuristic", "--out", str(tmp_path / "out")]) == 0
    res = json.loads(next((tmp_path / "out").glob("bench-*.json")).read_text())
    assert res["model"] == str(tmp_path / "ckpt")
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
