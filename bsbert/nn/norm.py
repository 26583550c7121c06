"""Residual add + LayerNorm, the tail of every BERT sub-block, in one pass on CPU.

torch runs ``LayerNorm(h + input_tensor)`` as two memory passes (the add writes a temporary that
layer_norm reads back); ``torch.ops.bsbert.add_layer_norm`` reads h and the residual once and writes
the result once. The torch form stays the fallback wherever the kernel does not apply (CUDA, float16,
no compiled extension, a LayerNorm without affine parameters), so these modules work everywhere.

When the projection in front runs on bsbert's CPU block-sparse kernel, ``DenseAddLayerNorm`` goes one
step further: ``torch.ops.bsbert.bsr_linear_add_layer_norm`` has each thread compute whole output rows
and normalise them while they are in its own cache. (After a separate GEMM, whose threads split the
output by columns, add_layer_norm took 30 us instead of 15 us for 128 x 1024 rows on the 2-core Zen 5:
half of every row came from the other core.)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsbert.generation import Bumps
from bsbert.instance_forward import hooked
from bsbert.nn.linear import NotPickled, SparseLinear

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


_available: list[bool] = []  # filled on first use (not at import: _ext.load would then run before
                            # bsbert/__init__.py's own call and swallow its warning)


def fused_kernel_available() -> bool:
    if not _available:
        from bsbert import _ext

        _available.append(_ext.has_op("add_layer_norm"))
    return _available[0]


def _norm_fits(norm: nn.LayerNorm, dtype: torch.dtype) -> bool:
    """The kernels take this LayerNorm for inputs of ``dtype``: one normalised dim, affine, parameters
    in ``dtype`` or fp32."""
    w, b = norm.weight, norm.bias
    return (len(norm.normalized_shape) == 1 and w is not None and b is not None
            and w.dtype in (dtype, torch.float32) and b.dtype in (dtype, torch.float32))


def _kernel_applies(x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm) -> bool:
    return (x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and residual.dtype == x.dtype
            and residual.shape == x.shape and x.dim() >= 1 and _norm_fits(norm, x.dtype)
            and fused_kernel_available())


def _gemm_fused_applies(x: torch.Tensor, residual: torch.Tensor, dense: SparseLinear, norm: nn.LayerNorm) -> bool:
    """The GEMM + add + LayerNorm kernel takes this call: what _kernel_applies asks of the GEMM's
    output, asked of x before the GEMM (output shape = x.shape[:-1] + [out_features])."""
    return (x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and residual.dtype == x.dtype
            and x.dim() >= 1 and residual.shape == (*x.shape[:-1], dense.out_features)
            and _norm_fits(norm, x.dtype))


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm(x + residual)``: bsbert's fused CPU kernel when it applies, torch's add + layer_norm
    otherwise (same values within fp32 rounding; for bf16 the fused form is more accurate, as the
    sum is not rounded to bf16 before the statistics)."""
    if _kernel_applies(x, residual, norm):
        return torch.ops.bsbert.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)
    return F.layer_norm(x + residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class DenseAddLayerNorm(NotPickled, Bumps, nn.Module):
    """Replaces BertSelfOutput / BertOutput (``LayerNorm(dropout(dense(h)) + input_tensor)``) for
    inference: ``dense`` is the kernel-backed linear, then the fused add + LayerNorm; dropout is the
    identity in eval mode and is dropped. ``LayerNorm`` is the original module itself (same
    parameters, same state_dict keys), so saving and unpatching see the model they expect."""

    def __init__(self, dense: SparseLinear, LayerNorm: nn.LayerNorm):  # noqa: N803 (transformers' name)
        super().__init__()
        self.dense = dense
        self.LayerNorm = LayerNorm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        n = self.LayerNorm
        if hooked(n):
            # a hook on the LayerNorm (or a global one) runs only when the module is called: as transformers'
            # output block does, with the same sum (the fused kernels never call it; four dict truth tests)
            return n(self.dense(hidden_states) + input_tensor)
        gemm_fused = self._gemm_fused()
        if gemm_fused is not None and _gemm_fused_applies(hidden_states, input_tensor, self.dense, n):
            return gemm_fused(hidden_states, input_tensor, n.weight, n.bias, n.eps)
        return add_layer_norm(self.dense(hidden_states), input_tensor, n)

    def _gemm_fused(self):
        """The dense layer's backend's GEMM + add + LayerNorm kernel (bsbert::bsr_linear_add_layer_norm
        on CPU), or None."""
        choice = self.dense.choice
        if choice is None or not fused_kernel_available():
            return None
        return getattr(choice.prepared, "add_layer_norm", None)

    def extra_repr(self) -> str:
        if self._gemm_fused() is not None:
            return "add+LayerNorm: fused into the block-sparse GEMM (bsbert::bsr_linear_add_layer_norm)"
        return "add+LayerNorm: " + ("fused CPU kernel (torch on other devices)" if fused_kernel_available()
                                    else "torch (bsbert::add_layer_norm unavailable)")
