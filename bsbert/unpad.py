"""Padding-free encoder forward: linears run on the real tokens only, attention per sequence.

A batch of different lengths padded to S wastes (1 - real/B*S) of every linear. With
``patch(..., unpad=True)`` the encoder gathers the real tokens into one [T, hidden] matrix, runs every
layer on it (attention through the backend's varlen form: Triton/CUDA kernels on cu_seqlens, or SDPA
on a re-padded copy on CPU) and scatters the result back to [B, S, hidden]. Real tokens get exactly
the padded model's values; padded positions come out as zeros (the padded model's values there are
meaningless: no token attends to them). What a head computes from them differs accordingly: the logits at
padded positions, and a loss over every position (question answering's start / end loss, token labels at
padded positions that are not -100: 1.4e-2 relative for the QA loss of a tiny test model). A batch with a
row whose first position is padding (left padding) runs the padded forward instead: the pooler and
first-token classifiers read position 0.
"""
from __future__ import annotations

import types

import torch

from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from bsbert.nn.norm import add_layer_norm
from bsbert.ops.attention_backends import UnpadInfo, key_padding_mask


def _layer_bert(layer, adapter, x, info):
    attn = layer.get_submodule(adapter.self_attention)
    ctx = attn.forward_unpadded(x, info)
    a = layer.get_submodule(adapter.attn_out.rpartition(".")[0])(ctx, x)      # dense + add + LayerNorm
    h = layer.get_submodule(adapter.intermediate)(a)
    return layer.get_submodule(adapter.ffn_out.rpartition(".")[0])(h, a)


def _layer_distilbert(layer, adapter, x, info):
    a = add_layer_norm(layer.get_submodule(adapter.self_attention).forward_unpadded(x, info), x,
                       layer.sa_layer_norm)
    return add_layer_norm(layer.get_submodule(adapter.ffn_block)(a), a, layer.output_layer_norm)


_STYLES = {"bert": _layer_bert, "distilbert": _layer_distilbert}


class _HookWatch:
    """The hook dicts of every module in the layers this forward ran last, for bsbert.fused_encoder._hooked
    (which looks at them only when torch's hook-handle counter has moved since they were found empty).
    ``key``: (bsbert.generation's counter, the layers) when they were collected: a layer or submodule
    replaced since (a submodule assignment bumps the counter) brings in other modules, so they are
    collected again."""

    def __init__(self):
        self.key = None
        self.hook_dicts: list = []
        self.no_hooks_at = -1


def _hooked(watch: _HookWatch, layers) -> bool:
    """A forward (pre-)hook, global or on any module of ``layers``: this forward calls the layers' parts
    directly (the attention's unpadded form, add_layer_norm), so such a hook would be skipped or see other
    shapes; the padded forward, through the modules, runs it. Per call, while nothing moved: the global
    dicts, a tuple of the layers and two counters (~0.5 us for 24 layers)."""
    from bsbert import fused_encoder, generation

    counted = generation.watch_module_assignments()  # (installed by install(); False on an old torch)
    key = (generation.current(), tuple(layers)) if counted else None
    if key is None or key != watch.key:
        watch.hook_dicts = [d for layer in layers for m in layer.modules()
                            for d in (m._forward_pre_hooks, m._forward_hooks)]
        watch.no_hooks_at = -1
        watch.key = key
    return fused_encoder._hooked(watch)


def _extra_repr(self) -> str:
    own = type(self).extra_repr(self)
    return (own + ", " if own else "") + "forward=bsbert padding-free encoder (real tokens only; bsbert.unpad)"


def _output_type(encoder, hidden_size: int | None, dtype):
    """The encoder class's own output type (DistilBERT's is BaseModelOutput, BERT's
    BaseModelOutputWithPastAndCrossAttentions): the padding-free forward returns the same kind of object as the
    padded one, whichever a batch takes."""
    from bsbert.fused_encoder import _output_type as probe

    if hidden_size:
        try:
            out = probe(encoder, hidden_size, dtype)
            if out is not None:
                return out
        except Exception:  # noqa: BLE001 (an odd encoder: keep transformers' usual type)
            pass
    return BaseModelOutputWithPastAndCrossAttentions


def install(encoder, adapter, hidden_size: int | None = None, dtype=None) -> None:
    """Give ``encoder`` (a patched BertEncoder-like module) the padding-free forward (``print`` shows it)."""
    from bsbert import generation

    # The padded forward is the class's own (uninstall restores it by deleting this instance attribute),
    # called on `self`: a closure over encoder.forward would, in a deep copy, run the original's layers.
    def padded_forward(self, *args, **kwargs):
        return type(self).forward(self, *args, **kwargs)

    layer_fn = _STYLES[adapter.layer_style]
    generation.watch_module_assignments()  # a replaced layer part bumps the counter (see _HookWatch)
    hooks = _HookWatch()
    output_type = _output_type(encoder, hidden_size, dtype)

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        from bsbert import fused_encoder

        # Hidden states / attentions are collected by transformers' hooks on the layers, which this
        # forward does not call: the padded forward, through the layers, gives them (or says why not).
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions") or fused_encoder._capturing():
            return padded_forward(self, hidden_states, attention_mask, *args, **kwargs)
        b, s, h = hidden_states.shape
        if torch.compiler.is_exporting():
            # (torch's own error was a data-dependent guard failure pointing into this file)
            from bsbert.errors import BsbertError

            raise BsbertError("torch.export of a model patched with unpad=True: the padding-free forward's shapes "
                              "depend on the mask's values (how many real tokens), which an exported program "
                              "cannot hold; export a model patched without unpad (torch.compile(fullgraph=True) "
                              "likewise; a plain torch.compile works)")
        try:
            keep = key_padding_mask(attention_mask, b, s) if attention_mask is not None else None
        except ValueError:
            # not a key-padding mask (a custom 4-D mask, per-head planes): there is no padding to remove, and
            # the padded forward's attention backend computes it or refuses it with its own reason
            return padded_forward(self, hidden_states, attention_mask, *args, **kwargs)
        if keep is None:  # nothing to remove
            return padded_forward(self, hidden_states, attention_mask, *args, **kwargs)
        if b and not bool(keep[:, 0].all()):
            # a row whose first position is padding (left padding): the pooler and first-token heads
            # (sequence classification, next-sentence prediction, RoBERTa's and DistilBERT's classifiers) read
            # position 0, which this forward leaves zero, so their logits would no longer depend on the input
            # (found: bit-identical logits for two different left-padded batches). The padded forward is exact.
            return padded_forward(self, hidden_states, attention_mask, *args, **kwargs)
        layers = getattr(self, adapter.layers_attr)
        if _hooked(hooks, layers):  # a hook this forward would skip: the padded forward runs it
            return padded_forward(self, hidden_states, attention_mask, *args, **kwargs)
        info = UnpadInfo(keep, attention_mask)
        x = info.unpad(hidden_states)
        for layer in layers:
            x = layer_fn(layer, adapter, x, info)
        return output_type(last_hidden_state=info.pad(x))

    encoder.forward = types.MethodType(forward, encoder)
    encoder.extra_repr = types.MethodType(_extra_repr, encoder)
    encoder._bsbert_unpadded = True


def detach(encoder):
    """Back to the class's forward and repr; returns what :func:`reattach` puts back (verify's swaps)."""
    saved = (encoder.forward, encoder.extra_repr)
    uninstall(encoder)
    return saved


def reattach(encoder, saved) -> None:
    encoder.forward, encoder.extra_repr = saved
    encoder._bsbert_unpadded = True


def uninstall(encoder) -> None:
    if getattr(encoder, "_bsbert_unpadded", False):
        del encoder.forward  # the class's own forward again
        encoder.__dict__.pop("extra_repr", None)
        del encoder._bsbert_unpadded
