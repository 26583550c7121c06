"""Small pruned BERTs for tests (random weights, deterministic) and the masked-dense comparison."""
import pytest
import torch

from bsbert import models


def tiny_config(layers=3, hidden=128, heads=4, ffn=512, attn="sdpa", act="gelu"):
    return models.bert_large_config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                    intermediate_size=ffn, attn_implementation=attn, hidden_act=act,
                                    vocab_size=1000, max_position_embeddings=512)


def tiny_pruned(heads=(2, 0, 4), ffn=(100, 37, 0), task="qa", seed=0, dead_bias_units=True, **cfg):
    cfg.setdefault("layers", len(heads))
    model = models.build_model(tiny_config(**cfg), task=task, seed=seed)
    return models.prune_like_seed(model, heads, ffn, seed=seed, dead_bias_units=dead_bias_units)


def tiny_pruned_distilbert():
    """A 2-layer DistilBERT (hidden 64, vocab 500) with one dead head and pruned FFNs."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.DistilBertModel(tf.DistilBertConfig(dim=64, n_layers=2, n_heads=2, hidden_dim=256,
                                                   vocab_size=500, max_position_embeddings=64)).eval()
    return models.prune_like_seed(model, heads_per_layer=(1, 2), ffn_per_layer=(40, 7))


def inputs(batch=2, seq=37, vocab=1000, pad_from=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    am = torch.ones(batch, seq, dtype=torch.long)
    if pad_from is not None:
        am[-1, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": am}


def logits(out):
    for k in ("start_logits", "logits", "last_hidden_state"):
        if k in out and out[k] is not None:
            parts = [out[k]] + ([out["end_logits"]] if k == "start_logits" else [])
            return torch.cat([p.reshape(-1) for p in parts])
    raise KeyError("no logits in model output")


def rel_err(ref, out) -> float:
    r, o = logits(ref).double(), logits(out).double()
    return float((r - o).abs().max() / r.abs().max())


def cpu_isa_levels(bf16_level: bool = False) -> list[str]:
    """BSBERT_CPU_ISA values this machine can run (only "portable" without the extension).
    bf16_level: include "avx512_bf16" where the CPU has it (for kernels with a bf16 path of their own:
    the block-sparse GEMM and the attention kernel; elsewhere it is the same as "avx512")."""
    import os

    from bsbert import _ext

    if not _ext.available():
        return ["portable"]
    old = os.environ.pop("BSBERT_CPU_ISA", None)
    try:
        best = _ext.load(warn=False).cpu_isa()
    finally:
        if old is not None:
            os.environ["BSBERT_CPU_ISA"] = old
    top = {"portable": 0, "avx2": 1, "avx512": 2, "avx512_bf16": 3 if bf16_level else 2}[best]
    return ["portable", "avx2", "avx512", "avx512_bf16"][: top + 1]


def with_threads(n: int, fn):
    """fn() run with torch.set_num_threads(n), the previous count restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def qa_outputs_itself(monkeypatch):
    """For tests that compare forward paths bit for bit: the lean QA forward's head (bsbert::head_logits) sums
    in another order than F.linear (its own tests: test_lean_model.py), so there qa_outputs runs itself."""
    from bsbert import lean_model

    monkeypatch.setattr(lean_model, "_head_logits", lambda *a: None)
