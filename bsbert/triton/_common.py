"""Shared helpers of the Triton backend (imported only once triton is known to be importable)."""
from __future__ import annotations

import contextlib
import os

import torch


def interpret_env() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def autotune_enabled() -> bool:
    """False when ``BSBERT_TRITON_AUTOTUNE=0``: the kernels then run one fixed, shape-derived config per
    launch instead of benchmarking every candidate on each new shape. Autotuning a test suite's dozens
    of shapes costs minutes of compile + benchmark on a GPU; the fixed config is for tests and quick
    runs, autotuning (the default) for speed."""
    return os.environ.get("BSBERT_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


_FIXED_CONFIG_KERNELS: dict = {}


def fixed_config_kernel(kernel, config_kwargs: dict, num_warps: int, num_stages: int):
    """``kernel`` wrapped as a one-config autotuner (Triton launches a single config without
    benchmarking it), cached per kernel and config so each one compiles once. Goes through the same
    ``triton.autotune`` launch path as the tuned kernel, so ``wrap_triton``/``torch.compile`` see the
    same thing either way."""
    import triton

    # id(kernel): the kernels are module-level objects that live as long as the process
    key = (id(kernel), tuple(sorted(config_kwargs.items())), num_warps, num_stages)
    if key not in _FIXED_CONFIG_KERNELS:
        _FIXED_CONFIG_KERNELS[key] = triton.autotune(
            configs=[triton.Config(dict(config_kwargs), num_warps=num_warps, num_stages=num_stages)],
            key=[])(kernel)
    return _FIXED_CONFIG_KERNELS[key]


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` (``triton.jit`` output) runs in the interpreter.

    Triton decides this when the kernel is decorated (i.e. when the bsbert.triton module is first
    imported), so this, not the current environment, is what counts.
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(kernel, InterpretedFunction)


def launcher(kernel):
    """``torch.library.wrap_triton(kernel)`` where that works, else the kernel itself.

    Under ``TRITON_INTERPRET=1`` ``triton.jit`` returns an ``InterpretedFunction``; newer torch hands it
    back unchanged, older torch (e.g. 2.11) raises. Either way the interpreted kernel launches eagerly.
    """
    try:
        from torch.library import wrap_triton
    except ImportError:  # pragma: no cover - torch < 2.6
        return kernel
    try:
        return wrap_triton(kernel)
    except RuntimeError:
        return kernel


def on_device_of(t: torch.Tensor):
    """Context for a launch: ``t``'s GPU made current. Triton launches on the current device and its stream, so
    tensors on cuda:1 while cuda:0 is current went to the wrong GPU (torch's own ops guard the device the same
    way). Nothing while tracing (fake tensors: no launch) or on the CPU (the interpreter)."""
    if t.device.type == "cuda" and not is_traced(t):
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.device.type == "meta"


def is_traced(t: torch.Tensor) -> bool:
    """True while tracing (fake / meta / functional tensors): there are no values to read."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    return is_fake(t) or isinstance(t, FunctionalTensor)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_device(t: torch.Tensor, interpreted: bool) -> None:
    """Raise a clear error instead of a Triton crash for tensors the kernels cannot run on."""
    if is_fake(t):
        return
    if t.device.type == "cpu" and not interpreted:
        raise ValueError("tensor is on cpu and TRITON_INTERPRET is not set (it must be set before "
                         "triton is first imported)")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"device type {t.device.type!r} is not supported by bsbert's triton kernels")


def make_op(name: str, fn, interpreted: bool):
    """Register ``fn`` as the op ``name``.

    On GPUs: ``torch.library.triton_op`` (torch.compile sees and can optimise the triton kernels).
    Under the interpreter, or on a torch without ``triton_op``: ``torch.library.custom_op`` -- an
    opaque op; ``triton_op`` would make AOT tracing run the interpreted kernel on functional/fake
    tensors, which the interpreter cannot do. Callers register the fake kernel on the result.
    """
    from torch.library import custom_op

    if not interpreted:
        try:
            from torch.library import triton_op
        except ImportError:  # pragma: no cover - torch < 2.6
            triton_op = None
        if triton_op is not None:
            return _inference_only(name, triton_op(name, fn, mutates_args=()))
    return _inference_only(name, custom_op(name, fn, mutates_args=()))


def _inference_only(name: str, op):
    """The op with bsbert's inference-only backward (as the C++ ops have): without one, torch.compile of a
    patched model on Triton kernels failed to compile when called in grad mode (AOTAutograd traces the
    backward: "no autograd formula was registered"), and a backward said nothing of bsbert."""
    from bsbert.ops import inference_only

    inference_only.register(name)
    return op
