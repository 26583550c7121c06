"""bsbert.packed_export: the packing-only structure as plain torch ops equals the masked dense model."""
import copy

import pytest
import torch

from bsbert.errors import UnsupportedModelError
from bsbert.packed_export import PackedBert, packed_bert
from tests.helpers import inputs, logits, rel_err, tiny_pruned, tiny_pruned_distilbert


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("task", ["qa", "base"])
@pytest.mark.parametrize("pad_from", [None, 20])
def test_matches_the_float64_masked_dense_model(task, pad_from):
    # a layer with no kept head and one with no FFN neuron; dead heads / neurons whose biases must be folded
    model = tiny_pruned(heads=(2, 0, 4), ffn=(100, 37, 0), task=task, dead_bias_units=True)
    before = _state(model)
    packed = packed_bert(model)
    assert isinstance(packed, PackedBert) and not packed.training
    assert [layer.heads for layer in packed.layers] == [2, 0, 4]
    assert [layer.ffn_in.out_features for layer in packed.layers] == [100, 37, 0]
    inp = inputs(pad_from=pad_from)
    with torch.inference_mode():
        ref = copy.deepcopy(model).double()(**inp)
        out = packed(inp["input_ids"], inp["attention_mask"])
    out = {"start_logits": out[0], "end_logits": out[1]} if task == "qa" else {"last_hidden_state": out}
    if pad_from is not None:  # padded query rows carry no meaning (as bsbert.verify compares)
        keep = inp["attention_mask"].bool()
        ref = {k: ref[k][keep] for k in out}
        out = {k: v[keep] for k, v in out.items()}
    assert rel_err(ref, out) < 1e-5
    after = model.state_dict()  # the model is not changed
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bf16_within_bf16_rounding():
    model = tiny_pruned(heads=(3, 1, 4), ffn=(200, 37, 5)).to(torch.bfloat16)
    packed = packed_bert(model)
    assert packed.layers[0].qkv.weight.dtype == torch.bfloat16
    inp = inputs()
    with torch.inference_mode():
        ref = copy.deepcopy(model).double()(**inp)
        s, e = packed(inp["input_ids"], inp["attention_mask"])
    assert s.dtype == torch.bfloat16 and rel_err(ref, {"start_logits": s, "end_logits": e}) < 5e-2


def test_logits_shape_and_token_types():
    model = tiny_pruned()
    inp = inputs(batch=3, seq=5)
    tt = torch.ones_like(inp["input_ids"])
    with torch.inference_mode():
        ref = model(**inp, token_type_ids=tt)
        s, e = packed_bert(model)(inp["input_ids"], inp["attention_mask"], tt)
    assert s.shape == e.shape == (3, 5)
    assert rel_err(ref, {"start_logits": s, "end_logits": e}) < 1e-5
    assert logits(ref).shape == (30,)


def test_a_patched_model_is_refused_until_unpatched():
    import bsbert
    from bsbert.errors import AlreadyPatchedError

    model = tiny_pruned()
    bsbert.patch(model, progress=False)
    with pytest.raises(AlreadyPatchedError, match="bsbert.unpatch"):
        packed_bert(model)
    bsbert.unpatch(model)
    assert len(packed_bert(model).layers) == 3


def test_unsupported_models_are_named():
    with pytest.raises(UnsupportedModelError, match="not a BERT-style model"):
        packed_bert(tiny_pruned_distilbert())
    with pytest.raises(UnsupportedModelError, match="BertModel or BertForQuestionAnswering"):
        packed_bert(tiny_pruned(task="cls"))
    with pytest.raises(UnsupportedModelError):
        packed_bert(torch.nn.Linear(3, 3))
    relative = tiny_pruned()
    relative.config.position_embedding_type = "relative_key"
    with pytest.raises(UnsupportedModelError, match="relative_key"):
        packed_bert(relative)


def test_roberta_of_the_same_form_and_electra_with_an_embedding_projection():
    import transformers as tf

    from bsbert import models

    cfg = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    roberta = tf.RobertaForQuestionAnswering(tf.RobertaConfig(max_position_embeddings=40, **cfg)).eval()
    models.prune_like_seed(roberta, (1, 2), (50, 7), block=32)
    ids = torch.randint(3, 100, (2, 11))
    am = torch.ones_like(ids)
    am[1, 7:] = 0
    keep = am.bool()
    with torch.inference_mode():
        ref = roberta(input_ids=ids, attention_mask=am)
        s, e = packed_bert(roberta)(ids, am)  # RoBERTa's own embeddings (position ids from the padding)
    assert rel_err({k: ref[k][keep] for k in ("start_logits", "end_logits")},
                   {"start_logits": s[keep], "end_logits": e[keep]}) < 1e-5
    electra = tf.ElectraModel(tf.ElectraConfig(embedding_size=32, **cfg)).eval()
    with pytest.raises(UnsupportedModelError, match="embeddings_project"):
        packed_bert(electra)
