"""NVTX ranges around every bsbert module ("bsbert/L{layer}/{op}"), for Nsight Systems.

Off by default and free when off: ranges are added as forward hooks only inside ``ranges(model)``
(or when BSBERT_NVTX=1 at patch time), and removed on exit. On CPU the same hooks emit
``torch.profiler.record_function`` ranges instead, so torch.profiler traces show the same names.
"""
from __future__ import annotations

import contextlib
import os

import torch

from bsbert.nn import DenseAddLayerNorm, FusedFFN, FusedIntermediate, PrunedSelfAttention, SparseLinear

_OPS = (PrunedSelfAttention, SparseLinear, FusedIntermediate, FusedFFN, DenseAddLayerNorm)


def env_enabled() -> bool:
    return os.environ.get("BSBERT_NVTX", "0") == "1"


def _label(name: str, module) -> str:
    layer = getattr(module, "layer_index", None)
    if layer is None and isinstance(module, SparseLinear) and module.name.startswith("layer"):
        layer, _, op = module.name.partition(".")
        return f"bsbert/{layer}/{op}"
    if isinstance(module, FusedIntermediate):
        return f"bsbert/{module.dense.name.partition('.')[0]}/intermediate"
    if isinstance(module, DenseAddLayerNorm):  # the linear's range nests inside (unless one fused op runs both)
        layer, _, op = module.dense.name.partition(".")
        return f"bsbert/{layer}/{op}+add_norm"
    if isinstance(module, FusedFFN):
        return f"bsbert/{module.ffn_in.name.partition('.')[0]}/ffn"
    short = name.rsplit(".", 1)[-1]
    return f"bsbert/layer{layer}/{type(module).__name__}" if layer is not None else f"bsbert/{short}"


def add_hooks(model: torch.nn.Module, use_nvtx: bool | None = None) -> list:
    use_nvtx = torch.cuda.is_available() if use_nvtx is None else use_nvtx
    handles = []
    for name, mod in model.named_modules():
        if not isinstance(mod, _OPS):
            continue
        label = _label(name, mod)
        if use_nvtx:
            def pre(m, args, _l=label):
                torch.cuda.nvtx.range_push(_l)

            def post(m, args, out):
                torch.cuda.nvtx.range_pop()
        else:
            def pre(m, args, _l=label):
                m._bsbert_rf = torch.profiler.record_function(_l)
                m._bsbert_rf.__enter__()

            def post(m, args, out):
                m._bsbert_rf.__exit__(None, None, None)
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    return handles


@contextlib.contextmanager
def ranges(model: torch.nn.Module, use_nvtx: bool | None = None):
    """``with bsbert.nvtx.ranges(model): model(**inputs)`` — named ranges per patched module."""
    handles = add_hooks(model, use_nvtx)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
