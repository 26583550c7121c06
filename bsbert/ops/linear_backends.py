"""Linear backends: each one says what it supports (``not_supported_reasons``) and prepares a callable
for one weight. The dispatcher (bsbert.ops.dispatch) picks among the ones that fit.

A prepared linear computes ``act(x @ W.T + b)`` for the *packed* weight W (dead heads/neurons already
removed); ``gelu`` fuses BERT's exact erf GELU where the backend can.
"""
from __future__ import annotations

import functools
import textwrap

import torch
import torch.nn.functional as F

from bsbert import _ext


def _has_kernel(op: str, key: str) -> bool:
    if not _ext.available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"bsbert::{op}", key)
    except RuntimeError:
        return False


class PreparedLinear:
    """Holds whatever tensors a backend needs; call it with x.

    ``run(tensors, x)`` reads the tensors from ``self.tensors`` on every call rather than closing over them:
    a ``copy.deepcopy`` of a patched model copies this dict, and closures copied by reference kept computing
    with the original's packed weights (and kept them alive)."""

    def __init__(self, backend: "LinearBackend", run, tensors: dict, block: int | None, aln_run=None):
        self.backend, self.run, self.tensors, self.block = backend, run, tensors, block
        # Fixed sizes for torch.compile(dynamic=True): these plain attributes would get size symbols, and
        # duck sizing gave the sequence dimension the same symbol when their values met (a first call at
        # seq 37 with a layer of 37 kept neurons), pinned it with the linears' shape checks and recompiled
        # for the next length.
        for t in tensors.values():
            if isinstance(t, torch.Tensor):
                torch._dynamo.mark_static(t)
        # run's output followed by residual add + LayerNorm in one kernel, where a backend has one:
        # aln_run(tensors, x, residual, ln_weight, ln_bias, eps)
        self.aln_run = aln_run

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(self.tensors, x)

    @property
    def add_layer_norm(self):
        """``add_layer_norm(x, residual, ln_weight, ln_bias, eps)`` on this linear's output, or None (or what was
        assigned to it: tests and A/B scripts wrap or turn off the fused form)."""
        if "_add_layer_norm_set" in self.__dict__:
            return self._add_layer_norm_set
        if self.aln_run is None:
            return None
        return functools.partial(self.aln_run, self.tensors)

    @add_layer_norm.setter
    def add_layer_norm(self, fn) -> None:
        self._add_layer_norm_set = fn


class LinearBackend:
    name = "?"
    format = "dense"  # or "bsr"

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype, block: int | None) -> list[str]:
        raise NotImplementedError

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool,
                block: int | None) -> PreparedLinear:
        raise NotImplementedError


class TorchDense(LinearBackend):
    """torch's own F.linear (MKL/cuBLAS): always available, the reference."""
    name = "torch-dense"

    def not_supported_reasons(self, device, dtype, block):
        return []

    def prepare(self, weight, bias, gelu, block):
        def run(t, x):
            y = F.linear(x, t["weight"], t["bias"])
            return F.gelu(y) if gelu else y

        return PreparedLinear(self, run, {"weight": weight.contiguous(), "bias": bias}, None)


@functools.lru_cache(maxsize=None)
def _onednn_probe(dtype: torch.dtype) -> str | None:
    """oneDNN may lack a primitive for a dtype on this CPU (e.g. bf16 without AVX-512): try once."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn)"
    try:
        x = torch.randn(2, 32).to(dtype)
        w = torch.randn(32, 32).to(dtype).to_mkldnn()
        torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    except Exception as exc:  # the op raises RuntimeError when no primitive fits
        # oneDNN's first line, whole words only (a cut at 80 characters ended mid-word: "...propagatio")
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        return f"oneDNN has no {dtype} inner-product primitive here ({textwrap.shorten(first, 160)})"
    return None


class OneDnnDense(LinearBackend):
    """oneDNN inner product on a pre-reordered weight, GELU fused: the fastest dense CPU path in torch."""
    name = "onednn-dense"

    def not_supported_reasons(self, device, dtype, block):
        reasons = []
        if device.type != "cpu":
            reasons.append(f"oneDNN linear runs on cpu, tensor is on {device.type}")
        if dtype not in (torch.float32, torch.bfloat16):
            reasons.append(f"dtype {dtype} not supported (float32, bfloat16)")
        if not reasons:
            probe = _onednn_probe(dtype)
            if probe:
                reasons.append(probe)
        return reasons

    def prepare(self, weight, bias, gelu, block):
        attr, alg = ("gelu", "none") if gelu else ("none", "")

        def run(t, x):
            if torch.compiler.is_compiling():
                # inductor lowers mkldnn linears only for frozen weights; it picks its own GEMM here
                y = F.linear(x, t["weight"], t["bias"])
                return F.gelu(y) if gelu else y
            return torch.ops.mkldnn._linear_pointwise(x, t["weight"], t["bias"], attr, [], alg)

        return PreparedLinear(self, run, {"weight": weight.contiguous(), "bias": bias}, None)


def _prepare_bsr_op(backend, weight, bias, gelu, block, pack) -> PreparedLinear:
    """torch.ops.bsbert.bsr_linear on ``pack(bsm)``, the values in the layout of the device's kernel."""
    from bsbert.formats import BlockSparseMatrix

    bsm = BlockSparseMatrix.from_dense(weight, block, pad=True)
    n, k = bsm.shape

    def run(t, x):
        return torch.ops.bsbert.bsr_linear(x, t["crow_indices"], t["col_indices"], t["values"], t["bias"], n, k,
                                           block, gelu)

    # bsm is kept so the packed weight can be saved / inspected (bsbert.save)
    return PreparedLinear(backend, run, {"crow_indices": bsm.crow_indices, "col_indices": bsm.col_indices,
                                         "values": pack(bsm), "bias": bias, "bsm": bsm}, block)


class CpuBsr(LinearBackend):
    """bsbert's SIMD C++ block-sparse kernel (csrc/cpu), also serving dense weights (one block row
    per 32 outputs) when that beats the library GEMMs."""
    name = "cpu-bsr"
    format = "bsr"

    def not_supported_reasons(self, device, dtype, block):
        reasons = []
        if not _ext.available():
            reasons.append(f"C++ extension unavailable: {_ext.reason_unavailable()}")
        elif not _has_kernel("bsr_linear", "CPU"):
            reasons.append("bsbert::bsr_linear has no CPU kernel in this build")
        if device.type != "cpu":
            reasons.append(f"runs on cpu, tensor is on {device.type}")
        if dtype not in (torch.float32, torch.bfloat16):
            reasons.append(f"dtype {dtype} not supported (float32, bfloat16)")
        return reasons

    def prepare(self, weight, bias, gelu, block):
        from bsbert.ops.packing import pack_cpu

        prep = _prepare_bsr_op(self, weight, bias, gelu, block, lambda bsm: pack_cpu(bsm, weight.dtype))
        if not gelu and _has_kernel("bsr_linear_add_layer_norm", "CPU"):
            n, k = prep.tensors["bsm"].shape

            def aln_run(t, x, residual, ln_weight, ln_bias, eps):
                return torch.ops.bsbert.bsr_linear_add_layer_norm(
                    x, t["crow_indices"], t["col_indices"], t["values"], t["bias"], n, k, block, residual,
                    ln_weight, ln_bias, eps)

            prep.aln_run = aln_run
        return prep


class CudaBsr(LinearBackend):
    """bsbert's CUDA C++ tensor-core block-sparse kernel (csrc/cuda)."""
    name = "cuda-bsr"
    format = "bsr"
    # Tile configurations (rows x warps) per block size that BSBERT_CUDA_BSR_TILE can force; mirrors the
    # BsrConfig and SlabConfig lists in csrc/cuda/bsr_linear_cuda.cu (tests and benchmarks iterate over it).
    # "slab..." = the x-slab kernel (csrc/cuda/bsr_linear_slab.cuh): x's [rows, K] slab stays in shared
    # memory, so it needs rows * K * 2 bytes + the W rings (it raises a clear error when K is too large).
    # "wgslab..." = its Hopper variant with wgmma (csrc/cuda/bsr_linear_wgmma.cuh): sm_90a builds on
    # compute capability 9.0 only (a clear error elsewhere; `runnable_tiles` leaves them out there).
    TILES = {16: ("64x4", "128x4"),
             32: ("64x4", "64x8", "128x4", "128x8", "256x8", "slab64x8", "slab64x4", "slab32x8", "slab32x4",
                  "wgslab64x16", "wgslab64x8"),
             64: ("64x4", "128x4", "128x8")}

    @classmethod
    def runnable_tiles(cls, block, device=None):
        """The TILES of `block` that can run on `device` (default: the current CUDA device): the wgmma
        tiles need compute capability 9.0 and an extension built with sm_90a code."""
        hopper = (torch.cuda.is_available() and torch.cuda.get_device_capability(device) == (9, 0)
                  and _ext.has_sm90a())
        return tuple(t for t in cls.TILES.get(block, ()) if hopper or not t.startswith("wgslab"))

    def not_supported_reasons(self, device, dtype, block):
        reasons = []
        if device.type != "cuda":
            reasons.append(f"runs on cuda, tensor is on {device.type}")
        if not _ext.available():
            reasons.append(f"C++ extension unavailable: {_ext.reason_unavailable()}")
        elif not _has_kernel("bsr_linear", "CUDA"):
            reasons.append("extension was built without CUDA kernels")
        elif device.type == "cuda" and torch.cuda.is_available() and _ext.cuda_kernel_problem(device):
            reasons.append(_ext.cuda_kernel_problem(device))
        if dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"dtype {dtype} not supported (float16, bfloat16)")
        if block not in (None, 16, 32, 64):
            reasons.append(f"block {block} not supported (16, 32, 64)")
        return reasons

    def prepare(self, weight, bias, gelu, block):
        return _prepare_bsr_op(self, weight, bias, gelu, block, lambda bsm: bsm.values)  # natural layout


class TritonBsr(LinearBackend):
    """bsbert's Triton block-sparse kernel (bsbert/triton)."""
    name = "triton-bsr"
    format = "bsr"

    def not_supported_reasons(self, device, dtype, block):
        try:
            from bsbert import triton as bt
        except Exception as exc:  # pragma: no cover - bsbert.triton guards its own imports
            return [f"bsbert.triton failed to import: {exc}"]
        if device.type != "cuda":  # the interpreter works on cpu, but only for tests
            return [f"only used on cuda (tensor is on {device.type})"]
        return list(bt.not_supported_reasons(device, dtype, block=block))

    def prepare(self, weight, bias, gelu, block):
        from bsbert.formats import BlockSparseMatrix
        from bsbert.triton.bsr_linear import bsr_linear_triton

        bsm = BlockSparseMatrix.from_dense(weight, block, pad=True)

        def run(t, x):
            return bsr_linear_triton(x, t["bsm"], t["bias"], gelu=gelu)

        return PreparedLinear(self, run, {"crow_indices": bsm.crow_indices, "col_indices": bsm.col_indices,
                                          "values": bsm.values, "bias": bias, "bsm": bsm}, block)


BACKENDS: dict[str, LinearBackend] = {b.name: b for b in (
    CpuBsr(), CudaBsr(), TritonBsr(), OneDnnDense(), TorchDense())}
