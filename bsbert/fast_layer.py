"""A lean forward for patched BERT-style encoder layers.

transformers' ``BertLayer.forward`` reaches bsbert's modules through ``BertAttention``, a
``deprecate_kwarg`` wrapper and ``apply_chunking_to_forward`` (which calls ``inspect.signature`` on
every call). With every kernel replaced by an empty output, a patched 24-layer BERT-large forward at
seq 128 took 3.95 ms of Python on the 2-core CPU with transformers' layer forward and 2.51 ms with
this one (same process, same moment); that is 2-3% of a whole seq-128 forward there.

:func:`install` gives each patched layer an instance-level ``forward`` calling the same submodules
directly: ``attention.self`` -> ``attention.output`` (dense + add + LayerNorm) -> ``intermediate`` ->
``output``. The layer object stays what it was (a ``BertLayer``), so transformers'
``output_hidden_states`` hooks still see it and ``print(model)`` says what was changed. A call the
lean form does not cover (cross-attention inputs, a KV cache) goes to the class's own forward.
Feed-forward chunking (``config.chunk_size_feed_forward``) only saves memory; the lean form computes
the same values unchunked.
"""
from __future__ import annotations

import torch

from bsbert import instance_forward


def _lean_bert_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, *args, **kwargs):
    attn = self.attention
    if (encoder_hidden_states is not None or args or kwargs.get("cache") is not None
            or kwargs.get("past_key_values") is not None or kwargs.get("encoder_attention_mask") is not None
            # the lean form never calls the BertAttention module: its hooks (and global ones) need the class's
            or instance_forward.hooked(attn)):
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states, *args, **kwargs)
    ctx, _ = self.attention.self(hidden_states, attention_mask)
    a = self.attention.output(ctx, hidden_states)
    return self.output(self.intermediate(a), a)


def _extra_repr(self) -> str:
    return "forward=bsbert lean layer (bsbert.fast_layer)"


def applies(layer, adapter) -> str | None:
    """None if the lean forward fits ``layer``, else why not."""
    if adapter.layer_style != "bert":
        return f"{adapter.family} layers keep transformers' forward"
    for path in ("attention.self", "attention.output", "intermediate", "output"):
        try:
            layer.get_submodule(path)
        except AttributeError:
            return f"{type(layer).__name__} has no {path}"
    return None


@torch.inference_mode()
def _returns_tensor(layer, hidden_size: int) -> bool:
    """transformers >= 5 layers return the hidden states; older ones a tuple. One token through the
    class's forward tells which, so the lean form never hands the encoder a different type."""
    from bsbert.nn.linear import activation_like

    p = activation_like(layer)  # (an fp32 LayerNorm weight of a bf16 model made an fp32 probe, which failed)
    probe = torch.zeros(1, 1, hidden_size, device=p.device, dtype=p.dtype)
    return isinstance(type(layer).forward(layer, probe), torch.Tensor)


def install(layers, adapter, hidden_size: int) -> str | None:
    """Give every (patched) layer the lean forward; returns None, or why it was not installed (then
    no layer is changed)."""
    layers = list(layers)
    for layer in layers:
        why = applies(layer, adapter)
        if why:
            return why
    if layers:
        try:
            tensor_out = _returns_tensor(layers[0], hidden_size)
        except Exception as exc:  # the probe must never leave a half-patched model behind
            return f"probe forward of {type(layers[0]).__name__} failed: {exc}"
        if not tensor_out:
            return f"{type(layers[0]).__name__}.forward returns a tuple (transformers < 5)"
    attach(layers)
    return None


def attach(layers) -> None:
    """The lean forward on each layer (no checks: :func:`install` made them)."""
    for layer in layers:
        instance_forward.attach(layer, _lean_bert_forward, _extra_repr)


def uninstall(layers) -> None:
    for layer in layers:
        instance_forward.detach(layer, _lean_bert_forward, _extra_repr)


def installed(layer) -> bool:
    return instance_forward.installed(layer, _lean_bert_forward)
