"""patch / analyze / unpatch / save on models a user might bring that are not a plain transformers BERT: each
either matches its unpatched (masked dense) original or is refused with an error naming the problem, the
model left exactly as it was. Every test here is a finding of an adversarial audit: before its fix the case
crashed, computed a silently different answer, or left the model changed."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import bsbert
from bsbert import models

TOL = 1e-5


def _cfg(**kw):
    import transformers as tf

    d = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=500,
             max_position_embeddings=64)
    d.update(kw)
    return tf.BertConfig(**d)


def _build(cls_name="BertForQuestionAnswering", heads=(1, 2), ffn=(40, 7), **kw):
    import transformers as tf

    torch.manual_seed(0)
    model = getattr(tf, cls_name)(_cfg(**kw)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # pruned checkpoints have real biases (folding needs them)
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.02)
    return models.prune_like_seed(model, heads, ffn, seed=0, dead_bias_units=True)


def _inputs(batch=2, seq=11, pad_from=6):
    g = torch.Generator().manual_seed(0)
    am = torch.ones(batch, seq, dtype=torch.long)
    am[-1, pad_from:] = 0
    return {"input_ids": torch.randint(0, 500, (batch, seq), generator=g), "attention_mask": am}


def _out(model, inp):
    with torch.inference_mode():
        out = model(**inp)
    return torch.cat([v.reshape(-1) for v in out.values() if isinstance(v, torch.Tensor)])


def _rel(ref, out):
    return float((ref - out).abs().max() / ref.abs().max())


def _patch(model):
    return bsbert.patch(model, select="heuristic", progress=False)


def _state(model):
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


def _assert_refused_untouched(model, error, match, inp=None):
    """patch(model) raises ``error`` matching ``match``; the model is as it was (modules, tensors, outputs)."""
    inp = inp or _inputs()
    before_repr, before_state = _state(model)
    ref = _out(model, inp)
    with pytest.raises(error, match=match):
        _patch(model)
    after_repr, after_state = _state(model)
    assert after_repr == before_repr and not bsbert.is_patched(model)
    assert before_state.keys() == after_state.keys() and all(torch.equal(before_state[k], after_state[k])
                                                             for k in before_state)
    assert torch.equal(_out(model, inp), ref)


# ---- decoders the top-level config does not show ----------------------------------------------------

class _Wrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model(**kwargs)


@pytest.mark.parametrize("wrap", ["module", "data-parallel", "flipped-config"])
def test_a_decoder_without_a_decoder_config_on_top_is_refused(wrap):
    # a causal BertLMHeadModel inside a user's wrapper or nn.DataParallel (neither has a config) was patched
    # with bidirectional attention: without a mask its outputs differed by 1.4e-2 (relative), silently
    model = _build("BertLMHeadModel", is_decoder=True)
    if wrap == "module":
        model = _Wrapper(model)
    elif wrap == "data-parallel":
        model = nn.DataParallel(model)
    else:  # built as a decoder, config edited since: the layers still are causal (BertSelfAttention.is_causal)
        model.config = copy.deepcopy(model.config)
        model.config.is_decoder = False
    _assert_refused_untouched(model, bsbert.UnsupportedModelError, "decoder",
                              inp={"input_ids": _inputs()["input_ids"], "use_cache": False})


def test_relative_position_models_are_refused_saying_why():
    # transformers 5 builds such a config as an absolute-position BERT: patch refuses it (saying so) rather
    # than speed up a model that is not the one its checkpoint was trained as
    model = _build(position_embedding_type="relative_key")
    _assert_refused_untouched(model, bsbert.UnsupportedModelError,
                              r"position_embedding_type='relative_key'.*ignores the setting")


# ---- a model whose part is already patched ----------------------------------------------------------

def test_patching_the_whole_after_a_part_names_the_part():
    # patch(model.bert) then patch(model) / analyze(model) stopped with AttributeError "PrunedSelfAttention
    # has no attribute `query`"; unpatch(model) said only "not patched"
    model = _build()
    _patch(model.bert)
    state = _state(model)[0]
    for call in (_patch, bsbert.analyze):
        with pytest.raises(bsbert.AlreadyPatchedError, match="'bert' inside this BertForQuestionAnswering"):
            call(model)
    with pytest.raises(bsbert.NotPatchedError, match="its part 'bert'"):
        bsbert.unpatch(model)
    assert _state(model)[0] == state and bsbert.is_patched(model.bert)


# ---- modules whose computation patch would drop ----------------------------------------------------

class _LoraLinear(nn.Linear):
    """A LoRA-style linear: the base weight plus a low-rank update in its own forward."""

    def __init__(self, base: nn.Linear):
        super().__init__(base.in_features, base.out_features)
        self.weight, self.bias = base.weight, base.bias
        g = torch.Generator().manual_seed(2)
        self.lora_a = nn.Parameter(torch.randn(4, base.in_features, generator=g) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, 4, generator=g) * 0.1)

    def forward(self, x):
        return super().forward(x) + x @ self.lora_a.T @ self.lora_b.T


def _custom_attention(model):
    import transformers.models.bert.modeling_bert as mb

    class HalvedInputAttention(mb.BertSelfAttention):
        def forward(self, hidden_states, attention_mask=None, **kwargs):
            return super().forward(hidden_states * 0.5, attention_mask, **kwargs)

    layer = model.bert.encoder.layer[0]
    new = HalvedInputAttention(model.config).eval()
    new.load_state_dict(layer.attention.self.state_dict())
    layer.attention.self = new


def _instance_forward(model):
    import types

    inter = model.bert.encoder.layer[1].intermediate
    inter.forward = types.MethodType(lambda self, h: type(self).forward(self, h) * 2, inter)


CUSTOM_FORWARDS = {  # each silently changed the patched model's output (1.5e-4 to 1.3e-2 relative) before
    "lora-subclass": lambda m: setattr(m.bert.encoder.layer[0].attention.self, "query",
                                       _LoraLinear(m.bert.encoder.layer[0].attention.self.query)),
    "attention-subclass": _custom_attention,
    "instance-forward": _instance_forward,
}


@pytest.mark.parametrize("case", sorted(CUSTOM_FORWARDS))
def test_modules_with_a_forward_of_their_own_are_refused(case):
    model = _build()
    CUSTOM_FORWARDS[case](model)
    _assert_refused_untouched(model, bsbert.UnsupportedModelError, "has a forward of its own")


def test_quantized_linears_are_refused_naming_the_class():
    # was refused as "expected nn.Linear ..., found Linear": which Linear, and what to do, unsaid
    # torch.ao.quantization is deprecated (torch's own warnings, silenced while the model is built, not
    # around patch) but is still how users build dynamically quantized BERTs; once torch removes it,
    # this case goes with it.
    quantization = pytest.importorskip("torch.ao.quantization")
    if not hasattr(quantization, "quantize_dynamic"):
        pytest.skip("this torch has no torch.ao.quantization.quantize_dynamic")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = quantization.quantize_dynamic(_build(), {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(bsbert.UnsupportedModelError, match=r"query \(torch\.ao\.nn\.quantized\.dynamic.*dequantize"):
        _patch(model)
    assert not bsbert.is_patched(model)


def test_an_attention_function_registered_with_transformers_is_refused():
    # config._attn_implementation naming a user's attention function: patch replaced it by softmax attention
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def doubled_queries(module, q, k, v, mask, **kw):
        return sdpa_attention_forward(module, q * 2, k, v, mask, **kw)

    AttentionInterface.register("bsbert_test_doubled", doubled_queries)
    try:
        model = _build()
        model.config._attn_implementation = "bsbert_test_doubled"
        _assert_refused_untouched(model, bsbert.UnsupportedModelError, "attn_implementation='bsbert_test_doubled'")
    finally:
        AttentionInterface._global_mapping.pop("bsbert_test_doubled", None)


@pytest.mark.parametrize("where", ["attention.self.query", "attention.self", "output", "intermediate.dense"])
def test_hooks_on_modules_patch_replaces_are_refused(where):
    # such a hook silently stopped running (an output-changing one: 1.4e-2 relative off)
    model = _build()
    model.bert.encoder.layer[0].get_submodule(where).register_forward_hook(
        lambda mod, args, out: out * 2 if isinstance(out, torch.Tensor) else out)
    _assert_refused_untouched(model, bsbert.UnsupportedModelError, f"layer.0.{where} .*forward hook")


@pytest.mark.parametrize("when", ["before patch", "after patch"])
def test_hooks_on_the_kept_layer_norm_run(when):
    # DenseAddLayerNorm keeps the output block's LayerNorm module but ran the fused kernels around it: a hook
    # on it was skipped (8.7e-3 relative off)
    model = _build()
    ref = copy.deepcopy(model)
    inp = _inputs()

    def double(mod, args, out):
        return out * 2

    ref.bert.encoder.layer[0].output.LayerNorm.register_forward_hook(double)
    if when == "before patch":
        model.bert.encoder.layer[0].output.LayerNorm.register_forward_hook(double)
    _patch(model)
    if when == "after patch":
        model.bert.encoder.layer[0].output.LayerNorm.register_forward_hook(double)
    assert _rel(_out(ref, inp), _out(model, inp)) <= TOL


# ---- weights as the forward computes them ----------------------------------------------------------

def test_torch_prune_weights_are_read_as_the_forward_computes_them():
    # under torch.nn.utils.prune the `weight` attribute is only refreshed by the pre-hook on the next forward:
    # after an optimizer step on weight_orig, patch packed the stale weight (3.8e-2 relative off)
    import torch.nn.utils.prune as tprune

    def pruned_and_stepped():
        model = _build()
        layer = model.bert.encoder.layer
        tprune.l1_unstructured(layer[0].intermediate.dense, "weight", amount=0.5)
        tprune.l1_unstructured(layer[1].attention.output.dense, "bias", amount=0.5)
        with torch.no_grad():  # what an optimizer step does between forwards
            layer[0].intermediate.dense.weight_orig.mul_(2)
            layer[1].attention.output.dense.bias_orig.mul_(3)
        return model

    inp = _inputs()
    ref = _out(pruned_and_stepped(), inp)  # its forward runs the pruning pre-hooks
    model = pruned_and_stepped()
    _patch(model)
    assert _rel(ref, _out(model, inp)) <= TOL
    bsbert.unpatch(model)
    assert torch.equal(_out(model, inp), ref)


def _shrink_heads(model, layer_index, keep):
    """transformers 4's prune_heads by hand: Q/K/V keep only ``keep``'s rows, the output projection their
    columns; the attention's head count is left as it was (transformers' forward splits by head size)."""
    sa = model.bert.encoder.layer[layer_index].attention.self
    out = model.bert.encoder.layer[layer_index].attention.output
    d = sa.attention_head_size
    rows = torch.tensor([h * d + i for h in keep for i in range(d)], dtype=torch.long)
    with torch.no_grad():
        for name in ("query", "key", "value"):
            old = getattr(sa, name)
            new = nn.Linear(old.in_features, len(rows))
            new.weight.copy_(old.weight[rows])
            new.bias.copy_(old.bias[rows])
            setattr(sa, name, new)
        new = nn.Linear(len(rows), out.dense.out_features)
        new.weight.copy_(out.dense.weight[:, rows])
        new.bias.copy_(out.dense.bias)
        out.dense = new


def test_heads_removed_from_the_linears_split_by_head_size():
    # the head size was taken as rows / num_attention_heads: with 2 of 4 heads' rows left and the count not
    # updated, heads of 16 instead of 32 (2.4e-4 relative off); with none left, ZeroDivisionError
    # eager attention for the reference: torch 2.11's CPU SDPA dies of SIGFPE on the layer with no heads left
    # (fixed in 2.14); patch replaces the attention either way
    model = _build(hidden_size=128, num_attention_heads=4, heads=(4, 4), attn_implementation="eager")
    _shrink_heads(model, 0, [1, 3])
    _shrink_heads(model, 1, [])
    inp = _inputs()
    ref = _out(model, inp)
    _patch(model)
    plan = model.bsbert_plan
    assert [(lp.num_heads, lp.head_dim) for lp in plan.layers] == [(2, 32), (0, 32)]
    assert _rel(ref, _out(model, inp)) <= TOL


# ---- shared modules, torch.compile wrappers ----------------------------------------------------------

@pytest.mark.parametrize("shared", ["layer", "attention"])
def test_unpatch_restores_shared_modules(shared):
    # one layer object twice in the list (or one BertAttention in two layers): the second swap recorded the
    # first one's replacement as its original, and unpatch left PrunedSelfAttention in the model
    model = _build()
    layers = model.bert.encoder.layer
    if shared == "layer":
        layers[1] = layers[0]
    else:
        layers[0].attention = layers[1].attention
    before = {name: m for name, m in model.named_modules(remove_duplicate=False)}
    inp = _inputs()
    ref = _out(model, inp)
    _patch(model)
    assert _rel(ref, _out(model, inp)) <= TOL
    bsbert.unpatch(model)
    assert {name: m for name, m in model.named_modules(remove_duplicate=False)} == before
    assert torch.equal(_out(model, inp), ref)


def test_patch_and_unpatch_a_torch_compile_wrapper(tmp_path):
    # patch(torch.compile(model)) split bsbert's state between the wrapper and the model; unpatch then
    # failed half way (AttributeError '_bsbert_encoder') and left the model neither patched nor unpatched
    model = _build()
    inp = _inputs()
    ref = _out(model, inp)
    before = repr(model)
    compiled = torch.compile(model)
    assert _patch(compiled) is compiled
    assert bsbert.is_patched(compiled) and bsbert.is_patched(model)
    assert _rel(ref, _out(model, inp)) <= TOL  # (the eager model: compiling here would take long)
    bsbert.save(compiled, str(tmp_path))  # the model's class and keys, not the wrapper's
    assert type(bsbert.load(str(tmp_path), select="heuristic")) is type(model)
    assert bsbert.unpatch(compiled) is compiled
    assert not bsbert.is_patched(model) and repr(model) == before
    assert torch.equal(_out(model, inp), ref)


# ---- save / load ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["masked-lm (tied weights)", "base model without pooler"])
def test_save_and_load_what_patch_patches(kind, tmp_path):
    # BertForMaskedLM: save failed in safetensors ("Some tensors share memory": the decoder is the word
    # embedding matrix); BertModel(add_pooling_layer=False): saved, but load refused the directory
    import transformers as tf

    if kind.startswith("masked"):
        model = _build("BertForMaskedLM")
    else:
        torch.manual_seed(0)
        model = models.prune_like_seed(tf.BertModel(_cfg(), add_pooling_layer=False).eval(), (1, 2), (40, 7),
                                       dead_bias_units=True)
    inp = _inputs()
    ref = _out(model, inp)
    _patch(model)
    bsbert.save(model, str(tmp_path))
    loaded = bsbert.load(str(tmp_path), select="heuristic")
    assert type(loaded) is type(model)
    assert _rel(ref, _out(loaded, inp)) <= TOL
    if kind.startswith("masked"):  # still one matrix in memory
        emb = loaded.bert.embeddings.word_embeddings.weight
        assert loaded.cls.predictions.decoder.weight.data_ptr() == emb.data_ptr()


# ---- a model in training mode ------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:bsbert.patch. the measured backend choices")
@pytest.mark.parametrize("check_model", [False, True])  # the model check re-patches: the flags must survive it
def test_a_training_model_is_patched_in_eval_mode_and_unpatch_restores_its_flags(check_model):
    # was a warning only: the model stayed in training mode, and its forward ran dropout in the embeddings and
    # QA head but not in bsbert's modules, a hybrid whose outputs changed call to call (~0.1 off eval mode)
    model = _build().train()
    model.bert.encoder.layer[1].output.dropout.eval()  # a mixed state, as a user may leave it
    flags = {name: m.training for name, m in model.named_modules()}
    inp = _inputs()
    ref = _out(copy.deepcopy(model).eval(), inp)
    with pytest.warns(RuntimeWarning, match="put the model in eval mode"):
        bsbert.patch(model, select="heuristic", progress=False, check_model=check_model)
    assert not any(m.training for m in model.modules())
    out1, out2 = _out(model, inp), _out(model, inp)
    assert torch.equal(out1, out2)
    assert _rel(ref, out1) < 1e-5
    bsbert.unpatch(model)
    assert {name: m.training for name, m in model.named_modules()} == flags


def test_a_refused_training_model_keeps_its_mode():
    model = _build().train()
    with pytest.raises(ValueError):
        bsbert.patch(model, select="heuristic", progress=False, seq=0)  # refused before anything changes
    assert all(m.training for m in model.modules())


def test_a_training_model_refused_by_the_model_checks_gets_no_eval_mode_warning():
    """The "patch put the model in eval mode" warning came before the checks: a refused model (NaN weights)
    got it, though it stayed, correctly, in training mode."""
    import warnings

    model = _build().train()
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(bsbert.BsbertError):
            bsbert.patch(model, select="heuristic", progress=False)
    assert not [w for w in seen if "eval mode" in str(w.message)], [str(w.message) for w in seen]
    assert all(m.training for m in model.modules())


def test_a_float64_model_is_left_as_it_was():
    # fold_dead_heads added the dead heads' value bias into the float64 original's own output bias (+= on the
    # tensor .double() returned as is): unpatch left a changed model, and verify compared against it and failed
    from tests.helpers import inputs, tiny_pruned

    model = tiny_pruned(heads=(2, 4), ffn=(100, 37), hidden=64).eval().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):  # a second patch starts from the same original
        bsbert.patch(model, select="heuristic", progress=False, verify=True)
        assert model.bsbert_verify_report.passed
        bsbert.unpatch(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with torch.inference_mode():
        assert model(**inputs()).start_logits.dtype == torch.float64


def test_verify_fits_a_short_position_table():
    # verify's inputs were 48 tokens whatever the model: with 32 positions (or RoBERTa's 48, whose positions
    # start after the padding index) its forward raised, and patch(verify=True) left the model patched
    import transformers as tf

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=300)
    for model in (tf.BertForQuestionAnswering(tf.BertConfig(max_position_embeddings=32, **common)),
                  tf.RobertaModel(tf.RobertaConfig(max_position_embeddings=48, pad_token_id=1, **common))):
        model = models.prune_like_seed(model.eval(), (1, 2), (40, 7), seed=0)
        bsbert.patch(model, select="heuristic", progress=False, verify=True)
        assert model.bsbert_verify_report.passed


def test_a_verify_that_raises_leaves_the_model_unpatched(monkeypatch):
    from tests.helpers import tiny_pruned

    def broken(model):
        raise RuntimeError("verify's forward failed")

    import importlib

    monkeypatch.setattr(importlib.import_module("bsbert.verify"), "verify", broken)  # (bsbert.verify: the function)
    model = tiny_pruned(heads=(2, 4), ffn=(100, 37), hidden=64).eval()
    with pytest.raises(RuntimeError, match="verify's forward failed"):
        bsbert.patch(model, select="heuristic", progress=False, verify=True)
    assert not bsbert.is_patched(model)
    assert type(model.bert.encoder.layer[0].attention.self).__module__.startswith("transformers")


@pytest.mark.parametrize("unpad", [False, True])
def test_unpatch_leaves_no_bsbert_attributes(unpad):
    from tests.helpers import inputs, tiny_pruned

    model = tiny_pruned(heads=(2, 4), ffn=(100, 37), hidden=64).eval()
    bsbert.patch(model, select="heuristic", progress=False, verify=True, unpad=unpad)
    with torch.inference_mode():
        model(**inputs())
    bsbert.unpatch(model)
    left = [f"{name or 'model'}.{k}" for name, m in model.named_modules() for k in vars(m)
            if "bsbert" in k and k != "_bsbert_patched"]
    assert not left, left
