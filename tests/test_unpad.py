"""patch(unpad=True): real tokens exact vs the padded model; padded positions zero."""

import pytest
import torch

import bsbert
from tests.helpers import tiny_pruned, tiny_pruned_distilbert


def _mixed_batch(lengths, seq, vocab=1000, seed=0, left=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lengths), seq), generator=g)
    am = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            am[i, seq - n:] = 1
        else:
            am[i, :n] = 1
    return {"input_ids": ids, "attention_mask": am}


def _hidden(model, inp):
    with torch.inference_mode():
        return model.bert(**inp).last_hidden_state


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("attention", ["torch-sdpa", "triton", "cpu"])
def test_unpadded_matches_padded(left, attention):
    from bsbert.ops.attention_backends import ATTENTION_BACKENDS

    # (triton: not installed, as with a CPU build of torch, or no interpreter; cpu: no extension)
    why = ATTENTION_BACKENDS[attention].not_supported_reasons(torch.device("cpu"), torch.float32, 32)
    if why:
        pytest.skip(f"{attention} attention: {why}")
    model = tiny_pruned(heads=(2, 4, 1), ffn=(50, 20, 7))
    inp = _mixed_batch([1, 17, 31, 9], seq=31, left=left)
    ref = _hidden(model, inp)
    bsbert.patch(model, select="heuristic", progress=False, unpad=True, attention=attention)
    assert model.bsbert_plan.unpad
    out = _hidden(model, inp)
    keep = inp["attention_mask"].bool()
    err = ((out - ref)[keep].abs().max() / ref[keep].abs().max()).item()
    assert err <= 1e-4
    if left:  # position 0 is padding in some rows: the padded forward ran (pooler / first-token heads read it)
        assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    else:
        assert torch.count_nonzero(out[~keep]) == 0
    # no padding at all: the normal path, still exact
    full = _mixed_batch([12, 12], seq=12)
    bsbert.unpatch(model)
    ref_full = _hidden(model, full)
    bsbert.patch(model, select="heuristic", progress=False, unpad=True, attention=attention)
    assert ((_hidden(model, full) - ref_full).abs().max() / ref_full.abs().max()).item() <= 1e-4


def test_unpad_verify_and_unpatch_restore_forward():
    model = tiny_pruned()
    bsbert.patch(model, select="heuristic", progress=False, unpad=True)
    enc = model.bert.encoder
    assert "forward" in vars(enc)
    rep = bsbert.verify(model)  # verify compares real-token logits: padded rows differ by design
    assert "forward" in vars(enc)  # verify put the unpadded forward back
    assert rep.passed, str(rep)
    assert "padding-free encoder" in repr(enc)  # print(model) says which forward runs (it said nothing)
    bsbert.unpatch(model)
    assert "forward" not in vars(enc) and "extra_repr" not in vars(enc) and "padding-free" not in repr(model)


def test_unpadded_distilbert():
    model = tiny_pruned_distilbert()
    inp = _mixed_batch([3, 20, 11], seq=20, vocab=500)
    with torch.inference_mode():
        ref = model(**inp).last_hidden_state
    bsbert.patch(model, select="heuristic", progress=False, unpad=True)
    with torch.inference_mode():
        out = model(**inp).last_hidden_state
    keep = inp["attention_mask"].bool()
    assert ((out - ref)[keep].abs().max() / ref[keep].abs().max()).item() <= 1e-4
    # the same output type with or without padding (BaseModelOutput, not BERT's type for padded batches)
    with torch.inference_mode():
        full = model(**_mixed_batch([20, 20, 20], seq=20, vocab=500))
        padded = model(**inp)
    assert type(padded) is type(full) is type(model.transformer).forward(
        model.transformer, torch.zeros(1, 1, 64)).__class__


def test_unpadded_model_still_returns_hidden_states():
    # transformers collects hidden states through hooks on the layers, which the padding-free forward
    # does not call: such a call takes the padded forward (it returned none before).
    model = tiny_pruned(heads=(2, 4), ffn=(50, 20))
    inp = _mixed_batch([3, 11], seq=11)
    with torch.inference_mode():
        ref = model.bert(**inp, output_hidden_states=True).hidden_states
    bsbert.patch(model, select="heuristic", progress=False, unpad=True, attention="torch-sdpa")
    with torch.inference_mode():
        got = model.bert(**inp, output_hidden_states=True).hidden_states
    assert len(got) == len(ref) == 3
    for r, g in zip(ref, got):
        assert torch.allclose(r, g, atol=1e-5, rtol=1e-4)


def _doubling(seen):
    def hook(mod, args, out):
        seen.append(type(mod).__name__)
        return out * 2 if isinstance(out, torch.Tensor) else (out[0] * 2,) + tuple(out[1:])
    return hook


@pytest.mark.parametrize("where", ["", "attention.self", "output", "global"], ids=["layer", "self", "output", "global"])
def test_unpadded_forward_runs_hooks(where):
    # the padding-free forward calls the layers' parts directly: a hook on a layer (or a part it does not
    # call as a module) never ran and the output was off by 0.94; such a call takes the padded forward
    model = tiny_pruned(heads=(2, 4, 1), ffn=(50, 20, 7))
    inp = _mixed_batch([3, 17, 9], seq=17)
    bsbert.patch(model, select="heuristic", progress=False, unpad=True, attention="torch-sdpa")
    plain = _hidden(model, inp)
    seen = []
    if where == "global":
        from torch.nn.modules.module import register_module_forward_hook

        h = register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__) if m is target else None)
        target = model.bert.encoder.layer[1].attention.self
    else:
        h = model.bert.encoder.layer[1].get_submodule(where).register_forward_hook(_doubling(seen))
    try:
        out = _hidden(model, inp)
    finally:
        h.remove()
    keep = inp["attention_mask"].bool()
    if where == "global":  # (an observing hook: the values stay, the hook sees the module called)
        assert seen == ["PrunedSelfAttention"]
        assert ((out - plain)[keep].abs().max() / plain[keep].abs().max()).item() <= 1e-6
        return
    assert len(seen) == 1
    bsbert.unpatch(model)  # the reference: the dense model with the same hook on the same place
    h = model.bert.encoder.layer[1].get_submodule(where).register_forward_hook(_doubling(seen))
    try:
        ref = _hidden(model, inp)
    finally:
        h.remove()
    assert len(seen) == 2
    assert ((out - ref)[keep].abs().max() / ref[keep].abs().max()).item() <= 1e-4
    assert not torch.allclose(out[keep], plain[keep])
    bsbert.patch(model, select="heuristic", progress=False, unpad=True, attention="torch-sdpa")
    out_again = _hidden(model, inp)  # hook removed: padding-free again, padded rows zero
    assert torch.count_nonzero(out_again[~keep]) == 0


def test_unpadded_forward_sees_hooks_on_replaced_layers():
    # the hook dicts are collected again when a layer (or a layer's part) is replaced
    import copy

    model = tiny_pruned(heads=(2, 4), ffn=(50, 20))
    inp = _mixed_batch([3, 11], seq=11)
    bsbert.patch(model, select="heuristic", progress=False, unpad=True, attention="torch-sdpa")
    _hidden(model, inp)
    seen = []
    new = copy.deepcopy(model.bert.encoder.layer[1])
    new.output.register_forward_hook(lambda *a: seen.append(1))
    model.bert.encoder.layer[1] = new
    out = _hidden(model, inp)
    assert seen == [1]
    keep = inp["attention_mask"].bool()
    assert torch.count_nonzero(out[~keep]) != 0  # the padded forward ran


def test_a_deep_copy_falls_back_to_its_own_layers():
    # The padding-free forward's fallback (the padded forward: here for a batch without padding) runs the
    # copy's layers, not the original's (it was a closure over the original encoder's forward).
    import copy

    model = tiny_pruned(heads=(2, 4), ffn=(50, 20))
    bsbert.patch(model, select="heuristic", progress=False, unpad=True, attention="torch-sdpa")
    twin = copy.deepcopy(model)
    inp = _mixed_batch([11, 11], seq=11)  # no padding: the padded forward runs
    before = _hidden(twin, inp)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.LayerNorm.weight.mul_(3)  # the original changes, the copy not
    assert torch.equal(_hidden(twin, inp), before)
    assert not torch.allclose(_hidden(model, inp), before)


@pytest.mark.parametrize("kind", ["causal", "per-head padding"])
def test_unpadded_model_takes_masks_the_padded_one_takes(kind):
    # the padding-free forward refused every 4-D mask that is not key padding, even with attention="torch-sdpa"
    # (which computes it), and its error told the user to pass exactly that option
    import copy

    model = tiny_pruned(heads=(2, 4, 1), ffn=(50, 20, 7))
    ref_model = copy.deepcopy(model)
    b, s, heads = 2, 9, model.config.num_attention_heads
    ids = torch.randint(5, 1000, (b, s), generator=torch.Generator().manual_seed(0))
    if kind == "causal":
        mask = torch.ones(b, 1, s, s, dtype=torch.bool).tril()
    else:
        keep = torch.ones(b, s, dtype=torch.bool)
        keep[1, 6:] = False
        mask = keep[:, None, None, :].expand(b, heads, s, s)
    with torch.inference_mode():
        ref = ref_model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    bsbert.patch(model, select="heuristic", progress=False, unpad=True, attention="torch-sdpa")
    with torch.inference_mode():
        out = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = slice(None) if kind == "causal" else slice(0, 1)  # a padded row's pad positions are meaningless
    assert ((out - ref)[rows].abs().max() / ref[rows].abs().max()).item() <= 1e-5


@pytest.mark.parametrize("task", ["seqcls", "pooler"])
def test_left_padding_keeps_first_token_heads_exact(task):
    """The padding-free forward leaves padded positions zero; with left padding the pooler / classifier read
    such a position 0 and gave the same logits for any input (1.03 relative off). Such batches now take the
    padded forward; right-padded ones keep the padding-free one."""
    model = tiny_pruned(heads=(2, 4, 1), ffn=(50, 20, 7), task="cls" if task == "seqcls" else "base")

    def run(inp):
        with torch.inference_mode():
            out = model(**inp)
        return out.logits if task == "seqcls" else out.pooler_output

    left = [_mixed_batch([5, 17, 31], seq=31, left=True, seed=s) for s in (0, 1)]
    right = _mixed_batch([5, 17, 31], seq=31, seed=2)
    refs = [run(i) for i in left + [right]]
    bsbert.patch(model, select="heuristic", progress=False, unpad=True)
    for inp, ref in zip(left + [right], refs):
        got = run(inp)
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-4
