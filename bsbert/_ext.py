"""Loads the compiled extension (bsbert._C) if it is there and matches this torch; never raises.

A missing or mismatched extension is not fatal: bsbert warns once and the dispatcher falls back to
its pure-torch backend. ``status()`` says what happened (used by ``python -m bsbert.info``).
"""
from __future__ import annotations

import os
import warnings

import torch

_state = {"loaded": False, "module": None, "reason": None}

ISA_LEVELS = ("portable", "avx2", "avx512", "avx512_bf16")  # what the CPU kernels accept in BSBERT_CPU_ISA


def unknown_isa_cap() -> str | None:
    """BSBERT_CPU_ISA when it is set to something the kernels ignore (csrc/cpu/isa.cpp takes ISA_LEVELS
    exactly: "AVX2" or "avx-512" leave the CPU's own level in effect), else None."""
    cap = os.environ.get("BSBERT_CPU_ISA")
    return cap if cap is not None and cap not in ISA_LEVELS else None


def _try_load():
    try:
        import importlib

        _C = importlib.import_module("bsbert._C")  # registers torch.ops.bsbert.* as a side effect
    except Exception as exc:  # ImportError, undefined symbols from another torch build, ...
        return None, f"bsbert._C could not be imported ({type(exc).__name__}: {exc})"
    built = _C.torch_version()
    if built.split("+")[0] != torch.__version__.split("+")[0]:
        return None, (f"bsbert._C was built against torch {built} but torch {torch.__version__} "
                      f"is running; rebuild with `pip install --no-build-isolation .`")
    return _C, None


def load(warn: bool = True):
    if not _state["loaded"]:
        _state["module"], _state["reason"] = _try_load()
        _state["loaded"] = True
        if _state["module"] is not None:
            from bsbert.ops.fake import register_fakes

            register_fakes()  # meta kernels for torch.compile / export / opcheck
            cap = unknown_isa_cap()
            if cap is not None and warn:  # (the kernels read it per call; said once, when they load)
                warnings.warn(f"BSBERT_CPU_ISA={cap!r} is not one of {', '.join(ISA_LEVELS)}: ignored, the CPU "
                              f"kernels run at this CPU's level ({_state['module'].cpu_isa()})", RuntimeWarning,
                              stacklevel=3)
            if isa_emulated() and warn:
                warnings.warn("bsbert._C is the emulated AVX-512 test build (BSBERT_EMULATE_AVX512=1): its AVX-512 "
                              "kernels run through SIMDe, many times slower than native; rebuild without the switch "
                              "for use", RuntimeWarning, stacklevel=3)
        if _state["module"] is None and warn:
            warnings.warn(f"{_state['reason']}; using bsbert's pure-torch fallbacks", RuntimeWarning,
                          stacklevel=3)
    return _state["module"]


def isa_emulated() -> bool:
    """True for the emulated AVX-512 test build (setup.py BSBERT_EMULATE_AVX512=1): the AVX-512 levels run
    through SIMDe on an AVX2+FMA CPU (csrc/cpu/avx512_intrinsics.h), for correctness tests only."""
    mod = load(warn=False)  # (load itself asks this once the module is in _state)
    return mod is not None and hasattr(mod, "cpu_isa_emulated") and bool(mod.cpu_isa_emulated())


def available() -> bool:
    return load(warn=False) is not None


def reason_unavailable() -> str | None:
    load(warn=False)
    return _state["reason"]


def has_op(name: str) -> bool:
    """True when torch.ops.bsbert.<name> exists and has a kernel for some device."""
    if not available():
        return False
    return hasattr(torch.ops.bsbert, name)


def has_sm90a() -> bool:
    """True when the extension's CUDA kernels include sm_90a code (the Hopper wgmma kernels). An extension
    built before this query existed has none."""
    mod = load(warn=False)
    return mod is not None and getattr(mod, "with_sm90a", lambda: False)()


_KERNEL_PROBLEMS: dict = {}


def cuda_kernel_problem(device) -> str | None:
    """None if the extension's CUDA kernels can run on ``device`` (a CUDA torch.device), else why not: a GPU
    whose architecture the build has no code for (BSBERT_CUDA_ARCH_LIST) would fail at its first launch,
    inside patch's measurement. Asked once per device."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _KERNEL_PROBLEMS:
        mod = load(warn=False)
        probe = getattr(mod, "cuda_kernel_problem", None)  # (an extension built before this query: not asked)
        problem = probe(index) if probe is not None else ""
        if problem:
            major, minor = torch.cuda.get_device_capability(index)
            problem = (f"this build has no kernel code for {torch.cuda.get_device_name(index)} (sm_{major}{minor}): "
                       f"{problem}; rebuild with BSBERT_CUDA_ARCH_LIST including {major}.{minor}")
        _KERNEL_PROBLEMS[index] = problem or None
    return _KERNEL_PROBLEMS[index]


def bf16_widened_on_cpu() -> bool:
    """True where bsbert's CPU kernels run bf16 widened to fp32: the CPU level (after BSBERT_CPU_ISA) has
    AVX2 or AVX-512 but no ``vdpbf16ps``. There a bf16 GEMM's ceiling is the fp32 multiply-add rate, and
    the bf16 GEMMs torch offers are slow emulations (the 2-core Zen 5 capped to AVX2: torch's bf16
    F.linear 52-63 GFLOP/s, oneDNN none, oneDNN fp32 ~230-245, bsbert's widened bf16 kernel 174-214)."""
    mod = load(warn=False)
    return mod is not None and hasattr(mod, "cpu_isa") and mod.cpu_isa() in ("avx2", "avx512")
