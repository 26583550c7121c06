"""bsbert.lean_model: a patched BertModel's lean forward gives bit for bit what transformers' forward gives
with the same modules, and hands every call it does not reproduce to transformers."""
import pytest
import torch

import bsbert
from bsbert import _ext, fused_encoder, lean_model
from tests.helpers import inputs, tiny_pruned

needs_op = pytest.mark.skipif(not _ext.has_op("bert_encoder"),
                              reason=f"bsbert::bert_encoder unavailable: {_ext.reason_unavailable()}")


def _patched(**kw):
    model = tiny_pruned(heads=(2, 3, 4), ffn=(100, 37, 64))
    bsbert.patch(model, progress=False, attention="cpu", select="heuristic", **kw)
    return model


def _both(model, inp, **kw):
    """(lean, transformers') outputs of the same patched model, and whether the lean run used the op."""
    bert = model.bert
    assert lean_model.installed(bert)
    with torch.inference_mode():
        lean = model(**inp, **kw)
        lean_model.detach(bert)
        try:
            ref = model(**inp, **kw)
        finally:
            lean_model.attach(bert)
    return lean, ref


def _count_fallbacks(monkeypatch, bert):
    calls = []
    orig = type(bert).forward

    def counting(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)
    monkeypatch.setattr(type(bert), "forward", counting)
    return calls


@needs_op
@pytest.mark.parametrize("pad_from", [None, 7])
@pytest.mark.parametrize("with_types", [False, True])
def test_bit_for_bit_transformers_forward(monkeypatch, pad_from, with_types):
    model = _patched()
    assert model.bsbert_plan.lean_model, model.bsbert_plan.lean_model_reason
    inp = inputs(batch=2, seq=21, pad_from=pad_from)
    if with_types:
        inp["token_type_ids"] = (torch.arange(21) > 10).long().expand(2, 21).contiguous()
        inp["position_ids"] = torch.arange(21).expand(2, 21).contiguous()
    calls = _count_fallbacks(monkeypatch, model.bert)
    monkeypatch.setattr(lean_model, "_head_logits", lambda *a: None)  # qa_outputs itself (tested below)
    lean, ref = _both(model, inp)
    assert len(calls) == 1  # the lean run did not call transformers' forward, the reference did
    assert torch.equal(lean.start_logits, ref.start_logits) and torch.equal(lean.end_logits, ref.end_logits)


@needs_op
def test_hands_other_calls_to_transformers(monkeypatch):
    model = _patched()
    inp = inputs(batch=1, seq=12, pad_from=9)
    calls = _count_fallbacks(monkeypatch, model.bert)
    with torch.inference_mode():
        out = model(**inp, output_hidden_states=True)
        assert len(calls) == 1 and len(out.hidden_states) == 4
        emb = model.bert.embeddings.word_embeddings(inp["input_ids"])
        model(inputs_embeds=emb, attention_mask=inp["attention_mask"])
        assert len(calls) == 2
        tup = model(**inp, return_dict=False)  # the QA head makes the tuple: BertModel still returns a dict
        assert len(calls) == 2 and isinstance(tup, tuple)
        assert isinstance(model.bert(**inp, return_dict=False), tuple)
        assert len(calls) == 3
        four_d = inp["attention_mask"][:, None, None, :].bool()
        model(input_ids=inp["input_ids"], attention_mask=four_d)
        assert len(calls) == 4
        h = model.bert.encoder.layer[0].output.register_forward_hook(lambda *a: None)
        try:
            model(**inp)  # the fused encoder steps aside for hooks, so the lean form does too
        finally:
            h.remove()
        assert len(calls) == 5
        model(**inp)
        assert len(calls) == 5


@needs_op
def test_repr_verify_unpatch_and_off_switch():
    model = _patched(verify=True)
    assert model.bsbert_verify_report.passed and lean_model.installed(model.bert)
    assert "lean model forward" in repr(model.bert).splitlines()[0] + repr(model.bert)
    assert "lean forward" in model.bsbert_plan.table(16)
    bsbert.unpatch(model)
    assert not lean_model.installed(model.bert) and "_bsbert_output_type" not in vars(model.bert)
    off = _patched(fused_encoder=False)
    assert not off.bsbert_plan.lean_model and not lean_model.installed(off.bert)
    assert not fused_encoder.installed(off.bert.encoder)


def test_other_model_classes_keep_their_forward():
    from tests.helpers import tiny_pruned_distilbert

    model = tiny_pruned_distilbert()
    assert lean_model.applies(model, getattr(model, "transformer", None)) is not None


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qa_head_lean_forward_bit_for_bit(monkeypatch, dtype):
    model = tiny_pruned(heads=(2, 3, 4), ffn=(100, 37, 64)).to(dtype)
    bsbert.patch(model, progress=False, attention="cpu", select="heuristic")
    assert lean_model.installed(model) and lean_model.installed(model.bert)
    assert "lean question-answering forward" in repr(model).splitlines()[0] + repr(model)
    inp = inputs(batch=2, seq=19, pad_from=11)
    calls = _count_fallbacks(monkeypatch, model)
    monkeypatch.setattr(lean_model, "_head_logits", lambda *a: None)  # qa_outputs itself (tested below)
    with torch.inference_mode():
        lean = model(**inp)
        assert calls == []  # the head's lean form ran, not transformers' forward
        lean_model.detach(model)
        ref = model(**inp)
        lean_model.attach(model)
    assert len(calls) == 1 and type(lean) is type(ref)
    assert torch.equal(lean.start_logits, ref.start_logits) and torch.equal(lean.end_logits, ref.end_logits)
    assert lean.loss is None and lean.hidden_states is None and list(lean.keys()) == list(ref.keys())


@needs_op
def test_qa_head_hands_other_calls_to_transformers(monkeypatch):
    model = _patched()
    inp = inputs(batch=2, seq=12)
    calls = _count_fallbacks(monkeypatch, model)
    with torch.inference_mode():
        pos = torch.tensor([1, 3])
        out = model(**inp, start_positions=pos, end_positions=pos)  # a loss to compute
        assert len(calls) == 1 and out.loss is not None
        assert isinstance(model(**inp, return_dict=False), tuple) and len(calls) == 2
        assert len(model(**inp, output_hidden_states=True).hidden_states) == 4 and len(calls) == 3
        h = model.bert.register_forward_hook(lambda *a: None)
        try:
            model(**inp)  # a hook on bert: transformers' forward calls it
        finally:
            h.remove()
        assert len(calls) == 4
        seen = []
        h = model.qa_outputs.register_forward_hook(lambda *a: seen.append(1))
        model(**inp)  # the head's own module still runs (and its hooks)
        h.remove()
        assert len(calls) == 4 and seen == [1]


@needs_op
def test_qa_head_lean_forward_off_with_verify_and_unpatch():
    model = _patched(verify=True)
    assert model.bsbert_verify_report.passed and lean_model.installed(model)
    bsbert.unpatch(model)
    assert not lean_model.installed(model) and "_bsbert_output_type" not in vars(model)
    assert "lean question-answering" not in repr(model)


def _head_errors(model, inp):
    """Max |error| against a float64 head on the same encoder output: of the lean forward's start/end
    logits and of torch's F.linear in the model's dtype; and the typical rounding error of such a sum
    in fp32 (sqrt(K) * eps * max sum |x w|): both sum the K products in fp32, in different orders."""
    with torch.inference_mode():
        out = model(**inp)
        seq = model.bert(**inp).last_hidden_state
        w, b = model.qa_outputs.weight, model.qa_outputs.bias
        ref = (seq.double() @ w.double().T + b.double())
        torch_err = (torch.nn.functional.linear(seq, w, b).double() - ref).abs().max().item()
        ours = torch.stack([out.start_logits, out.end_logits], -1).double()
        abs_sum = (seq.double().abs() @ w.double().abs().T).max().item()
        fp32_sum_err = seq.shape[-1] ** 0.5 * torch.finfo(torch.float32).eps * abs_sum
        return (ours - ref).abs().max().item(), torch_err, fp32_sum_err


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qa_head_op_error_at_most_twice_torchs(monkeypatch, dtype):
    """The lean QA forward's head runs as bsbert::head_logits: its error against a float64 head on the same
    encoder output is at most 2x F.linear's in the same dtype, plus the fp32 summation's typical error
    (the orders differ) and, for bf16 outputs, one rounding step."""
    calls = []
    op = torch.ops.bsbert.head_logits
    monkeypatch.setattr(torch.ops.bsbert, "head_logits", lambda *a: calls.append(1) or op(*a))
    model = tiny_pruned(heads=(2, 3, 4), ffn=(100, 37, 64), seed=4).to(dtype)
    bsbert.patch(model, progress=False, attention="cpu", select="heuristic")
    for seq, pad in ((19, 11), (1, None), (64, 30)):
        inp = inputs(batch=2, seq=seq, pad_from=pad, seed=seq)
        ours, theirs, sum_err = _head_errors(model, inp)
        assert calls, "the lean forward did not use bsbert::head_logits"
        calls.clear()
        with torch.inference_mode():
            scale = model(**inp).start_logits.abs().max().item()
        step = torch.finfo(dtype).eps * scale if dtype == torch.bfloat16 else 0.0
        assert ours <= 2 * theirs + sum_err + step, (ours, theirs, sum_err)


@needs_op
def test_qa_head_op_follows_the_module():
    """The head reads qa_outputs' weight as it is on each call (changed in place, or the module replaced); a
    module that is not a plain 2-output nn.Linear, a hook on it or autograd mode run qa_outputs itself."""
    model = _patched()
    inp = inputs(batch=1, seq=15)

    def logits():
        with torch.inference_mode():
            o = model(**inp)
        return torch.stack([o.start_logits, o.end_logits], -1)

    def reference():
        with torch.inference_mode():
            seq = model.bert(**inp).last_hidden_state
            return model.qa_outputs(seq)

    first = logits()
    assert torch.allclose(first, reference(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model.qa_outputs.weight.mul_(-2)  # in place: the version counter moves
    assert torch.allclose(logits(), reference(), rtol=1e-5, atol=1e-6) and not torch.allclose(logits(), first)
    model.qa_outputs = torch.nn.Linear(model.config.hidden_size, 2)  # a new module
    assert torch.allclose(logits(), reference(), rtol=1e-5, atol=1e-6)

    class MyHead(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    model.qa_outputs = MyHead(model.config.hidden_size, 2)
    with torch.inference_mode():
        seq = model.bert(**inp).last_hidden_state
        want = torch.nn.functional.linear(seq, model.qa_outputs.weight, model.qa_outputs.bias) + 1.0
    assert torch.equal(logits(), torch.stack(want.split(1, -1), -1).squeeze(-2))
    model.qa_outputs = torch.nn.Linear(model.config.hidden_size, 2)
    seen = []
    h = model.qa_outputs.register_forward_hook(lambda *a: seen.append(1))
    logits()
    h.remove()
    assert seen == [1]
    out = model(**inp)  # autograd on: qa_outputs itself, so the logits carry its graph
    assert out.start_logits.requires_grad


def _double_output(mod, args, out):
    if isinstance(out, torch.Tensor):
        return out * 2
    out.last_hidden_state = out.last_hidden_state * 2
    return out


def _halve_input(mod, args, kwargs):
    if args:
        return (args[0] * 0.5,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * 0.5}


@needs_op
@pytest.mark.parametrize("task", ["qa", "base", "cls"])
@pytest.mark.parametrize("kind", ["hook", "pre_hook"])
def test_hooks_on_the_encoder_itself_run(monkeypatch, task, kind):
    # the lean forms call the encoder's op, not the encoder module: with a hook on the encoder they hand
    # the call to transformers (the hook ran never and the output was off by 0.50 before)
    monkeypatch.setattr(lean_model, "_head_logits", lambda *a: None)  # qa_outputs itself: bit for bit
    model = tiny_pruned(heads=(2, 3, 4), ffn=(100, 37, 64), task=task)
    bsbert.patch(model, progress=False, attention="cpu", select="heuristic")
    bert = model if task == "base" else model.bert
    assert lean_model.installed(bert)
    inp = inputs(batch=2, seq=13, pad_from=6)
    with torch.inference_mode():
        plain = model(**inp)
    seen = []
    if kind == "hook":
        h = bert.encoder.register_forward_hook(lambda *a: (seen.append(1), _double_output(*a))[1])
    else:
        h = bert.encoder.register_forward_pre_hook(lambda *a: (seen.append(1), _halve_input(*a))[1],
                                                   with_kwargs=True)
    try:
        lean, ref = _both_of(model, bert, inp)
    finally:
        h.remove()
    assert seen == [1, 1]
    key = "last_hidden_state" if task == "base" else ("start_logits" if task == "qa" else "logits")
    assert torch.equal(lean[key], ref[key]) and not torch.equal(lean[key], plain[key])


def _both_of(model, bert, inp):
    with torch.inference_mode():
        lean = model(**inp)
        lean_model.detach(bert)
        try:
            ref = model(**inp)
        finally:
            lean_model.attach(bert)
    return lean, ref


class _Twice(torch.nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 2


def _subclassed(emb, name):
    old = getattr(emb, name)
    new = _Twice(old.num_embeddings, old.embedding_dim)
    new.weight = old.weight
    setattr(emb, name, new)


class _Halve(torch.nn.Module):
    def forward(self, x):
        return x * 0.5


@needs_op
@pytest.mark.parametrize("edit", [
    lambda e: _subclassed(e, "word_embeddings"),
    lambda e: _subclassed(e, "position_embeddings"),
    lambda e: _subclassed(e, "token_type_embeddings"),
    lambda e: setattr(e.word_embeddings, "max_norm", 0.1),
    lambda e: setattr(e, "dropout", _Halve()),
    lambda e: e.dropout.train(),
    lambda e: setattr(e.LayerNorm, "forward", lambda x: torch.nn.functional.layer_norm(x, (128,)) * 2),
    lambda e: e.token_type_ids.fill_(1),
    lambda e: e.position_ids.add_(1),
], ids=["word_subclass", "position_subclass", "type_subclass", "max_norm", "dropout_module", "dropout_training",
        "instance_forward", "type_ids_buffer", "position_ids_buffer"])
def test_embeddings_op_steps_aside_for_what_it_does_not_compute(monkeypatch, edit):
    # bsbert::bert_embeddings is nn.Embedding lookups + LayerNorm with default ids 0.. and type 0: another
    # module or forward, a renormalising embedding, a dropout at work or edited default-id buffers made
    # it compute something else (rel err up to 0.69); the module runs instead
    model = _patched()
    inp = inputs(batch=2, seq=13, pad_from=6)
    monkeypatch.setattr(lean_model, "_head_logits", lambda *a: None)
    with torch.inference_mode():
        plain = model(**inp)
        edit(model.bert.embeddings)
        torch.manual_seed(0)
        lean = model(**inp)
        lean_model.detach(model.bert)
        torch.manual_seed(0)
        ref = model(**inp)
        lean_model.attach(model.bert)
        assert lean_model._embeddings_op(model.bert.embeddings, inp["input_ids"], None, None, torch.float32) is None
    assert torch.equal(lean.start_logits, ref.start_logits) and not torch.equal(lean.start_logits, plain.start_logits)


@needs_op
def test_embeddings_op_checks_the_default_id_buffers_once_per_version():
    model = _patched()
    emb = model.bert.embeddings
    ids = inputs(batch=1, seq=7)["input_ids"]
    with torch.inference_mode():
        assert lean_model._embeddings_op(emb, ids, None, None, torch.float32) is not None
        seen = emb.__dict__["_bsbert_default_ids"]
        assert lean_model._embeddings_op(emb, ids, None, None, torch.float32) is not None
        assert emb.__dict__["_bsbert_default_ids"] is seen  # nothing changed: not looked at again
        emb.token_type_ids[0, 3] = 1
        assert lean_model._embeddings_op(emb, ids, None, None, torch.float32) is None
        assert lean_model._embeddings_op(emb, ids, torch.zeros_like(ids), None, torch.float32) is not None
        emb.token_type_ids.zero_()
        assert lean_model._embeddings_op(emb, ids, None, None, torch.float32) is not None


@needs_op
def test_a_hooked_forward_computes_the_embeddings_once():
    # with a hook on a layer module the lean QA forward ran bsbert::bert_embeddings, the lean BertModel forward
    # ran it again, and transformers' forward computed them a third time
    from tests.helpers import OpCounter

    model = _patched()
    inp = inputs(batch=2, seq=9, pad_from=5)
    model.bert.encoder.layer[0].output.register_forward_hook(lambda *a: None)
    counter = OpCounter()
    with torch.inference_mode(), counter:
        model(**inp)
    assert counter.calls["bsbert::bert_embeddings"] + counter.calls["aten::embedding"] // 3 == 1, counter.calls
