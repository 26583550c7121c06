"""Guards on a patched model: calls that would leave it half converted or silently different.

nn.Module's own methods, overridden on the instance (the class stays what it was) of the model and of every
module holding a patched one, so that a call on any of them refuses before anything changes (Module.to
converts children first: a guard only inside the patched modules would fire after the embeddings had been
converted). ``bsbert.patch`` installs them, ``bsbert.unpatch`` removes them."""
from __future__ import annotations

import types

import torch
import torch.nn as nn

from bsbert.errors import BsbertError

CONVERSION_REFUSED = ("bsbert: a patched model cannot change dtype or device ({what}): its packed weights live "
                      "in the kernels' prepared calls, out of reach of .to()/.half()/.cuda(), so a conversion "
                      "would leave it half converted; nothing was converted. bsbert.unpatch(model), convert it, "
                      "then bsbert.patch it again (a model from bsbert.load: bsbert.load(dir, device=...))")


def _guarded_apply(self, fn, *args, **kwargs):
    """Module._apply (behind .to, .half, .float, .cuda, .cpu, .to_empty, ...): allowed only when ``fn``
    leaves the tensors as they are (.float() of an fp32 model, .to() its own device), judged on the smallest
    floating-point tensor of each (dtype, device) the module holds, all of them before any is converted: a bf16
    model keeps fp32 LayerNorms, and one probe (an fp32 LayerNorm weight) let .float() convert the embeddings
    before a patched module below refused."""
    probes = {}
    for t in (*self.parameters(), *self.buffers()):
        key = (t.dtype, t.device)
        if t.is_floating_point() and (key not in probes or t.numel() < probes[key].numel()):
            probes[key] = t
    for probe in probes.values():
        try:
            out = fn(probe)
        except Exception as exc:  # e.g. .cuda() where there is none: refused either way
            raise BsbertError(CONVERSION_REFUSED.format(what=f"the conversion failed: {exc}")) from exc
        if out is not probe:
            if not isinstance(out, torch.Tensor):
                what = "a conversion that replaces its tensors"
            elif (out.dtype, out.device) == (probe.dtype, probe.device):  # ("float32 on cpu -> float32 on cpu")
                what = (f"{probe.dtype} on {probe.device} kept, but every tensor replaced by a new one, as "
                        f".to_empty() does (uninitialised storage)")
            else:
                what = f"{probe.dtype} on {probe.device} -> {out.dtype} on {out.device}"
            raise BsbertError(CONVERSION_REFUSED.format(what=what.replace("torch.", "")))
    return type(self)._apply(self, fn, *args, **kwargs)


def _guarded_train(self, mode: bool = True):
    """train(True) would turn dropout on in the modules bsbert left (embeddings, task head) but not in its
    own (no dropout, no gradients through the kernels): a hybrid that matches neither mode. eval() and
    train(False) go through."""
    if mode:
        raise BsbertError("a bsbert-patched model is inference-only: train() would give a hybrid (dropout in the "
                          "embeddings and task head, none in the patched encoder); use eval(), or "
                          "bsbert.unpatch(model) to train and bsbert.patch it again afterwards")
    return type(self).train(self, mode)


def _guarded_save_pretrained(self, *args, **kwargs):
    raise BsbertError("save_pretrained on a bsbert-patched model would write a checkpoint without the encoder's "
                      "linears (they live in bsbert's packed modules, not in state_dict), which from_pretrained "
                      "would fill with random weights; use bsbert.save(model, dir) / bsbert.load(dir), or "
                      "bsbert.unpatch(model) first")


_GUARDS = {"_apply": _guarded_apply, "train": _guarded_train, "save_pretrained": _guarded_save_pretrained}


def _guarded_modules(model: nn.Module) -> list[nn.Module]:
    """The model and every module that holds (or is) one of bsbert's patched modules."""
    from bsbert.nn.linear import NotPickled  # every patched module type

    inside = {""}
    for name, m in model.named_modules():
        if isinstance(m, NotPickled):
            parts = name.split(".")
            inside.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return [m for name, m in model.named_modules() if name in inside]


def install_guards(model: nn.Module) -> None:
    for m in _guarded_modules(model):
        for name, guard in _GUARDS.items():
            if hasattr(type(m), name):  # save_pretrained: transformers' models only
                object.__setattr__(m, name, types.MethodType(guard, m))


def remove_guards(modules) -> None:
    for m in modules:
        for name, guard in _GUARDS.items():
            if getattr(vars(m).get(name), "__func__", None) is guard:
                object.__delattr__(m, name)
