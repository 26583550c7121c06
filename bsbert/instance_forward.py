"""Instance-level forwards: how bsbert swaps a module's ``forward`` (and the ``extra_repr`` that says so)
without changing its class, so the module stays what it was (same type, same state_dict keys, same
hooks) and ``print(model)`` shows what changed. Used by bsbert.fast_layer (lean layer forward),
bsbert.fused_encoder (the one-op encoder) and bsbert.lean_model (BertModel's lean forward)."""
from __future__ import annotations

import types

import torch.nn as nn
from torch.nn.modules import module as nn_module


def attach(module: nn.Module, forward, extra_repr) -> None:
    """``module.forward`` / ``module.extra_repr`` become these functions bound to ``module``."""
    module.forward = types.MethodType(forward, module)
    module.extra_repr = types.MethodType(extra_repr, module)


def detach(module: nn.Module, forward, extra_repr) -> None:
    """Back to the class's methods; only removes what :func:`attach` set with these functions."""
    for name in ("forward", "extra_repr"):
        if getattr(module.__dict__.get(name), "__func__", None) in (forward, extra_repr):
            delattr(module, name)


def installed(module: nn.Module, forward) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is forward


def hooked(*modules: nn.Module) -> bool:
    """A forward (pre-)hook on any of ``modules`` or a global one: a lean form that does not call those
    modules would skip it, so it must take the modules' own forward then."""
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))
