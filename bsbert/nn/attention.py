"""Self-attention over the kept heads only, fed by one fused QKV GEMM."""
from __future__ import annotations

import torch
import torch.nn as nn

from bsbert import fused_encoder
from bsbert.errors import BsbertError
from bsbert.generation import Bumps
from bsbert.nn.linear import NotPickled, SparseLinear


class PrunedSelfAttention(NotPickled, Bumps, nn.Module):
    """Drop-in for transformers' BertSelfAttention (encoder, inference): same call signature, returns
    ``(context, None)`` with context ``[B, S, kept_heads * head_dim]``.

    ``attention_mask`` is what transformers passes down: None, a bool mask (True = attend) or an
    additive float mask, broadcastable to ``[B, 1, S, S]``. The torch-sdpa backend takes it unchanged;
    the Triton/CUDA kernels take the equivalent key-padding mask (and refuse a non-padding mask).
    """

    def __init__(self, qkv: SparseLinear, kept_heads: list[int], head_dim: int, scale: float,
                 layer_index: int, out_proj: SparseLinear | None = None, backend=None, reason: str = ""):
        super().__init__()
        from bsbert.ops.attention_backends import ATTENTION_BACKENDS

        self.backend = backend or ATTENTION_BACKENDS["torch-sdpa"]
        self.reason = reason
        self.qkv = qkv
        self.out_proj = out_proj  # set when the replaced module also applied the output projection
        self.kept_heads = list(kept_heads)
        self.num_heads = len(kept_heads)
        self.head_dim = head_dim
        self.scale = scale
        self.layer_index = layer_index

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *args, cache=None, **kwargs):
        if cache is not None:
            raise ValueError("PrunedSelfAttention is for bidirectional encoders: a KV cache is not supported")
        if kwargs.get("output_attentions") or fused_encoder.collecting("attentions"):
            # (transformers would quietly return no attention maps: it records them from its own classes)
            raise BsbertError("output_attentions is not available on a bsbert-patched model: its attention "
                              "kernels never form the attention probabilities; run the model before "
                              "bsbert.patch or after bsbert.unpatch to get them")
        b, s, _ = hidden_states.shape
        if self.num_heads == 0:  # every head removed: nothing reaches the output projection
            ctx = hidden_states.new_zeros(b, s, 0)
            return (ctx if self.out_proj is None else self.out_proj(ctx)), None
        ctx = self.backend(self.qkv(hidden_states), attention_mask, self.num_heads, self.head_dim, self.scale)
        return (ctx if self.out_proj is None else self.out_proj(ctx)), None

    def forward_unpadded(self, x: torch.Tensor, info) -> torch.Tensor:
        """x: [T, hidden] real tokens only (see bsbert.unpad) -> [T, out]."""
        if self.num_heads == 0:
            ctx = x.new_zeros(x.shape[0], 0)
        else:
            ctx = self.backend.varlen(self.qkv(x), info, self.num_heads, self.head_dim, self.scale)
        return ctx if self.out_proj is None else self.out_proj(ctx)

    def extra_repr(self) -> str:
        return (f"layer={self.layer_index}, kept_heads={self.num_heads} {self.kept_heads}, "
                f"head_dim={self.head_dim}, attention={self.backend.name}")
