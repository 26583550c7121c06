"""Odd checkpoints and models given to load_local / analyze / patch: each is loaded as what it is, or refused
with an error naming the problem (never a random model, a model without its task head, or a raw traceback)."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification,
                          BertModel)
from transformers.models.bert.modeling_bert import BertEncoder

import bsbert
from bsbert import checkpoints, models
from bsbert.adapters import find_encoder
from bsbert.cli import main
from bsbert.errors import BsbertError, UnsupportedModelError
from tests.test_checkpoints import PRUNED, _mask_heads, _masked_dense, _save

SMALL = dict(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64)


def _save_plain(model, path, sd=None, fmt="safetensors"):
    """A transformers-5 checkpoint (full-size tensors, no pruned_heads), with ``sd`` instead of the model's own."""
    os.makedirs(path, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(path)
    sd = {k: v.clone().contiguous() for k, v in (sd if sd is not None else model.state_dict()).items()}
    if fmt == "safetensors":
        save_file(sd, os.path.join(path, "model.safetensors"))
    else:
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))


def _edit_config(path, **edits):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(edits)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def _exit(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err, err
    return err


# 1. the class config.json's architectures names, in both load paths
@pytest.mark.parametrize("pruned", [False, True], ids=["plain", "pruned_heads"])
@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForTokenClassification, BertForMaskedLM])
def test_task_head_checkpoint_loads_with_its_head(tmp_path, cls, pruned):
    # before: every class but QuestionAnswering came back as a bare BertModel (MaskedLM with a random pooler)
    torch.manual_seed(0)
    ref = _mask_heads(cls(BertConfig(num_labels=3, **SMALL)).eval(), "bert")
    if pruned:
        _save(ref, str(tmp_path), "safetensors")
    else:
        _save_plain(ref, str(tmp_path))
    got = models.load_local(str(tmp_path))
    assert type(got) is cls
    assert got.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k


def test_unknown_architecture_falls_back_to_the_base_model(tmp_path):
    torch.manual_seed(0)
    ref = BertModel(BertConfig(**SMALL)).eval()
    _save_plain(ref, str(tmp_path))
    _edit_config(str(tmp_path), architectures=["MyOwnBertThing"])
    assert type(models.load_local(str(tmp_path))) is BertModel


# 2. tensor names that do not match the model
@pytest.mark.parametrize("pruned", [False, True], ids=["plain", "pruned_heads"])
def test_ddp_prefixed_checkpoint_is_refused(tmp_path, pruned, capsys):
    # before: every weight initialised randomly (a warning), exit 0, analyze / bench on a random model
    ref = _masked_dense()
    d = str(tmp_path / "ckpt")
    if pruned:
        _save(ref, d, "safetensors")
        sd = load_file(os.path.join(d, "model.safetensors"))
        save_file({"module." + k: v for k, v in sd.items()}, os.path.join(d, "model.safetensors"))
    else:
        _save_plain(ref, d, sd={"module." + k: v for k, v in ref.state_dict().items()})
    with pytest.raises(BsbertError, match=r"no weights for \d+ encoder / embedding tensors.*'module\.bert\."):
        models.load_local(d)
    assert "no weights for" in _exit(["analyze", "--model", d], capsys)


def test_one_missing_encoder_tensor_is_refused(tmp_path):
    ref = _masked_dense()
    sd = dict(ref.state_dict())
    del sd["bert.encoder.layer.1.intermediate.dense.weight"]
    _save_plain(ref, str(tmp_path), sd=sd)
    with pytest.raises(BsbertError, match=r"bert\.encoder\.layer\.1\.intermediate\.dense\.weight"):
        models.load_local(str(tmp_path))


def test_missing_task_head_stays_a_warning(tmp_path):
    # transformers initialises a fresh head on purpose (a base checkpoint fine-tuned from here): not refused
    torch.manual_seed(0)
    ref = BertForSequenceClassification(BertConfig(**SMALL)).eval()
    _save_plain(ref, str(tmp_path), sd={k: v for k, v in ref.state_dict().items() if not k.startswith("classifier.")})
    got = models.load_local(str(tmp_path))
    assert torch.equal(got.bert.encoder.layer[0].output.dense.weight, ref.bert.encoder.layer[0].output.dense.weight)


# 3. bad config values
@pytest.mark.parametrize("pruned", [False, True], ids=["plain", "pruned_heads"])
@pytest.mark.parametrize("edit", [{"num_attention_heads": "4"}, {"hidden_size": None}, {"num_attention_heads": 0},
                                  {"num_attention_heads": -4}], ids=["str", "null", "zero", "negative"])
def test_bad_config_values_are_named(tmp_path, edit, pruned):
    # before: huggingface_hub's StrictDataclassFieldValidationError (no ValueError), a ZeroDivisionError
    ref = _masked_dense()
    if pruned:
        _save(ref, str(tmp_path), "safetensors")
    else:
        _save_plain(ref, str(tmp_path))
    _edit_config(str(tmp_path), **edit)
    with pytest.raises(BsbertError, match=next(iter(edit))):
        models.load_local(str(tmp_path))


@pytest.mark.parametrize("heads", ["4", 0])
def test_cli_bad_config_is_one_line(tmp_path, heads, capsys):
    _save_plain(_masked_dense(), str(tmp_path))
    _edit_config(str(tmp_path), num_attention_heads=heads)
    err = _exit(["analyze", "--model", str(tmp_path)], capsys)
    assert "num_attention_heads" in err and len(err.strip().splitlines()) == 1, err


# 4. broken / odd pytorch_model.bin
def _write_bad_bin(path, kind, model):
    p = os.path.join(path, "pytorch_model.bin")
    if kind == "whole_model":
        torch.save(model, p)
    elif kind == "garbage":
        with open(p, "wb") as f:
            f.write(b"not a checkpoint at all" * 10)
    elif kind == "empty":
        open(p, "wb").close()
    elif kind == "list":
        torch.save([torch.zeros(2)], p)
    else:
        torch.save({"w": [1, 2]}, p)


@pytest.mark.parametrize("pruned", [False, True], ids=["plain", "pruned_heads"])
@pytest.mark.parametrize("kind", ["whole_model", "garbage", "empty", "list", "dict_of_lists"])
def test_bad_bin_is_named(tmp_path, kind, pruned):
    # before: EOFError, UnpicklingError, TypeError, AttributeError from torch / transformers / this module
    ref = _masked_dense()
    if pruned:
        _save(ref, str(tmp_path), "bin")
    else:
        _save_plain(ref, str(tmp_path), fmt="bin")
    _write_bad_bin(str(tmp_path), kind, ref)
    # (transformers itself reads a dict of lists, which has none of the model's tensors then)
    also = "|no weights for" if kind == "dict_of_lists" and not pruned else ""
    with pytest.raises(BsbertError, match=r"pytorch_model\.bin is corrupt or not a weights file" + also):
        models.load_local(str(tmp_path))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin is corrupt or not a weights file"):
        checkpoints.read_state_dict(str(tmp_path))


def test_cli_bad_bin_is_one_line(tmp_path, capsys):
    ref = _masked_dense()
    _save_plain(ref, str(tmp_path), fmt="bin")
    _write_bad_bin(str(tmp_path), "whole_model", ref)
    err = _exit(["analyze", "--model", str(tmp_path)], capsys)
    assert "corrupt or not a weights file" in err and len(err.strip().splitlines()) == 1, err


# 5. two encoders in one model
class _Dual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        cfg = BertConfig(**dict(SMALL, num_hidden_layers=2))
        self.q = models.prune_like_seed(models.build_model(cfg, task="base", seed=0), [2, 3], [40, 60], seed=0)
        self.p = models.prune_like_seed(models.build_model(cfg, task="base", seed=1), [1, 2], [30, 50], seed=1)


def test_two_encoders_are_refused():
    # before: the first encoder was patched, the second left dense, silently
    model = _Dual().eval()
    before = copy.deepcopy(model.state_dict())
    for fn in (bsbert.analyze, lambda m: bsbert.patch(m, progress=False, select="heuristic")):
        with pytest.raises(UnsupportedModelError, match=r"2 encoders \('q\.encoder', 'p\.encoder'\)"):
            fn(model)
    assert not getattr(model, "_bsbert_patched", False)
    assert type(model.q.encoder.layer[0].attention.self).__name__ == "BertSelfAttention"
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


# 6. a user's class that shares a name with transformers' encoder classes
def _named(class_name):
    cls = type(class_name, (torch.nn.Module,), {})
    enc = cls()
    enc.layer = torch.nn.ModuleList([torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)])
    model = torch.nn.Module()
    model.emb, model.encoder = torch.nn.Embedding(100, 64), enc
    return model


@pytest.mark.parametrize("class_name", ["Transformer", "BertEncoder"])
def test_user_class_with_an_encoder_name_is_not_taken_for_one(class_name):
    # before: a `Transformer` was taken for DistilBERT's and failed with an AttributeError inside
    model = _named(class_name)
    for fn in (bsbert.analyze, lambda m: bsbert.patch(m, progress=False)):
        with pytest.raises(UnsupportedModelError, match="is not supported"):
            fn(model)


def test_subclass_of_transformers_encoder_is_found():
    class MyEncoder(BertEncoder):
        pass

    model = BertModel(BertConfig(**SMALL))
    model.encoder = MyEncoder(model.config)
    assert find_encoder(model)[0] == "encoder"


# 7. safetensors before a stale pytorch_model.bin
def test_sharded_safetensors_win_over_a_stale_bin(tmp_path):
    # before: single files were tried first, so a leftover pytorch_model.bin beat the sharded safetensors
    # (which transformers itself reads)
    ref = _masked_dense()
    _save(ref, str(tmp_path), "sharded")
    stale = _masked_dense(seed=5)
    torch.save({k: v.contiguous() for k, v in stale.state_dict().items()}, str(tmp_path / "pytorch_model.bin"))
    got = models.load_local(str(tmp_path))
    assert torch.equal(got.qa_outputs.weight, ref.qa_outputs.weight)
    assert torch.equal(checkpoints.read_state_dict(str(tmp_path))["qa_outputs.weight"], ref.qa_outputs.weight)


# 8. the seed-like builders
def test_build_model_unknown_task():
    with pytest.raises(ValueError, match=r"task must be one of 'qa', 'cls', 'base', got 'mlm'"):
        models.build_model(BertConfig(**SMALL), task="mlm")


def test_seed_like_model_hidden_smaller_than_a_block():
    # before: a bare StopIteration (no 32x32 tile to keep in a 16-wide layer)
    with pytest.raises(ValueError, match="hidden size 16 is smaller than the 32x32 pruning block"):
        models.seed_like_model(hidden_size=16, num_attention_heads=1, num_hidden_layers=1, intermediate_size=32,
                               vocab_size=100)


# 9. analyze at a --seq past the position table
def test_analyze_refuses_a_seq_past_the_positions(tmp_path, capsys):
    # before: FLOPs printed for 100 tokens of a model that embeds at most 64
    _save_plain(_masked_dense(), str(tmp_path))
    err = _exit(["analyze", "--model", str(tmp_path), "--seq", "100"], capsys)
    assert "--seq 100" in err and "at most 64 tokens" in err, err
    assert main(["analyze", "--model", str(tmp_path), "--seq", "64"]) == 0


# 10. pruned_heads keys
@pytest.mark.parametrize("raw", [{"0": [1], "00": [2]}, {"0": [1], " 0": [2]}], ids=["00", "space"])
def test_pruned_heads_duplicate_layer(raw):
    # before: both keys were layer 0, the last list silently replaced the first
    with pytest.raises(ValueError, match="two entries for layer 0"):
        checkpoints.pruned_heads({"pruned_heads": raw})


@pytest.mark.parametrize("raw", [{"0": ["²"]}, {"²": [1]}], ids=["head", "layer"])
def test_pruned_heads_non_ascii_digit(raw):
    # before: "²".isdigit() passed, then int() raised its own "invalid literal" error
    with pytest.raises(ValueError, match="is not a list of head indices"):
        checkpoints.pruned_heads({"pruned_heads": raw})


def test_pruned_heads_still_parse():
    assert checkpoints.pruned_heads({"pruned_heads": {str(k): v for k, v in PRUNED.items()}}) == PRUNED
