"""The backward that bsbert registers for each of its ops (C++ ops in bsbert.ops.fake, Triton ops in
bsbert.triton._common): the kernels are inference-only, and a backward pass that reaches one must say so,
but only when it runs (see bsbert::inference_only_grad below)."""
from __future__ import annotations

import torch

INFERENCE_ONLY = ("{op} has no backward: bsbert's kernels are inference-only (a patched model runs forward "
                  "passes); to train or take gradients, bsbert.unpatch(model) first, or run under "
                  "torch.inference_mode() / torch.no_grad()")


# The backward of every bsbert op: a gradient from this op, which raises when it runs. The backward must not
# raise itself: AOTAutograd traces it (with fake tensors) whenever an input requires grad, i.e. torch.compile
# of a patched model called outside no_grad / inference_mode, so raising there made such a *forward* fail
# (BackendCompilerFailed). Returning None instead would let backward() succeed with no gradient for the
# encoder's weights: silently wrong. The op is in the backward graph and raises only if a backward runs.
@torch.library.custom_op("bsbert::inference_only_grad", mutates_args=())
def _inference_only_grad(grad: torch.Tensor, size: list[int], dtype: torch.dtype, device: torch.device,
                         op: str) -> torch.Tensor:
    from bsbert.errors import BsbertError

    raise BsbertError(INFERENCE_ONLY.format(op=op))


@_inference_only_grad.register_fake
def _(grad, size, dtype, device, op):
    return torch.empty(size, dtype=dtype, device=device)


def _grad_meta(v):
    """What the backward needs to stand a gradient in for an input: (size, dtype, device) of a tensor that
    requires grad (a list: one entry per element), else None. Metadata only: no tensor is kept alive."""
    if isinstance(v, torch.Tensor):
        return (tuple(v.shape), v.dtype, v.device) if v.requires_grad else None
    if isinstance(v, (list, tuple)):
        return [_grad_meta(u) for u in v]
    return None


def no_backward(qualname: str):
    """(backward, setup_context) for torch.library.register_autograd of the op ``qualname``."""
    def setup_context(ctx, inputs, output):
        ctx.bsbert_grad_meta = [_grad_meta(v) for v in inputs]

    def backward(ctx, *grads):
        g = next((t for t in grads if isinstance(t, torch.Tensor)), None)

        def stand_in(meta):
            if isinstance(meta, list):
                return [stand_in(m) for m in meta]
            if meta is None or g is None:
                return None
            size, dtype, device = meta
            return torch.ops.bsbert.inference_only_grad(g, list(size), dtype, device, qualname)

        return tuple(stand_in(m) for m in ctx.bsbert_grad_meta)

    return backward, setup_context


def register(qualname: str) -> None:
    """register_autograd(qualname, the inference-only backward); an op registered already is left alone."""
    backward, setup_context = no_backward(qualname)
    try:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    except RuntimeError as exc:
        if "already" not in str(exc):
            raise
