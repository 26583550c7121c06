"""A counter that bsbert's own modules and backend choices bump whenever an attribute of theirs is set,
deleted or a submodule added, so that a check "has anything bsbert built been replaced since?" costs one
comparison instead of a dictionary lookup per watched attribute.

Why: the fused encoder must never run with tensors taken from a module or choice that was replaced after
patch (bsbert.fused_encoder.Program.stale). Looking up its ~480 watched attributes cost ~170 us per call in
a cold CPU forward (each lookup misses the caches, after the op has streamed the weights through them):
0.7% of a bf16 seq-128 forward. bsbert's classes mix :class:`Bumps` in; attributes of other classes
(transformers' layers: 120 of the 480) are still looked up every call. Measured on the seed-like model,
bf16 seq 128, 2 threads: the check 170 -> 66 us (cold median); 800 forwards alternating with a forced
full check: median -0.10 / -0.13 ms of ~24. Writes that bypass ``__setattr__`` / ``add_module``
(``obj.__dict__[k] = v``, ``object.__setattr__``, ``module._modules[k] = v``) are not seen.

The counter is global (patching another model bumps it too): a changed counter means "look again", not
"stale"; a check that finds nothing replaced takes the new value as its own.

Submodules of other classes (transformers' ``layer.attention`` and the like) are covered too once
:func:`watch_module_assignments` has run: torch calls its global module-registration hooks on every
submodule assignment (``setattr``, ``add_module`` / ``register_module``), and bsbert's hook bumps the
counter. That took the remaining 120 lookups (~40 us of a cold bf16 seq-128 forward) off the per-call
check. Not seen: ``del module.child`` (torch calls no hook there) and writes into ``_modules`` directly.
"""
from __future__ import annotations

_COUNT = [0]
_ASSIGNMENT_HOOK: list = []  # [RemovableHandle] once installed
_PARAMETER_HOOK: list = []  # [RemovableHandle or None] once installed


def current() -> int:
    return _COUNT[0]


class Bumps:
    """Mixin: setting or deleting any attribute (and, on an nn.Module, adding a submodule) bumps the counter."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        _COUNT[0] += 1

    def __delattr__(self, name):
        super().__delattr__(name)
        _COUNT[0] += 1

    def add_module(self, name, module):  # register_module calls it too; only used on nn.Module subclasses
        super().add_module(name, module)
        _COUNT[0] += 1


def _bump_on_assignment(module, name, submodule):
    _COUNT[0] += 1
    return None  # the submodule as given


def _install_once(slot: list, hook_name: str) -> bool:
    """Install (once, for the process) torch's global registration hook ``hook_name`` with the bump; False if
    this torch has no such hook."""
    if not slot:
        from torch.nn.modules import module as nn_module

        register = getattr(nn_module, hook_name, None)
        slot.append(register(_bump_on_assignment) if register is not None else None)
    return slot[0] is not None


def watch_module_assignments() -> bool:
    """Install (once, for the process) the global module-registration hook that bumps the counter on every
    submodule assignment; False if this torch has no such hook (then those attributes are looked up on
    every call)."""
    return _install_once(_ASSIGNMENT_HOOK, "register_module_module_registration_hook")


def watch_parameter_assignments() -> bool:
    """The same for parameters: assigning a Parameter or None (``norm.weight = nn.Parameter(...)``,
    ``load_state_dict(assign=True)``, torch.nn.utils.parametrize) goes through register_parameter, whose
    global hook (same signature: module, name, value -> None) then bumps the counter."""
    return _install_once(_PARAMETER_HOOK, "register_module_parameter_registration_hook")
