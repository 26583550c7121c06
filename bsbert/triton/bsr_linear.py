"""Triton block-sparse linear layer: ``y = x @ W.T + bias`` (optionally followed by exact erf GELU).

``W`` is a :class:`bsbert.formats.BlockSparseMatrix` (BSR, square blocks of 16/32/64, blocks stored in
the weight's own orientation). One program computes one ``BLOCK_M x block`` tile of ``y``: the rows of
an M tile times one block row of ``W``. It walks the block row's stored blocks (``crow/col_indices``),
loads the matching ``BLOCK_M x block`` slice of ``x`` and the ``block x block`` weight block and
accumulates ``tl.dot`` in fp32. Programs are launched in a grouped (swizzled) order so that the
programs running together share the same few x tiles in L2.

* dtypes: fp16 / bf16 / fp32 activations; the weight blocks are converted to ``x.dtype`` on load, so
  the weight may be stored in another supported dtype. fp32 uses exact ("ieee") products unless
  ``allow_tf32=True``.
* any M (rows masked), N/K not multiples of the block (weights are zero-padded, and the kernel masks x
  loads at ``k >= K`` and stores at ``n >= N``).
* empty block rows: the loop does nothing and the program still writes ``bias`` (+ GELU), or zeros.
* autotuned on GPUs (key: M bucket, N, K, block, density bucket); one fixed small config under the
  Triton interpreter.
* checks: shapes, dtypes and devices always (free); the index values (crow from 0 to nnz, non-decreasing,
  col in range: ``bsbert.formats.validate_indices``) only where they are free to read, on CPU tensors
  under the interpreter; on a GPU the kernel trusts them (see ``_bsr_linear_impl``).

The op ``torch.ops.bsbert.triton_bsr_linear`` (``torch.library.triton_op`` on GPUs, so that
``torch.compile`` sees the kernel; an opaque ``custom_op`` under the interpreter) has a fake kernel;
:func:`bsr_linear_triton` is the convenience entry point taking the matrix object.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from bsbert.formats import validate_indices
from bsbert.triton._common import (autotune_enabled, check_device, fixed_config_kernel, is_fake,
                                    is_interpreted, is_traced, launcher, make_op, next_pow2, on_device_of)

__all__ = ["bsr_linear_triton", "triton_bsr_linear"]

# UPCAST (interpreter + bf16 only): the interpreter's tl.dot multiplies bf16 *bit patterns* and its
# fp32 -> bf16 cast truncates. Under the interpreter bf16 operands are therefore widened to fp32 (exact,
# and bf16 x bf16 products are exact in fp32, as on tensor cores) and results rounded explicitly to
# nearest even, so the interpreter computes what the GPU computes. GPU launches never set it.


@triton.jit
def round_to_bf16(x):
    """fp32 -> bf16 with round-to-nearest-even done in integer arithmetic.

    Only used under the interpreter, whose fp32 -> bf16 cast truncates (GPUs round to nearest even);
    finite inputs only (bsbert never feeds NaN/Inf here)."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _bsr_linear_kernel(
    x_ptr, vals_ptr, crow_ptr, col_ptr, bias_ptr, y_ptr,
    M, N, K, NUM_BLOCK_ROWS,
    stride_xm, stride_xk, stride_ym, stride_yn,
    M_BUCKET, DENSITY_BUCKET,  # autotune keys only
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    # grouped launch order: GROUP_M consecutive M tiles sweep the block rows together, so the x tiles
    # they read stay in L2 while every block row consumes them.
    num_pid_in_group = GROUP_M * NUM_BLOCK_ROWS
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_in_group = pid % num_pid_in_group
    pid_m = first_pid_m + (pid_in_group % group_size_m)
    rb = pid_in_group // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK)
    m_mask = offs_m < M
    offs_m_safe = tl.where(m_mask, offs_m, 0).to(tl.int64)

    # int64 block indices: i * BLOCK * BLOCK below passes 2^31 in a values tensor of 2^31 elements or more
    start = tl.load(crow_ptr + rb).to(tl.int64)
    end = tl.load(crow_ptr + rb + 1).to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
    x_rows = x_ptr + offs_m_safe[:, None] * stride_xm
    # weight block i, transposed view [k, n]: values[i][n][k] lives at i*B*B + n*B + k
    w_offs = offs_b[:, None] + offs_b[None, :] * BLOCK
    for i in range(start, end):
        cb = tl.load(col_ptr + i)
        offs_k = cb * BLOCK + offs_b
        k_off = offs_k.to(tl.int64) * stride_xk  # int64: a column-major x has stride_xk = M, and M * K can pass 2^31
        if EVEN_K:  # K % BLOCK == 0: no column mask, so loads vectorise along k
            x = tl.load(x_rows + k_off[None, :], mask=m_mask[:, None], other=0.0)
        else:
            x = tl.load(x_rows + k_off[None, :], mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        w = tl.load(vals_ptr + i * (BLOCK * BLOCK) + w_offs)
        if UPCAST:  # interpreter: its tl.dot multiplies bf16 bit patterns; fp32 products are exact
            # weights of another dtype rounded to bf16 first, as w.to(x.dtype) below does on a GPU
            w = round_to_bf16(w.to(tl.float32))
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=INPUT_PRECISION)

    offs_n = rb * BLOCK + offs_b
    n_mask = offs_n < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    y_ptrs = y_ptr + offs_m_safe[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if UPCAST:
        out = round_to_bf16(acc)
    else:
        out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptrs, out, mask=m_mask[:, None] & n_mask[None, :])


INTERPRETED = is_interpreted(_bsr_linear_kernel)  # fixed when the kernel was decorated


def _tuning_configs():
    # (BLOCK_M, num_warps, num_stages); pruned per block size below. Covers Ampere (stages 2-4)
    # and Hopper (deeper pipelines pay off for the small b x b weight tiles).
    cfgs = []
    for bm, warps, stages in [
        (16, 2, 3), (32, 2, 3), (32, 4, 3), (64, 4, 3), (64, 4, 4), (64, 4, 5),
        (128, 4, 3), (128, 4, 4), (128, 8, 3), (128, 8, 4), (256, 8, 3), (256, 8, 4),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "GROUP_M": 8}, num_warps=warps, num_stages=stages))
    return cfgs


def _prune_configs(configs, named_args, **kwargs):
    m = named_args["M"]
    block = kwargs.get("BLOCK", named_args.get("BLOCK"))
    out = []
    for c in configs:
        bm = c.kwargs["BLOCK_M"]
        if bm > max(16, next_pow2(m)):  # no tile taller than the (padded) problem
            continue
        if block == 64 and bm == 256:  # 256x64 fp32 accumulator is too much register pressure
            continue
        out.append(c)
    return out or configs[:1]


_tuned_kernel = triton.autotune(
    configs=_tuning_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK", "DENSITY_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_bsr_linear_kernel)

_INTERP_CONFIG = {"BLOCK_M": 32, "GROUP_M": 4}


def _m_bucket(m) -> int:
    if not isinstance(m, int):  # SymInt while tracing with dynamic shapes: don't specialise on it
        return m
    return min(next_pow2(max(m, 1)), 16384)


def _density_bucket(nnz, total: int) -> int:
    """Density rounded to tenths (0..10); cheap, shape-only (no device sync)."""
    if not isinstance(nnz, int) or not isinstance(total, int):  # SymInt while tracing
        return 0
    return int(round(10 * nnz / max(total, 1)))


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(x, crow, col, values, bias, n, k):
    """Shape / dtype / device checks, in the words of the CPU op (csrc/cpu/bsr_linear.cpp ``prepare``).
    Free (no values read), so always run, by the op and by its fake kernel alike: a meta-device argument
    dispatches to the fake kernel, which must refuse rather than hand back an unwritten tensor."""
    if n < 0 or k < 0:
        raise ValueError(f"bsr_linear: negative out_features ({n}) or in_features ({k})")
    for name, t in (("crow_indices", crow), ("col_indices", col), ("values", values)):
        if t.device != x.device:
            raise ValueError(f"bsr_linear: {name} is on {t.device} but x is on {x.device}")
    if x.dim() < 1:
        raise ValueError("bsr_linear: x must have at least 1 dimension")
    if x.dtype not in _DTYPES:
        raise ValueError(f"bsr_linear: x dtype {x.dtype} is not supported (fp16, bf16, fp32)")
    if x.shape[-1] != k:
        raise ValueError(f"bsr_linear: x.shape[-1] = {x.shape[-1]} does not match in_features = {k}")
    if crow.dtype != torch.int32 or col.dtype != torch.int32:
        raise ValueError(f"bsr_linear: crow_indices and col_indices must be int32, got {crow.dtype} "
                         f"and {col.dtype}")
    if crow.dim() != 1 or col.dim() != 1:
        raise ValueError(f"bsr_linear: crow_indices and col_indices must be 1-D, got shapes "
                         f"{tuple(crow.shape)} and {tuple(col.shape)}")
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"bsr_linear: values must be [nnz_blocks, block, block], got "
                         f"{tuple(values.shape)}")
    b = values.shape[1]
    if b not in (16, 32, 64):
        raise ValueError(f"bsr_linear: block must be 16, 32 or 64, got {b}")
    if values.dtype not in _DTYPES:
        raise ValueError(f"bsr_linear: values dtype {values.dtype} is not supported (fp16, bf16, fp32)")
    nbr = (n + b - 1) // b
    if crow.numel() != nbr + 1:
        raise ValueError(f"bsr_linear: crow_indices must have ceil(out_features/block)+1 = {nbr + 1} "
                         f"entries, got {crow.numel()}")
    if values.shape[0] != col.numel():
        raise ValueError(f"bsr_linear: values must hold nnz_blocks = {col.numel()} blocks (one per "
                         f"col_indices entry), got shape {tuple(values.shape)}")
    if bias is not None:
        if bias.device != x.device:
            raise ValueError(f"bsr_linear: bias is on {bias.device} but x is on {x.device}")
        if bias.shape != (n,):
            raise ValueError(f"bsr_linear: bias must have shape [{n}], got {tuple(bias.shape)}")
        if bias.dtype not in _DTYPES:
            raise ValueError(f"bsr_linear: bias dtype {bias.dtype} is not supported (fp16, bf16, fp32)")


def _bsr_linear_impl(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                     bias: torch.Tensor | None, n: int, k: int, gelu: bool,
                     allow_tf32: bool) -> torch.Tensor:
    _check(x, crow, col, values, bias, n, k)
    check_device(x, INTERPRETED)
    b = values.shape[1]
    # The index values (the kernel trusts them as addresses) are checked only where reading them is free:
    # indices on the CPU, i.e. under the interpreter. On a GPU reading them is a device -> host copy and a
    # sync per call, which stalls the launch queue and is illegal inside CUDA-graph capture (the
    # benchmarks and torch.compile's reduce-overhead capture these calls); there the indices come from a
    # BlockSparseMatrix, which validated them once when it was built. Columns need not be sorted.
    if crow.device.type == "cpu" and not is_traced(crow) and not is_traced(col):
        validate_indices(crow, col, (n, k), b, sorted_cols=False, prefix="bsr_linear: ")
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2 = x.reshape(m, k)  # not reshape(-1, k): that is ambiguous (an error) for k = 0
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0 or is_fake(y):
        return y.reshape(*lead, n)
    if bias is not None:
        bias = bias.contiguous()
    values = values.contiguous()
    crow, col = crow.contiguous(), col.contiguous()  # the kernel reads entry i at ptr + i
    nbr = crow.numel() - 1
    nbc = max((k + b - 1) // b, 1)
    precision = "tf32" if (x.dtype != torch.float32 or allow_tf32) else "ieee"
    args = (x2, values, crow, col, bias if bias is not None else y, y,
            m, n, k, nbr, x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
            _m_bucket(m), _density_bucket(values.shape[0], nbr * nbc))
    meta = dict(BLOCK=b, HAS_BIAS=bias is not None, GELU=bool(gelu), INPUT_PRECISION=precision,
                UPCAST=INTERPRETED and x.dtype == torch.bfloat16, EVEN_K=k % b == 0)
    if INTERPRETED:
        bm = _INTERP_CONFIG["BLOCK_M"]
        grid = (triton.cdiv(m, bm) * nbr,)
        launcher(_bsr_linear_kernel)[grid](*args, **meta, **_INTERP_CONFIG)
    else:
        def grid(meta_):
            return (triton.cdiv(m, meta_["BLOCK_M"]) * nbr,)

        with on_device_of(x):
            launcher(_tuned_kernel if autotune_enabled() else _fixed_kernel(m))[grid](*args, **meta)
    return y.reshape(*lead, n)


def _fixed_kernel(m: int):
    """One untuned config (BSBERT_TRITON_AUTOTUNE=0): 64-row tiles, or shorter ones for small M."""
    bm = 64 if not isinstance(m, int) else min(64, max(16, next_pow2(m)))
    return fixed_config_kernel(_bsr_linear_kernel, {"BLOCK_M": bm, "GROUP_M": 8},
                               num_warps=4 if bm >= 64 else 2, num_stages=3)


def _register():
    lib_ns = "bsbert::triton_bsr_linear"

    def _fn(x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
            values: torch.Tensor, bias: torch.Tensor | None, out_features: int, in_features: int,
            gelu: bool, allow_tf32: bool) -> torch.Tensor:
        return _bsr_linear_impl(x, crow_indices, col_indices, values, bias, out_features,
                                in_features, gelu, allow_tf32)

    op = make_op(lib_ns, _fn, INTERPRETED)

    @op.register_fake
    def _fake(x, crow_indices, col_indices, values, bias, out_features, in_features, gelu,
              allow_tf32):
        _check(x, crow_indices, col_indices, values, bias, out_features, in_features)
        return x.new_empty((*x.shape[:-1], out_features))

    return op


triton_bsr_linear = _register()


def bsr_linear_triton(x: torch.Tensor, bsm, bias: torch.Tensor | None = None, gelu: bool = False,
                      allow_tf32: bool = False) -> torch.Tensor:
    """``y = x @ W.T (+ bias) (-> erf GELU)`` with ``W = bsm`` (a ``BlockSparseMatrix``).

    ``x``: ``[..., K]`` fp16/bf16/fp32 on the matrix's device (or on CPU under ``TRITON_INTERPRET=1``).
    Returns ``[..., N]`` in ``x.dtype``. Goes through ``torch.ops.bsbert.triton_bsr_linear``.
    """
    n, k = bsm.shape
    return torch.ops.bsbert.triton_bsr_linear(x, bsm.crow_indices, bsm.col_indices, bsm.values, bias,
                                               n, k, bool(gelu), bool(allow_tf32))


