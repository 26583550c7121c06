"""Self-attention over the kept heads only, fed by one fused QKV GEMM."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsbert.nn.linear import SparseLinear


class PrunedSelfAttention(nn.Module):
    """Drop-in for transformers' BertSelfAttention (encoder, inference): same call signature, returns
    ``(context, None)`` with context ``[B, S, kept_heads * head_dim]``.

    ``attention_mask`` is what transformers passes down: None, a bool mask (True = attend) or an
    additive float mask, broadcastable to ``[B, 1, S, S]``; it goes to SDPA unchanged, so masking is
    bit-for-bit the model's own semantics.
    """

    def __init__(self, qkv: SparseLinear, kept_heads: list[int], head_dim: int, scale: float,
                 layer_index: int, out_proj: SparseLinear | None = None):
        super().__init__()
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
        b, s, _ = hidden_states.shape
        if self.num_heads == 0:  # every head removed: nothing reaches the output projection
            ctx = hidden_states.new_zeros(b, s, 0)
            return (ctx if self.out_proj is None else self.out_proj(ctx)), None
        qkv = self.qkv(hidden_states).view(b, s, 3, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, H, S, D] strided views
        mask = attention_mask
        if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        ctx = ctx.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return (ctx if self.out_proj is None else self.out_proj(ctx)), None

    def extra_repr(self) -> str:
        return (f"layer={self.layer_index}, kept_heads={self.num_heads} {self.kept_heads}, "
                f"head_dim={self.head_dim}, attention=torch-sdpa")
