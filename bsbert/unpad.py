"""Padding-free encoder forward: linears run on the real tokens only, attention per sequence.

A batch of different lengths padded to S wastes (1 - real/B*S) of every linear. With
``patch(..., unpad=True)`` the encoder gathers the real tokens into one [T, hidden] matrix, runs every
layer on it (attention through the backend's varlen form: Triton/CUDA kernels on cu_seqlens, or SDPA
on a re-padded copy on CPU) and scatters the result back to [B, S, hidden]. Real tokens get exactly
the padded model's values; padded positions come out as zeros (the padded model's values there are
meaningless: no token attends to them).
"""
from __future__ import annotations

import types

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


def install(encoder, adapter) -> None:
    """Give ``encoder`` (a patched BertEncoder-like module) the padding-free forward."""
    padded_forward = encoder.forward
    layer_fn = _STYLES[adapter.layer_style]

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        from bsbert import fused_encoder

        # Hidden states / attentions are collected by transformers' hooks on the layers, which this
        # forward does not call: the padded forward, through the layers, gives them (or says why not).
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions") or fused_encoder._capturing():
            return padded_forward(hidden_states, attention_mask, *args, **kwargs)
        b, s, h = hidden_states.shape
        keep = key_padding_mask(attention_mask, b, s) if attention_mask is not None else None
        if keep is None:  # nothing to remove
            return padded_forward(hidden_states, attention_mask, *args, **kwargs)
        info = UnpadInfo(keep, attention_mask)
        x = info.unpad(hidden_states)
        for layer in getattr(self, adapter.layers_attr):
            x = layer_fn(layer, adapter, x, info)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=info.pad(x))

    encoder.forward = types.MethodType(forward, encoder)
    encoder._bsbert_unpadded = True


def uninstall(encoder) -> None:
    if getattr(encoder, "_bsbert_unpadded", False):
        del encoder.forward  # the class's own forward again
        del encoder._bsbert_unpadded
