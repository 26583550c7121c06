"""A patched model answers every call as its unpatched (masked dense) original does: the same outputs (fp32 to
~1e-5, bf16 as close to the fp32 model as the bf16 original is), the same output structure and dtypes, the same
loss, or an error where the original errs or where bsbert cannot compute what was asked (attention maps) --
whichever of bsbert's forward paths (lean model / lean QA head, fused encoder op, per-layer fast layers,
padding-free encoder, transformers' forward over bsbert modules) the call takes.

A property-style loop draws calls (seeded) from the options a user has: positional or keyword arguments, the
attention mask's form and dtype, token types, position ids, inputs_embeds, collected hidden states, tuple
returns, labels, non-contiguous or int32 ids, grad mode; explicit tests below it are the audit's findings."""
import copy
import random

import pytest
import torch
import torch.nn as nn

import bsbert
from bsbert import _ext, models

needs_op = pytest.mark.skipif(not _ext.has_op("bert_encoder"),
                              reason=f"bsbert::bert_encoder unavailable: {_ext.reason_unavailable()}")

VOCAB, MAX_POS, HIDDEN = 300, 48, 64
CLASSES = ["BertModel", "BertModel-nopool", "BertForQuestionAnswering", "BertForSequenceClassification",
           "BertForTokenClassification", "BertForMaskedLM", "RobertaForQuestionAnswering",
           "DistilBertForQuestionAnswering"]


def _config(cls_name: str):
    import transformers as tf

    if cls_name.startswith("DistilBert"):
        return tf.DistilBertConfig(dim=HIDDEN, n_layers=2, n_heads=2, hidden_dim=128, vocab_size=VOCAB,
                                   max_position_embeddings=MAX_POS)
    common = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                  vocab_size=VOCAB)
    if cls_name.startswith("Roberta"):  # positions start after the padding index: 2 more rows for MAX_POS tokens
        return tf.RobertaConfig(max_position_embeddings=MAX_POS + 2, pad_token_id=1, **common)
    return tf.BertConfig(max_position_embeddings=MAX_POS, **common)


def _build(cls_name: str, dtype=torch.float32) -> nn.Module:
    """A pruned 2-layer model of that class: one head of layer 0 removed, FFNs pruned, real biases."""
    import transformers as tf

    torch.manual_seed(0)
    extra = {}
    if cls_name == "BertModel-nopool":
        cls_name, extra = "BertModel", {"add_pooling_layer": False}
    model = getattr(tf, cls_name)(_config(cls_name), **extra).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # pruned checkpoints have real biases (folding needs them)
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.02)
    return models.prune_like_seed(model, (1, 2), (40, 7), seed=0, dead_bias_units=True).to(dtype)


_MODELS: dict = {}


def _models(cls_name: str, dtype=torch.float32, **patch_kw):
    """(fp32 original, original in ``dtype``, patched copy of it), built once per module run."""
    key = (cls_name, dtype, tuple(sorted(patch_kw.items())))
    if key not in _MODELS:
        ref32 = _build(cls_name)
        ref = ref32 if dtype == torch.float32 else _build(cls_name, dtype)
        patched = bsbert.patch(copy.deepcopy(ref), select="heuristic", progress=False, **patch_kw)
        _MODELS[key] = ref32, ref, patched
    return _MODELS[key]


# ---- comparing outputs ---------------------------------------------------------------------------

def _tensors(out, keep=None, token_2d=False):
    """(name, tensor) for every tensor in a model output (dict-like or tuple, nested), in order. ``keep``
    ([B, S] bool): only the real tokens' rows of per-token outputs ([B, S, ...]; [B, S] ones too where
    ``token_2d``: question answering's start / end logits) and the rows of sequences whose first token is
    real of per-sequence outputs (the padding-free encoder leaves padded positions at zero)."""
    if isinstance(out, torch.Tensor):
        if keep is not None and out.dim() >= (2 if token_2d else 3) and out.shape[:2] == keep.shape:
            out = out[keep]
        elif keep is not None and out.dim() >= 1 and out.shape[0] == keep.shape[0]:
            out = out[keep[:, 0]]
        return [("", out)]
    items = enumerate(out) if isinstance(out, (tuple, list)) else out.items()
    return [(f"{k}.{n}" if n else str(k), t) for k, v in items if v is not None
            for n, t in _tensors(v, keep, token_2d)]


def _diff(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    return float((ref - out).abs().max()) if ref.numel() else 0.0


def assert_same_answer(ref, out, ref32=None, keep=None, token_2d=False, what=""):
    """``out`` (patched) answers as ``ref`` (the original) does: same output type, names, shapes and dtypes;
    values within fp32 rounding (1e-4 of the largest value), or for a bf16 model no further from the fp32
    original's than twice the bf16 original's own distance or 2e-2 of the largest value (at least 0.5)."""
    assert type(out) is type(ref), what
    r, o = _tensors(ref, keep, token_2d), _tensors(out, keep, token_2d)
    assert [(k, t.shape, t.dtype) for k, t in o] == [(k, t.shape, t.dtype) for k, t in r], what
    for i, ((k, a), (_, b)) in enumerate(zip(r, o)):
        if ref32 is None:
            scale = float(a.detach().abs().max()) if a.numel() else 0.0
            assert _diff(a, b) <= 1e-4 * scale + 1e-6, f"{what}: {k} differs by {_diff(a, b):.2e} (scale {scale:.2g})"
        else:
            f = _tensors(ref32, keep, token_2d)[i][1]
            scale = max(float(f.detach().abs().max()) if f.numel() else 0.0, 0.5)
            assert _diff(f, b) <= max(2 * _diff(f, a), 2e-2 * scale), (
                f"{what}: {k} {_diff(f, b):.2e} from the fp32 model (bf16 original {_diff(f, a):.2e}, "
                f"scale {scale:.2g})")


def _call(model, args, kwargs, mode):
    ctx = {"inference": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}[mode]
    with ctx():
        return model(*args, **kwargs)


# ---- drawing calls -------------------------------------------------------------------------------

def _draw(rng: random.Random, cls_name: str, model: nn.Module, unpad: bool):
    """(args, kwargs, keep, description) of one random call; no sequence is all padding (whose outputs depend
    on the attention implementation: see test_a_sequence_that_is_all_padding). About a third are plain calls
    (keyword ids, a 2-D integer / bool mask or none, token types and position ids at most: the lean forms'
    calls where the model has them); the rest draw every option."""
    every = rng.random() < 0.65

    def maybe(p):
        return every and rng.random() < p

    b = rng.choice([1, 2, 3])
    s = rng.choice([1, 2, 7, 16, 33, MAX_POS])
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    ids = torch.randint(3, VOCAB, (b, s), generator=g)
    keep = torch.ones(b, s, dtype=torch.bool)
    if s > 1:
        for row in range(b):
            if rng.random() < 0.5:
                n = rng.randrange(1, s)  # real tokens
                if rng.random() < 0.3:
                    keep[row, : s - n] = False  # left padding
                else:
                    keep[row, n:] = False
    form = rng.choice(["none", "long", "bool", "int32", "ones", "noncontig"]
                      + (["float", "4d-bool", "4d-additive", "4d-additive32"] if every else []))
    if form == "none" or form == "ones":
        keep[:] = True
    mask = {"none": None, "long": keep.long(), "bool": keep, "int32": keep.int(), "float": keep.float(),
            "ones": torch.ones(b, s, dtype=torch.long), "4d-bool": keep[:, None, None, :],
            "4d-additive": (~keep[:, None, None, :]).to(model.dtype) * torch.finfo(model.dtype).min,
            "4d-additive32": (~keep[:, None, None, :]).float() * -10000.0,
            "noncontig": torch.stack([keep.long(), keep.long()], -1)[..., 0]}[form]
    kw, desc = {}, [f"b{b} s{s} mask={form}"]
    distil = cls_name.startswith("DistilBert")
    if maybe(0.15):
        kw["inputs_embeds"] = model.get_input_embeddings()(ids).detach()
        desc.append("inputs_embeds")
    else:
        if maybe(0.15):
            ids = torch.stack([ids, ids], -1)[..., 0]
            desc.append("noncontig ids")
        elif maybe(0.1):
            ids = ids.int()
            desc.append("int32 ids")
        kw["input_ids"] = ids
    if mask is not None:
        kw["attention_mask"] = mask
    if not distil and rng.random() < 0.3:
        types = 1 if cls_name.startswith("Roberta") else 2
        kw["token_type_ids"] = torch.randint(0, types, (b, s), generator=g)
        desc.append("token types")
    if not distil and not cls_name.startswith("Roberta") and rng.random() < 0.2:
        shift = rng.randrange(0, MAX_POS - s + 1)
        kw["position_ids"] = torch.arange(shift, shift + s).expand(b, s)
        desc.append(f"positions+{shift}")
    if maybe(0.2):
        kw["output_hidden_states"] = True
        desc.append("hidden states")
    if maybe(0.2):
        kw["return_dict"] = False
        desc.append("tuple")
    if maybe(0.3) and not unpad:  # (padding-free: losses over padded positions differ, documented)
        desc.append("labels")
        if "QuestionAnswering" in cls_name:
            kw["start_positions"] = torch.randint(0, s, (b,), generator=g)
            kw["end_positions"] = torch.randint(0, s, (b,), generator=g)
        elif "SequenceClassification" in cls_name:
            kw["labels"] = torch.randint(0, 2, (b,), generator=g)
        elif "TokenClassification" in cls_name or "MaskedLM" in cls_name:
            kw["labels"] = torch.randint(0, 2, (b, s), generator=g)
        else:
            desc.pop()
    args = ()
    if "input_ids" in kw and maybe(0.2):  # positional: (input_ids, attention_mask)
        args = (kw.pop("input_ids"), kw.pop("attention_mask", None))
        desc.append("positional")
    return args, kw, keep, ", ".join(desc)


def _property_run(cls_name, dtype, calls=24, unpad=False, seed=0):
    ref32, ref, patched = _models(cls_name, dtype, **({"unpad": True} if unpad else {}))
    rng = random.Random(f"{cls_name}-{dtype}-{unpad}-{seed}")
    for i in range(calls):
        args, kw, keep, desc = _draw(rng, cls_name, ref, unpad)
        mode = rng.choice(["inference", "no_grad", "grad"])
        flag = rng.choice([None] * 10 + ["output_hidden_states", "return_dict"])  # config edited after patch
        what = f"call {i} ({desc}, {mode}{', config ' + flag if flag else ''})"
        up = lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
        for m in {id(m): m for m in (ref32, ref, patched)}.values() if flag else ():
            setattr(m.config, flag, flag == "output_hidden_states")  # (each model has its own config)
        try:
            want = _call(ref, args, kw, mode)
            got = _call(patched, args, kw, mode)
            # a bf16 model: the fp32 original on the same call (floating inputs in fp32)
            f32 = None if dtype == torch.float32 else _call(ref32, tuple(map(up, args)),
                                                            {k: up(v) for k, v in kw.items()}, mode)
        finally:
            for m in {id(m): m for m in (ref32, ref, patched)}.values() if flag else ():
                setattr(m.config, flag, flag != "output_hidden_states")
        assert_same_answer(want, got, f32, keep if unpad else None, "QuestionAnswering" in cls_name, what)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cls_name", CLASSES)
def test_random_calls_answer_as_the_original(cls_name, dtype):
    _property_run(cls_name, dtype)


@needs_op
@pytest.mark.parametrize("cls_name", ["BertForQuestionAnswering", "BertForSequenceClassification",
                                      "DistilBertForQuestionAnswering"])
def test_random_calls_padding_free(cls_name):
    # patch(unpad=True): real tokens exact, padded positions zero (documented), so compared on real tokens
    _property_run(cls_name, torch.float32, unpad=True)


# ---- explicit calls: the audit's findings ---------------------------------------------------------

def _ids(b=2, s=11, seed=0):
    return torch.randint(3, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def _padded_mask(b=2, s=11, real=6):
    mask = torch.ones(b, s, dtype=torch.long)
    mask[-1, real:] = 0
    return mask


@needs_op
@pytest.mark.parametrize("cls_name", ["BertModel", "BertForQuestionAnswering"])
def test_a_model_built_under_inference_mode(cls_name):
    # a model built (or loaded) under torch.inference_mode has inference-tensor buffers, which keep no version
    # counter: the lean forward's check of the embeddings' default-id buffers read theirs, and every plain call
    # of the patched model raised "Inference tensors do not track version counter"
    with torch.inference_mode():
        model = _build(cls_name)
    ids, mask = _ids(), _padded_mask()
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask)
    bsbert.patch(model, select="heuristic", progress=False)
    assert model.bsbert_plan.lean_model, model.bsbert_plan.lean_model_reason
    for ctx in (torch.inference_mode, torch.no_grad):
        with ctx():
            assert_same_answer(want, model(input_ids=ids, attention_mask=mask), what=ctx.__name__)


@needs_op
def test_question_answering_under_autocast_gives_the_originals_dtypes():
    # under torch.autocast the lean QA head's op returned fp32 logits where transformers' qa_outputs gives
    # bf16 ones (the same patched model's other paths did too); values: the patched model's fp32 encoder
    # is closer to the fp32 model than the autocast original's bf16 GEMMs
    ref32, _, patched = _models("BertForQuestionAnswering")
    ids, mask = _ids(), _padded_mask()
    with torch.inference_mode():
        fp32 = ref32(input_ids=ids, attention_mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = ref32(input_ids=ids, attention_mask=mask), patched(input_ids=ids, attention_mask=mask)
    assert want.start_logits.dtype == torch.bfloat16
    assert_same_answer(want, got, fp32, what="autocast")


@needs_op
def test_per_head_mask_planes_with_torch_sdpa_attention():
    # a 4-D mask with a plane per head ([B, heads, S, S], which transformers passes on to the layers) reached
    # torch SDPA whole while only the kept heads are computed: "output with shape [2, 1, 11, 11] doesn't
    # match the broadcast shape [2, 2, 11, 11]"; now each layer takes its kept heads' planes
    ref = _build("BertForQuestionAnswering")  # layer 0 keeps one head of its 2
    patched = bsbert.patch(copy.deepcopy(ref), select="heuristic", progress=False, attention="torch-sdpa")
    mask = _padded_mask().bool()[:, None, None, :].expand(2, 2, 11, 11).clone()
    mask[:, 0, :, 1] = False  # the heads see different keys
    mask[:, 1, 3:, 2] = False  # and rows that differ (not a padding mask)
    with torch.inference_mode():
        assert_same_answer(ref(input_ids=_ids(), attention_mask=mask), patched(input_ids=_ids(), attention_mask=mask))


def test_per_head_mask_planes_the_layer_never_had_are_refused():
    # fewer planes than the layer had heads: the original fails to broadcast them ("The size of tensor a (4)
    # must match the size of tensor b (2)"); the patched layer says which layer and head
    from tests.helpers import inputs, tiny_pruned

    model = tiny_pruned(heads=(2, 3), ffn=(100, 37), hidden=64)  # 4 heads of 16 a layer
    bsbert.patch(model, select="heuristic", progress=False, attention="torch-sdpa")
    inp = inputs(seq=9)
    inp["attention_mask"] = torch.ones(2, 2, 9, 9, dtype=torch.bool)
    layer = next(i for i, lay in enumerate(model.bert.encoder.layer) if max(lay.attention.self.kept_heads) >= 2)
    with pytest.raises(ValueError, match=rf"attention mask has 2 head planes, but layer {layer} keeps head [23] "):
        with torch.inference_mode():
            model(**inp)


@needs_op
@pytest.mark.parametrize("unpad", [False, True])
def test_a_sequence_that_is_all_padding(unpad):
    # Left as it is (bsbert.nn.attention.PrunedSelfAttention says why): a sequence whose mask is all zeros gets
    # the folded removed heads' value bias where the original's SDPA gives those heads no context (and its
    # eager attention averages every value instead: the original's own answer there depends on its attention
    # implementation, by more than the patched model's differs from it). The other sequences are exact.
    _, ref, patched = _models("BertForQuestionAnswering", **({"unpad": True} if unpad else {}))
    mask = _padded_mask()
    mask[0] = 0
    with torch.inference_mode():
        want, got = ref(input_ids=_ids(), attention_mask=mask), patched(input_ids=_ids(), attention_mask=mask)
    assert_same_answer(want, got, keep=mask.bool(), token_2d=True)
    assert all(torch.isfinite(t).all() for _, t in _tensors(got))


@needs_op
@pytest.mark.parametrize("dtype,unpad", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)],
                         ids=["fp32", "fp32-padding-free", "bf16"])
def test_calls_from_several_threads_answer_as_calls_one_at_a_time(dtype, unpad):
    # A server calls one patched model from several Python threads at once (the ops release the GIL). Every
    # call must get its own answer: a scratch buffer, row-chain cache or packed panel shared between calls
    # would mix two requests' numbers. Shapes differ from call to call (batch, length, padding), so calls
    # that run side by side need different panels, chains and masks.
    import threading

    from tests.helpers import inputs, logits, tiny_pruned

    model = tiny_pruned(heads=(2, 3, 4, 1), ffn=(300, 37, 0, 500)).to(dtype)
    bsbert.patch(model, select="heuristic", progress=False, **({"unpad": True} if unpad else {}))
    calls = []
    for i, (b, s, pad) in enumerate([(1, 7, None), (2, 37, 20), (3, 64, 50), (1, 128, None), (4, 19, 3),
                                     (2, 200, 150)]):
        inp = inputs(batch=b, seq=s, pad_from=pad, seed=i)
        with torch.inference_mode():
            calls.append((inp, logits(model(**inp)).clone(), inp["attention_mask"].bool()))
    failures = []

    def serve(t):
        try:
            for it in range(12):
                inp, want, real = calls[(t + it) % len(calls)]
                with torch.inference_mode():
                    got = logits(model(**inp))
                if unpad:  # padded positions are zero by design there: compare the real tokens
                    got, want = got.view(2, -1)[:, real.reshape(-1)], want.view(2, -1)[:, real.reshape(-1)]
                err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
                if not err <= (1e-5 if dtype == torch.float32 else 2e-2):
                    failures.append(f"thread {t}, call {it} ({tuple(inp['input_ids'].shape)}): rel err {err:.3g}")
        except Exception as e:  # noqa: BLE001 (reported below, with the thread)
            failures.append(f"thread {t}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures, "\n".join(failures[:5])


@pytest.mark.parametrize("backend", ["torch-dense", "onednn-dense", "cpu-bsr"])
def test_deepcopy_computes_with_its_own_packed_weights(backend):
    # the prepared calls closed over the original's packed tensors while deepcopy gave the copy new ones:
    # an edit of the original moved the copy's outputs, and the original's weights stayed alive in the copy
    import gc
    import weakref

    from bsbert.ops.linear_backends import BACKENDS
    from tests.helpers import inputs, tiny_pruned

    if BACKENDS[backend].not_supported_reasons(torch.device("cpu"), torch.float32, 32):
        pytest.skip(f"{backend} unavailable here")
    model = tiny_pruned(heads=(2, 3), ffn=(100, 37), hidden=64).eval()
    bsbert.patch(model, select="heuristic", backend=backend, fused_encoder=False, progress=False)
    twin = copy.deepcopy(model)
    inp = inputs(batch=2, seq=9, pad_from=5, vocab=model.config.vocab_size)
    with torch.inference_mode():
        before = twin(**inp).start_logits
    orig = model.bert.encoder.layer[0].intermediate.dense.choice.prepared.tensors
    key = "values" if "values" in orig else "weight"
    with torch.no_grad():
        orig[key].zero_()
    with torch.inference_mode():
        assert torch.equal(twin(**inp).start_logits, before)
    gone = weakref.ref(orig[key])
    del model, orig
    gc.collect()
    assert gone() is None, "the copy kept the original's packed weight alive"


@pytest.mark.parametrize("fused_encoder", [True, False])
def test_backward_says_the_model_is_inference_only(fused_encoder):
    # torch's own error named an internal op: "derivative for bsbert::bert_encoder_registered is not implemented"
    from tests.helpers import inputs, tiny_pruned

    model = tiny_pruned(heads=(2, 3), ffn=(100, 37), hidden=64).eval()
    bsbert.patch(model, select="heuristic", fused_encoder=fused_encoder, progress=False)
    out = model(**inputs(batch=2, seq=9, pad_from=5, vocab=model.config.vocab_size))
    if not out.start_logits.requires_grad:
        pytest.skip("no op of this build is on the autograd path (no extension)")
    with pytest.raises(bsbert.BsbertError, match="inference-only.*unpatch"):
        out.start_logits.sum().backward()
