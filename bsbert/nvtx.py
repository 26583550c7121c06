"""Named ranges around every patched module, for Nsight Systems (NVTX) or torch.profiler (CPU).

Range names, one per patched module of layer N (the layer's index in the encoder):

    bsbert/layerN/qkv                 fused Q/K/V linear
    bsbert/layerN/PrunedSelfAttention the attention over the kept heads (holds the qkv range)
    bsbert/layerN/attn_out            attention output linear
    bsbert/layerN/attn_out+add_norm   that linear + the fused residual add + LayerNorm (BERT-style blocks)
    bsbert/layerN/intermediate        FFN input linear + activation (holds the ffn_in range)
    bsbert/layerN/ffn_in              FFN input linear
    bsbert/layerN/ffn_out             FFN output linear
    bsbert/layerN/ffn_out+add_norm    that linear + the fused residual add + LayerNorm
    bsbert/layerN/ffn                 the whole FFN where the adapter has one FFN block (DistilBERT)

An output linear on cpu-bsr runs inside its ``+add_norm`` module as one fused op, so it has no range of
its own there; an output block that is not BERT-style keeps only the linear's range.

Off by default and free when off: the ranges are forward hooks, added only inside ``ranges(model)`` and
removed on exit, or, with ``BSBERT_NVTX=1`` in the environment when ``bsbert.patch`` runs, added at the
end of ``patch`` (``attach_if_enabled``) and kept for the patched model's life (``bsbert.load`` does not
add them). Hooks make the one-op CPU encoder step aside for the per-layer path while they exist. NVTX
ranges for a model on CUDA, ``torch.profiler.record_function`` ranges otherwise, so torch.profiler traces
show the same names.
"""
from __future__ import annotations

import contextlib
import os

import torch

from bsbert.nn import DenseAddLayerNorm, FusedFFN, FusedIntermediate, PrunedSelfAttention, SparseLinear

_OPS = (PrunedSelfAttention, SparseLinear, FusedIntermediate, FusedFFN, DenseAddLayerNorm)


def env_enabled() -> bool:
    """BSBERT_NVTX set to 1 / true / yes / on (any case): the spellings BSBERT_HUGEPAGES takes ("true" was
    silently ignored)."""
    from bsbert.hugepages import ON

    return os.environ.get("BSBERT_NVTX", "0").strip().lower() in ON


def _model_on_cuda(model: torch.nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cuda"


def attach_if_enabled(model: torch.nn.Module) -> list:
    """Called by ``bsbert.patch`` when it finishes: with BSBERT_NVTX=1, ranges on the patched modules for
    as long as they are in the model (an unpatch swaps them out, hooks and all). -> the hook handles."""
    if not env_enabled():
        return []
    return add_hooks(model, use_nvtx=_model_on_cuda(model), permanent=True)


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


def add_hooks(model: torch.nn.Module, use_nvtx: bool | None = None, permanent: bool = False) -> list:
    """Range hooks on every patched module; ``use_nvtx`` None: NVTX when the model is on CUDA. A module
    that already has BSBERT_NVTX's permanent ranges gets no second pair (each range would show twice)."""
    use_nvtx = _model_on_cuda(model) if use_nvtx is None else use_nvtx
    handles = []
    for name, mod in model.named_modules():
        if not isinstance(mod, _OPS) or getattr(mod, "_bsbert_nvtx_permanent", False):
            continue
        if permanent:
            mod._bsbert_nvtx_permanent = True
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
                # popped, not left on the module: a record_function object cannot be deep-copied, and
                # copy.deepcopy(model) failed after any forward with ranges
                m.__dict__.pop("_bsbert_rf").__exit__(None, None, None)
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    return handles


@contextlib.contextmanager
def ranges(model: torch.nn.Module, use_nvtx: bool | None = None):
    """``with bsbert.nvtx.ranges(model): model(**inputs)`` — named ranges per patched module (names in
    the module docstring), NVTX for a CUDA model unless ``use_nvtx`` says otherwise."""
    handles = add_hooks(model, use_nvtx)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
