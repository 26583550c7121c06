"""bsbert's Triton backend: block-sparse linear layers and pruned-head attention.

Importing this package never fails, with or without triton: the kernels live in submodules
(:mod:`bsbert.triton.bsr_linear`, :mod:`bsbert.triton.attention`) that import triton and register the
ops ``torch.ops.bsbert.triton_bsr_linear``, ``triton_pruned_attention`` and
``triton_pruned_attention_varlen`` when first used. The public functions are reachable here lazily::

    from bsbert import triton as bt
    if not bt.not_supported_reasons(x.device, x.dtype, block=32):
        y = bt.bsr_linear_triton(x, bsm, bias, gelu=True)

On a machine without a GPU the kernels run through Triton's CPU interpreter; ``TRITON_INTERPRET=1``
must be in the environment before triton is first imported.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import torch

SUPPORTED_BLOCKS = (16, 32, 64)
SUPPORTED_HEAD_DIMS = (32, 64)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LAZY = {
    "bsr_linear_triton": "bsbert.triton.bsr_linear",
    "pruned_attention_triton": "bsbert.triton.attention",
    "pruned_attention_varlen_triton": "bsbert.triton.attention",
}

__all__ = ["available", "not_supported_reasons", "register_ops", *_LAZY]

_state: dict = {}


def _import_error() -> str | None:
    """None when triton imports, else why not (cached)."""
    if "error" not in _state:
        try:
            spec = importlib.util.find_spec("triton")
        except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
            spec = None
        if spec is None:
            _state["error"] = "triton is not installed"
        else:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401
                _state["error"] = None
            except Exception as exc:  # broken install, missing libs, ...
                _state["error"] = f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return _state["error"]


def available() -> bool:
    """True when triton can be imported (the kernels may still not support a given device/dtype)."""
    return _import_error() is None


def _interpreted() -> bool:
    """Whether bsbert's kernels run in the interpreter (decided when they are first imported)."""
    mod = sys.modules.get("bsbert.triton.bsr_linear")
    if mod is not None:
        return bool(mod.INTERPRETED)
    from bsbert.triton._common import interpret_env

    return interpret_env()


def _interpreter_problem() -> str | None:
    """None when Triton's CPU interpreter runs a loop bounded by a loaded value (the pattern every bsbert
    kernel uses for its block-row pointers), else why not (cached; a few ms, once). triton 3.6's
    interpreter converts such a value with int() of a 1-element array, which numpy >= 2.4 refuses
    (measured: triton 3.6.0 with numpy 2.3.5 passes, with 2.4 every kernel fails; triton 3.8.0 with
    numpy 2.4.6 passes)."""
    if "interpreter" not in _state:
        import numpy
        import triton  # (the caller checked that it imports)
        import triton.language as tl

        try:
            @triton.jit
            def _count(n_ptr, out_ptr):
                n = tl.load(n_ptr)
                acc = tl.zeros((1,), dtype=tl.int32)
                for _ in range(0, n):
                    acc += 1
                tl.store(out_ptr + tl.arange(0, 1), acc)

            n = torch.tensor([3], dtype=torch.int32)
            out = torch.zeros(1, dtype=torch.int32)
            _count[(1,)](n, out)
            _state["interpreter"] = None if int(out[0]) == 3 else f"triton's interpreter counted {int(out[0])} of 3"
        except Exception as exc:
            _state["interpreter"] = (f"triton {getattr(triton, '__version__', '?')}'s interpreter fails with numpy "
                                     f"{numpy.__version__} ({type(exc).__name__}: {str(exc)[:120]}); "
                                     f"numpy < 2.4 or a newer triton works")
    return _state["interpreter"]


def not_supported_reasons(device, dtype, block: int | None = None,
                          head_dim: int | None = None) -> list[str]:
    """Why the Triton kernels cannot run for this device/dtype (and block / head_dim); [] = usable."""
    reasons: list[str] = []
    err = _import_error()
    if err is not None:
        reasons.append(err)
    dev = torch.device(device)
    if dev.type == "cpu":
        if not _interpreted():
            reasons.append("tensor is on cpu and TRITON_INTERPRET is not set")
        elif err is None and (problem := _interpreter_problem()):
            reasons.append(problem)
    elif dev.type == "cuda":
        if not torch.cuda.is_available():
            reasons.append("CUDA is not available")
        elif dtype == torch.bfloat16 and not _interpreted():
            idx = dev.index if dev.index is not None else torch.cuda.current_device()
            major, _ = torch.cuda.get_device_capability(idx)
            if major < 8:
                reasons.append("bfloat16 needs a GPU of compute capability >= 8.0")
    else:
        reasons.append(f"device type {dev.type!r} is not supported (cuda, or cpu with "
                       f"TRITON_INTERPRET=1)")
    if dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {dtype} not in (float16, bfloat16, float32)")
    if block is not None and block not in SUPPORTED_BLOCKS:
        reasons.append(f"block {block} not in {SUPPORTED_BLOCKS}")
    if head_dim is not None and head_dim not in SUPPORTED_HEAD_DIMS:
        reasons.append(f"head_dim {head_dim} not in {SUPPORTED_HEAD_DIMS}")
    return reasons


def register_ops() -> bool:
    """Import the kernel modules so that the ``torch.ops.bsbert.triton_*`` ops exist; False if no triton."""
    if not available():
        return False
    importlib.import_module("bsbert.triton.bsr_linear")
    importlib.import_module("bsbert.triton.attention")
    return True


def __getattr__(name):
    if name in _LAZY:
        if not available():
            raise ImportError(f"bsbert.triton.{name} needs triton: {_import_error()}")
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bsbert.triton' has no attribute {name!r}")
