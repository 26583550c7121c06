"""Kernel-backed linear modules that replace a pruned model's nn.Linear layers."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsbert.errors import BsbertError
from bsbert.generation import Bumps
from bsbert.ops.dispatch import Choice

PICKLE_REFUSED = ("a bsbert-patched model cannot be pickled (pickle, torch.save(model)): its kernels' prepared "
                  "calls are closures over packed weights and kernel handles, which pickle cannot store; use "
                  "bsbert.save(model, dir) and bsbert.load(dir), or bsbert.unpatch(model) first")


class NotPickled:
    """Mixin for bsbert's patched modules: pickling them is refused with :data:`PICKLE_REFUSED` rather
    than failing on some closure deep inside ("Can't pickle local object ..."). copy.deepcopy still works:
    it copies those closures by reference, which is fine for a copy living in the same process."""

    def __reduce_ex__(self, protocol):
        raise BsbertError(PICKLE_REFUSED)

    def __deepcopy__(self, memo):
        # what copy.deepcopy does for a plain object through object.__reduce_ex__, refused above
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new


def activation_like(module: nn.Module) -> torch.Tensor:
    """A tensor of the dtype and device ``module``'s activations have: a packed linear's bias (the dtype the
    kernels compute in), else its first parameter. After patching, a layer's or encoder's first parameter is a
    LayerNorm weight, which a bf16 model may keep in fp32."""
    packed = next((m.bias for m in module.modules() if isinstance(m, SparseLinear) and m.bias is not None), None)
    return packed if packed is not None else next(module.parameters())


class SparseLinear(NotPickled, Bumps, nn.Module):
    """``act(x @ W.T + b)`` for a packed (dead rows/columns removed) weight, run by the backend that
    the dispatcher chose. An empty weight (every head or neuron removed) yields the bias."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 choice: Choice | None, gelu: bool, density: float, name: str = ""):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.gelu, self.density, self.name = gelu, density, name
        self.choice = choice
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'SparseLinear'}: input has {x.shape[-1]} features, "
                             f"expected {self.in_features}")
        if self.choice is None:  # nothing left of the weight: only the bias remains
            shape = (*x.shape[:-1], self.out_features)
            y = (self.bias.to(x.dtype).expand(shape) if self.bias is not None
                 else x.new_zeros(shape)).contiguous()
            return F.gelu(y) if self.gelu else y
        return self.choice.prepared(x)

    def packed_weight(self) -> torch.Tensor:
        """The dense [out, in] packed weight this module computes with (zero blocks included)."""
        if self.choice is None:
            return self.bias.new_zeros(self.out_features, self.in_features)
        t = self.choice.prepared.tensors
        return t["weight"] if "weight" in t else t["bsm"].to_dense()

    def extra_repr(self) -> str:
        be = "bias-only" if self.choice is None else self.choice.backend
        if self.choice is not None and self.choice.format == "bsr":
            be += f", block={self.choice.block}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"backend={be}, density={self.density:.3f}{', gelu' if self.gelu else ''}")


class FusedIntermediate(NotPickled, Bumps, nn.Module):
    """Replaces BertIntermediate: linear + activation, the exact GELU fused into the GEMM when the
    backend has it."""

    def __init__(self, dense: SparseLinear, act):
        super().__init__()
        self.dense, self.act = dense, act  # act is None when fused into dense

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.dense(hidden_states)
        return h if self.act is None else self.act(h)


class FusedFFN(NotPickled, Bumps, nn.Module):
    """Replaces a whole FFN block ``ffn_out(act(ffn_in(x)))`` (DistilBERT's ``FFN``)."""

    def __init__(self, ffn_in: SparseLinear, act, ffn_out: SparseLinear):
        super().__init__()
        self.ffn_in, self.act, self.ffn_out = ffn_in, act, ffn_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ffn_in(x)
        return self.ffn_out(h if self.act is None else self.act(h))
