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
    the Triton/CUDA kernels take the equivalent key-padding mask (and refuse a non-padding mask). A 4-D
    mask with a plane per head of the original layer is cut to the kept heads' planes.

    A query that may attend to no key at all (a sequence that is all padding) gets zero context from every
    backend, as from torch SDPA in the original; but the value bias of the heads whose value weights were
    removed, which patch folds into the output bias, is then still added, where the original's SDPA gives
    those heads zero context too (and its eager attention averages every value instead, for every head).
    Such rows' outputs are meaningless in either model; every other row is exact.
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
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] != 1:
            attention_mask = self._kept_planes(attention_mask)
        if self.num_heads == 0:  # every head removed: nothing reaches the output projection
            ctx = hidden_states.new_zeros(b, s, 0)
            return (ctx if self.out_proj is None else self.out_proj(ctx)), None
        ctx = self.backend(self.qkv(hidden_states), attention_mask, self.num_heads, self.head_dim, self.scale)
        return (ctx if self.out_proj is None else self.out_proj(ctx)), None

    def _kept_planes(self, mask: torch.Tensor) -> torch.Tensor:
        """A 4-D mask with a plane per head of the original layer ([B, heads, S, S], as transformers passes
        it on): the planes of the kept heads, in the kept order. Given whole, torch SDPA failed to broadcast
        it against the kept heads ("output with shape [2, 1, 11, 11] doesn't match the broadcast shape")."""
        if self.num_heads and mask.shape[1] <= max(self.kept_heads):
            raise ValueError(f"attention mask has {mask.shape[1]} head planes, but layer {self.layer_index} "
                             f"keeps head {max(self.kept_heads)} of its original heads")
        return mask[:, self.kept_heads]

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
