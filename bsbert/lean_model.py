"""A lean forward for a patched ``BertModel`` whose encoder runs as one op (bsbert.fused_encoder).

Why: with the encoder fused, transformers' own ``BertModel.forward`` (its output-capturing, config-merging
and kwarg-deprecation wrappers, the 4-D mask it builds for the layers, output dataclasses) was the
largest piece of Python left in a CPU forward: replacing it for a plain call saved 0.61 ms of 54 (fp32)
and 0.51 ms of 29 (bf16) at seq 128 on the 2-core CPU in a prototype, 0.18-0.56 ms of 49 (fp32) with this
module (``python scripts/model_ab.py lean-model``; same model toggled, interleaved best of 20).

The lean form computes the same thing from the same modules: ``embeddings`` -> the fused encoder op
(the 2-D padding mask as its key-padding mask) -> ``pooler``, and returns the class's own output type.
It runs only for calls it reproduces exactly: ``input_ids`` given, a 2-D integer/bool mask or none, no
``inputs_embeds``, cache, cross-attention or head mask, nothing collected (``output_hidden_states`` /
``output_attentions`` off in the call and the config), a dict return, and only while the fused encoder
itself would run; every other call goes to the class's forward unchanged. Only transformers'
``BertModel`` (encoder-only) gets it: other families' model forwards differ (position ids, projections).

Its embeddings run as one op (``bsbert::bert_embeddings``, bit for bit the module: 0.30 -> 0.19 ms in a
cold bf16 seq-128 forward) when the call and module allow it (:func:`_embeddings_op`). A
``BertForQuestionAnswering`` around it gets :func:`install_head`'s lean forward too: the lean sequence
without BertModel's output object and module call, then the head (Python outside the encoder op, median
of 200 interleaved forwards: 0.99 -> 0.92 ms; ``model_ab.py lean-head``). Its ``qa_outputs`` linear runs
as ``bsbert::head_logits`` where :func:`_head_logits` allows (the one step of the lean forms that is not
bit for bit transformers': the same fp32 sums in another order), which writes the start and end logits
as two contiguous planes.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bsbert import instance_forward
from bsbert.instance_forward import hooked

# kwargs a plain call may carry, and the values that keep it plain
_NONE_KWARGS = ("inputs_embeds", "encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values",
                "head_mask")
_FALSY_KWARGS = ("use_cache", "output_attentions", "output_hidden_states")


def _is_transformers(module: nn.Module, class_name: str) -> bool:
    """``module`` is an instance of transformers' own class of that name (not a user subclass or twin)."""
    cls = type(module)
    return cls.__name__ == class_name and cls.__module__.startswith("transformers.")


def applies(base: nn.Module, encoder: nn.Module) -> str | None:
    """None if ``base`` can take the lean forward, else why not."""
    if not _is_transformers(base, "BertModel"):
        return f"{type(base).__name__} keeps transformers' model forward (lean form: BertModel only)"
    cfg = base.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return "decoder / cross-attention configuration"
    if getattr(base, "encoder", None) is not encoder or not hasattr(base, "embeddings"):
        return "the encoder is not BertModel.encoder"
    return None


def _plain(self, attention_mask, args, kwargs) -> bool:
    from bsbert import fused_encoder

    cfg = self.config
    if args or getattr(cfg, "output_hidden_states", False) or getattr(cfg, "output_attentions", False) \
            or getattr(cfg, "return_dict", True) is False:
        return False
    for k, v in kwargs.items():
        if k == "return_dict":
            if v is False:
                return False
        elif k in _NONE_KWARGS:
            if v is not None:
                return False
        elif k in _FALSY_KWARGS:
            if v:
                return False
        else:  # an argument this form does not know: transformers handles it
            return False
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.is_floating_point()):
        return False
    # The lean form calls the encoder's op, not the encoder module: a (pre-)hook on the encoder itself
    # would not run (the fused encoder's own check looks at the layers' modules; a call through the
    # module runs the encoder's hooks). Two dict truth tests on one module, ~0.1 us.
    enc = self._modules.get("encoder")
    return (enc is not None and fused_encoder.installed(enc) and not enc._forward_hooks
            and not enc._forward_pre_hooks and not fused_encoder._capturing())


_HAS_OP: dict[str, bool] = {}  # op name -> bsbert._ext.has_op, looked up once (an older build lacks some)


def _has_op(name: str) -> bool:
    have = _HAS_OP.get(name)
    if have is None:
        from bsbert import _ext

        have = _HAS_OP[name] = _ext.has_op(name)
    return have


def _embeddings_op(emb: nn.Module, input_ids, token_type_ids, position_ids, dtype):
    """transformers' BertEmbeddings forward as one op call (bsbert::bert_embeddings), or None when this
    call needs the module: custom position ids, training (dropout), hooks on it, a forward or class other
    than transformers' own, tensors the op does not take. The default token-type ids are the module's
    all-zero buffer; the op reads None as those zeros. (Written for a cold interpreter: the modules'
    dicts are read directly, each nn.Module attribute lookup costs microseconds in a forward loop.)"""
    d = emb.__dict__
    if position_ids is not None or d["training"] or "forward" in d or not _has_op("bert_embeddings") \
            or d.get("position_embedding_type", "absolute") != "absolute" or torch.compiler.is_compiling():
        return None
    if not _is_transformers(emb, "BertEmbeddings"):
        return None
    mods = d["_modules"]
    word, pos, tt, norm, drop = (mods.get(k) for k in ("word_embeddings", "position_embeddings",
                                                       "token_type_embeddings", "LayerNorm", "dropout"))
    parts = (word, pos, tt, norm, drop)
    if any(m is None for m in parts) or hooked(emb, *parts):
        return None
    # The op is nn.Embedding lookups, an add and nn.LayerNorm with the identity for dropout: a subclass,
    # another module or an instance forward in any of those places, an embedding that renormalises its
    # rows (max_norm), a dropout still in training mode, or default ids other than the buffers' arange /
    # zeros would compute something else (~1 us of lookups)
    if type(word) is not nn.Embedding or type(pos) is not nn.Embedding or type(tt) is not nn.Embedding \
            or word.max_norm is not None or pos.max_norm is not None or tt.max_norm is not None \
            or not (type(drop) is nn.Dropout and not drop.training or type(drop) is nn.Identity) \
            or any("forward" in m.__dict__ for m in (word, pos, tt, norm, drop)) \
            or not _default_ids(d, token_type_ids is None):
        return None
    w, g, b = word._parameters.get("weight"), norm._parameters.get("weight"), norm._parameters.get("bias")
    if w is None or g is None or b is None or w.dtype != dtype or w.device.type != "cpu" \
            or type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1 \
            or g.dtype not in (dtype, torch.float32) or b.dtype not in (dtype, torch.float32) \
            or input_ids.dtype != torch.long or input_ids.dim() != 2 or input_ids.device.type != "cpu":
        return None
    if token_type_ids is not None and (token_type_ids.dtype != torch.long or token_type_ids.shape != input_ids.shape
                                       or token_type_ids.device.type != "cpu"):
        return None
    return torch.ops.bsbert.bert_embeddings(input_ids, token_type_ids, w, pos.weight, tt.weight, g, b, norm.eps)


def _default_ids(d: dict, default_types: bool) -> bool:
    """The embeddings' ``position_ids`` buffer holds 0, 1, 2, ... and (when the call gives no token types)
    its ``token_type_ids`` buffer zeros, as the op assumes (transformers' forward reads the buffers).
    Checked once per buffer object and version (an in-place edit bumps it; an edit through ``.data``
    does not, and is not seen; nor is an in-place edit of an inference tensor), so a call costs two lookups
    and two version reads."""
    bufs = d["_buffers"]
    pos_ids, tt_ids = bufs.get("position_ids"), bufs.get("token_type_ids")
    if pos_ids is None or (default_types and tt_ids is None):
        return False
    try:
        pos_version, tt_version = pos_ids._version, -1 if tt_ids is None else tt_ids._version
    except RuntimeError:
        # inference tensors (a model built or loaded under torch.inference_mode) keep no version counter:
        # reading it raised in every plain call of such a model. Checked once per buffer object then, as
        # for an edit through .data (looking at them on every call cost ~20 us)
        pos_version = tt_version = -2
    seen = d.get("_bsbert_default_ids")
    if seen is None or seen[0] is not pos_ids or seen[1] != pos_version or seen[2] is not tt_ids \
            or seen[3] != tt_version:
        ok = pos_ids.dim() == 2 and pos_ids.shape[0] == 1 and not pos_ids.is_floating_point() and torch.equal(
            pos_ids[0].cpu(), torch.arange(pos_ids.shape[1], dtype=pos_ids.dtype))
        ok_types = tt_ids is not None and not tt_ids.is_floating_point() and not bool(tt_ids.any())
        # (written into the dict: nn.Module's __setattr__ would cost more and this is no state of the model)
        seen = d["_bsbert_default_ids"] = (pos_ids, pos_version, tt_ids, tt_version, ok, ok_types)
    return seen[4] and (seen[5] or not default_types)


def _lean_sequence(self, input_ids, attention_mask, token_type_ids, position_ids, args, kwargs):
    """The encoder output (last hidden state) of a plain call of BertModel ``self``: the embeddings,
    then the fused encoder op; None when the call is not one the lean form reproduces."""
    from bsbert import fused_encoder

    if input_ids is None or not _plain(self, attention_mask, args, kwargs):
        return None
    prog = self.encoder._bsbert_program
    if fused_encoder.why_not_for_call(prog, None, (), {}) is not None:  # e.g. a hook: before the embeddings
        return None
    emb = _embeddings_op(self.embeddings, input_ids, token_type_ids, position_ids, prog.dtype)
    if emb is None:
        emb = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
    if fused_encoder.why_not_now(prog, emb, None, (), {}) is not None:  # e.g. a hook: start over, the class's way
        return None
    # a 2-D integer or bool mask (_plain), nonzero = attend as transformers reads it: the op drops an
    # integer mask without a zero and converts the others (a Python `mask.all()` cost ~50 us cold)
    return prog.run(emb, attention_mask)


def _lean_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *args,
                  **kwargs):
    seq = _lean_sequence(self, input_ids, attention_mask, token_type_ids, position_ids, args, kwargs)
    if seq is None:
        return type(self).forward(self, input_ids, attention_mask, token_type_ids, position_ids, *args, **kwargs)
    pooled = self.pooler(seq) if self.pooler is not None else None
    return self._bsbert_output_type(last_hidden_state=seq, pooler_output=pooled)


def _lean_qa_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *args,
                     **kwargs):
    """BertForQuestionAnswering's forward for plain inference calls (no positions to score, no loss): the
    lean BertModel sequence without its output object and module call, then the same qa_outputs, split,
    squeeze and output type as transformers' forward."""
    bert = self._modules.get("bert")
    if kwargs.get("start_positions") is not None or kwargs.get("end_positions") is not None or bert is None \
            or not installed(bert) or hooked(bert) or getattr(self.config, "return_dict", True) is False:
        return type(self).forward(self, input_ids, attention_mask, token_type_ids, position_ids, *args, **kwargs)
    rest = {k: v for k, v in kwargs.items() if k not in ("start_positions", "end_positions")}
    seq = _lean_sequence(bert, input_ids, attention_mask, token_type_ids, position_ids, args, rest)
    if seq is None:
        return type(self).forward(self, input_ids, attention_mask, token_type_ids, position_ids, *args, **kwargs)
    logits = _head_logits(self, seq)  # [2, B, S]: start and end are its two contiguous planes
    if logits is not None:
        start, end = logits[0], logits[1]
    else:  # transformers' own steps
        start, end = self.qa_outputs(seq).split(1, dim=-1)
        start, end = start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()
    return self._bsbert_output_type(loss=None, start_logits=start, end_logits=end, hidden_states=None,
                                    attentions=None)


def _head_logits(self, seq: torch.Tensor):
    """``qa_outputs(seq)`` as [2, B, S] start / end planes from ``bsbert::head_logits``, or None where
    ``qa_outputs`` itself must run: not a plain 2-output nn.Linear, hooks on it, autograd or CPU autocast on,
    not a CPU float32/bfloat16 input in the weight's dtype, no op in this build. The op reads the module's
    weight and bias as they are on every call (an in-place change or a replaced module is simply what it
    computes).
    Why: after the encoder op has streamed the weights through the caches, torch's F.linear for this
    [S, 1024] x [1024, 2] product cost ~215 us in a bf16 seq-128 forward loop (stop 17). Before this op,
    bsbert's GEMM on a packed copy kept per weight version cost 66 us of checks + 62 us, and the split
    into contiguous start / end logits 58 us; now the checks and this op take 76 us and the two planes'
    views 13 (medians of 300 such forwards, timers around each step). Both sum in fp32 and round once;
    the order of the sums differs from F.linear's, so the last bit can too (tests bound the error at 2x
    F.linear's plus the fp32 sum's typical error)."""
    lin = self._modules.get("qa_outputs")
    # Under torch.autocast qa_outputs (F.linear) gives bf16 logits, transformers' QA output type then; the
    # op would give fp32 ones (one C call, ~0.2 us)
    if type(lin) is not nn.Linear or lin._forward_hooks or lin._forward_pre_hooks or torch.is_grad_enabled() \
            or seq.device.type != "cpu" or seq.dtype not in (torch.float32, torch.bfloat16) \
            or torch.is_autocast_enabled("cpu"):
        return None
    p = lin._parameters
    w, b = p.get("weight"), p.get("bias")
    if w is None or w.dtype != seq.dtype or w.device.type != "cpu" or w.dim() != 2 or w.shape[0] != 2 \
            or (b is not None and (b.dtype != w.dtype or b.device.type != "cpu")):
        return None
    return torch.ops.bsbert.head_logits(seq, w, b) if _has_op("head_logits") else None


def _extra_repr(self) -> str:
    return "forward=bsbert lean model forward for plain calls (bsbert.lean_model)"


def _qa_extra_repr(self) -> str:
    return "forward=bsbert lean question-answering forward for plain calls (bsbert.lean_model)"


def _is_qa_head(model: nn.Module) -> bool:
    return _is_transformers(model, "BertForQuestionAnswering")


@torch.inference_mode()
def _output_type(base: nn.Module):
    out = type(base).forward(base, torch.zeros(1, 1, dtype=torch.long, device=next(base.parameters()).device))
    want = ("start_logits", "end_logits") if _is_qa_head(base) else ("last_hidden_state", "pooler_output")
    if not all(hasattr(out, k) for k in want):
        raise TypeError(f"{type(base).__name__}.forward returns {type(out).__name__}")
    return type(out)


def install(base: nn.Module, encoder: nn.Module) -> str | None:
    """Give ``base`` the lean forward (the fused encoder must be installed); None, or why not."""
    why = applies(base, encoder)
    if why:
        return why
    try:
        base._bsbert_output_type = _output_type(base)
    except Exception as exc:  # the probe must never leave a half-patched model behind
        return f"probe forward of {type(base).__name__} failed: {exc}"
    attach(base)
    return None


def install_head(model: nn.Module, base: nn.Module) -> str | None:
    """Give a BertForQuestionAnswering whose ``bert`` has the lean forward its lean forward too (saves
    transformers' wrappers and one output object per call: ~0.1-0.2 ms of a cold CPU forward); None, or
    why not. Other task heads keep their forward."""
    if not _is_qa_head(model):
        return f"{type(model).__name__} keeps transformers' forward (lean head: BertForQuestionAnswering only)"
    if model._modules.get("bert") is not base or not installed(base) or "qa_outputs" not in model._modules:
        return "the QA model's bert is not the lean BertModel"
    try:
        model._bsbert_output_type = _output_type(model)
    except Exception as exc:
        return f"probe forward of {type(model).__name__} failed: {exc}"
    attach(model)
    return None


def _forwards(module: nn.Module):
    return (_lean_qa_forward, _qa_extra_repr) if _is_qa_head(module) else (_lean_forward, _extra_repr)


def attach(base: nn.Module) -> None:
    instance_forward.attach(base, *_forwards(base))


def detach(base: nn.Module) -> None:
    instance_forward.detach(base, *_forwards(base))


def uninstall(base: nn.Module) -> None:
    detach(base)
    base.__dict__.pop("_bsbert_output_type", None)


def installed(base: nn.Module) -> bool:
    return instance_forward.installed(base, _forwards(base)[0])
