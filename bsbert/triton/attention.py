"""Triton flash-style attention over the kept (un-pruned) heads of a pruned BERT layer.

Input is the output of the fused QKV projection, read in place through strides (no transposes, no
copies):

* padded form: ``qkv [B, S, 3*H*D]`` whose last dim is laid out ``(3, H, D)`` (q | k | v, head-major),
  ``key_padding_mask`` bool ``[B, S]`` (``True`` = attend) or ``None``; returns ``[B, S, H*D]``;
* varlen form: ``qkv [T, 3*H*D]`` (the sequences concatenated), ``cu_seqlens`` int32 ``[B+1]``
  (starting at 0, non-decreasing, ``cu_seqlens[-1] <= T``), ``max_seqlen`` (>= every length); returns
  ``[T, H*D]``, zeros in the rows past ``cu_seqlens[-1]``. Lengths 0 and 1 work.

The output's last dim is laid out ``(H, D)``, ready for the attention output projection. One program
computes ``BLOCK_M`` queries of one (sequence, head): it streams the keys/values in ``BLOCK_N`` tiles
with an online (running max / running sum) softmax, fp32 scores and accumulators; for fp16/bf16 the
probabilities are rounded to the input dtype for the ``P @ V`` product (as in FlashAttention).

Semantics:

* ``softmax(scale * q k^T)`` over the keys of the same sequence where the mask is ``True``;
* a query whose keys are **all** masked (a fully padded sequence) gets an output of **zeros** (not the
  NaN that ``softmax`` of an all ``-inf`` row gives);
* padded query positions are computed like any other query (they attend to the valid keys); callers
  ignore them.

``head_dim`` must be 32 or 64; dtypes fp16/bf16/fp32 (fp32 products are exact: no TF32).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from bsbert.triton.bsr_linear import round_to_bf16
from bsbert.triton._common import (autotune_enabled, check_device, fixed_config_kernel, is_fake, is_traced,
                                    is_interpreted, launcher, make_op, next_pow2, on_device_of)

__all__ = ["pruned_attention_triton", "pruned_attention_varlen_triton", "triton_pruned_attention",
           "triton_pruned_attention_varlen"]

SUPPORTED_HEAD_DIMS = (32, 64)
_LOG2E = 1.4426950408889634


@triton.jit
def _attn_kernel(
    qkv_ptr, mask_ptr, cu_ptr, out_ptr,
    S, H, qk_scale,
    stride_qb, stride_qs, stride_qd,
    stride_mb, stride_ms,
    stride_ob, stride_os,
    M_LEN,  # query rows per (sequence, head): S, or max_seqlen for varlen
    SEQ_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
):
    # one grid axis, query tiles fastest (the tiles of one sequence and head run side by side and share its K
    # and V in L2): a (tiles, batch x heads) grid passed CUDA's 65535 limit on its y axis at 5462 sequences
    # of 12 heads
    num_m = tl.cdiv(M_LEN, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    b = pid_bh // H
    h = pid_bh % H
    if VARLEN:
        # S = the tokens there are: cu_seqlens is not checked on a GPU (a sync), so its bounds are clamped to
        # them, and a bad value cannot make this program read or write outside qkv and out
        seq_start = tl.minimum(tl.maximum(tl.load(cu_ptr + b), 0), S)
        seqlen = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1), seq_start), S) - seq_start
        q_base = qkv_ptr + seq_start.to(tl.int64) * stride_qs
        o_base = out_ptr + seq_start.to(tl.int64) * stride_os
    else:
        seqlen = S
        q_base = qkv_ptr + b.to(tl.int64) * stride_qb
        o_base = out_ptr + b.to(tl.int64) * stride_ob

    if pid_m * BLOCK_M < seqlen:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        m_valid = offs_m < seqlen
        hd = H * HEAD_DIM
        # int64, as the token offsets: a qkv whose last dim is strided (a column-major buffer viewed as
        # [B, S, 3HD]) passes 2^31 at (2HD + d) * stride_qd, and the int32 product read out of bounds
        cols = (h * HEAD_DIM + offs_d).to(tl.int64)
        q_cols = cols * stride_qd
        k_cols = (hd + cols) * stride_qd
        v_cols = (2 * hd + cols) * stride_qd

        # token offsets in int64: a [B, S, 3HD] view of sequence-major memory has stride_qs = B x 3HD
        q = tl.load(q_base + offs_m.to(tl.int64)[:, None] * stride_qs + q_cols[None, :], mask=m_valid[:, None],
                    other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        for start_n in range(0, seqlen, BLOCK_N):
            offs_n = start_n + offs_n0
            n_valid = offs_n < seqlen
            row_n = offs_n.to(tl.int64) * stride_qs
            kt = tl.load(q_base + row_n[None, :] + k_cols[:, None], mask=n_valid[None, :], other=0.0)  # [D, BLOCK_N]
            v = tl.load(q_base + row_n[:, None] + v_cols[None, :], mask=n_valid[:, None], other=0.0)  # [BLOCK_N, D]
            if UPCAST:
                kt = kt.to(tl.float32)
            if q.dtype == tl.float32:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = s * qk_scale  # log2 domain
            if HAS_MASK:
                keep = tl.load(mask_ptr + b.to(tl.int64) * stride_mb + offs_n * stride_ms, mask=n_valid, other=0)
                n_valid = n_valid & (keep != 0)
            s = tl.where(n_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep p = 0
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if UPCAST:  # interpreter + bf16: round p like the GPU path, multiply exactly in fp32
                p = round_to_bf16(p).to(tl.float32)
                acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
            elif v.dtype == tl.float32:
                acc = tl.dot(p, v, acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # fully masked query: acc == 0 -> output 0
        o = acc / l_safe[:, None]
        o_ptrs = o_base + offs_m.to(tl.int64)[:, None] * stride_os + (h * HEAD_DIM + offs_d)[None, :]
        if UPCAST:
            o = round_to_bf16(o)
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=m_valid[:, None])


INTERPRETED = is_interpreted(_attn_kernel)  # fixed when the kernel was decorated


def _attn_configs():
    cfgs = []
    for bm, bn, warps, stages in [
        (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 4),
        (64, 64, 4, 4), (128, 128, 8, 3), (32, 32, 2, 3),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return cfgs


def _prune_attn(configs, named_args, **kwargs):
    bucket = named_args["SEQ_BUCKET"]
    out = [c for c in configs if c.kwargs["BLOCK_N"] <= max(32, bucket)
           and c.kwargs["BLOCK_M"] <= max(32, bucket)]
    return out or configs[:1]


_tuned_attn = triton.autotune(
    configs=_attn_configs(),
    key=["SEQ_BUCKET", "H", "HEAD_DIM", "VARLEN", "HAS_MASK"],
    prune_configs_by={"early_config_prune": _prune_attn},
)(_attn_kernel)

_INTERP_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}


def _check_common(qkv, num_heads, head_dim, batch_dims, scale):
    # in the CPU op's words; the kernel takes scale x log2(e) as an fp32, which must be finite too (an
    # infinite one made every output NaN)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if abs(scale) * _LOG2E > torch.finfo(torch.float32).max:
        raise ValueError(f"scale {scale} is too large: scale x log2(e) overflows fp32")
    if qkv.dim() != batch_dims + 1:
        raise ValueError(f"qkv must be {batch_dims + 1}-D, got shape {tuple(qkv.shape)}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} not in {SUPPORTED_HEAD_DIMS}")
    if num_heads < 0:
        raise ValueError(f"num_heads must be >= 0, got {num_heads}")
    if qkv.shape[-1] != 3 * num_heads * head_dim:
        raise ValueError(f"qkv last dim {qkv.shape[-1]} != 3 * num_heads * head_dim = "
                         f"{3 * num_heads * head_dim}")
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"qkv dtype {qkv.dtype} is not supported (fp16, bf16, fp32)")
    check_device(qkv, INTERPRETED)


def _launch(qkv, mask, cu, out, s, h, d, scale, strides_q, strides_m, strides_o, grid_m_len, batch,
            varlen, has_mask):
    """mask / cu may be placeholder pointers (``out``) when has_mask / varlen is False: never read."""
    args = (qkv, mask, cu, out, s, h, float(scale) * _LOG2E, *strides_q, *strides_m, *strides_o, grid_m_len,
            min(next_pow2(max(grid_m_len, 1)), 4096) if isinstance(grid_m_len, int) else grid_m_len)
    meta = dict(HEAD_DIM=d, VARLEN=varlen, HAS_MASK=has_mask,
                UPCAST=INTERPRETED and qkv.dtype == torch.bfloat16)
    if INTERPRETED:
        grid = (triton.cdiv(grid_m_len, _INTERP_CONFIG["BLOCK_M"]) * batch * h,)
        launcher(_attn_kernel)[grid](*args, **meta, **_INTERP_CONFIG)
    else:
        def grid(meta_):
            return (triton.cdiv(grid_m_len, meta_["BLOCK_M"]) * batch * h,)

        with on_device_of(qkv):
            launcher(_tuned_attn if autotune_enabled() else _fixed_attn_kernel())[grid](*args, **meta)


def _fixed_attn_kernel():
    """One untuned config (BSBERT_TRITON_AUTOTUNE=0). (Tests replace it to run each tuning config.)"""
    return fixed_config_kernel(_attn_kernel, {"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)


def _check_padded_args(qkv, key_padding_mask, num_heads, head_dim, scale):
    """Shape / dtype / device checks (no values read): the op and its fake kernel both run them -- a
    meta-device argument dispatches to the fake kernel, which must not return an unwritten tensor."""
    _check_common(qkv, num_heads, head_dim, 2, scale)
    if key_padding_mask is not None:
        bsz, s, _ = qkv.shape
        if key_padding_mask.shape != (bsz, s):
            raise ValueError(f"key_padding_mask must have shape {(bsz, s)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != qkv.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but qkv is on "
                             f"{qkv.device}")
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool, got {key_padding_mask.dtype}")


def _attention_impl(qkv, key_padding_mask, num_heads, head_dim, scale):
    _check_padded_args(qkv, key_padding_mask, num_heads, head_dim, scale)
    bsz, s, _ = qkv.shape
    out = torch.empty((bsz, s, num_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    if out.numel() == 0 or is_fake(out):
        return out
    if key_padding_mask is not None:
        mask = key_padding_mask.view(torch.uint8)
        strides_m = (mask.stride(0), mask.stride(1))
    else:
        mask, strides_m = out, (0, 0)  # placeholder pointer, never read (HAS_MASK=False)
    _launch(qkv, mask, out, out, s, num_heads, head_dim, scale,
            (qkv.stride(0), qkv.stride(1), qkv.stride(2)), strides_m, (out.stride(0), out.stride(1)),
            s, bsz, False, key_padding_mask is not None)
    return out


def _check_varlen_args(qkv, cu_seqlens, max_seqlen, num_heads, head_dim, scale):
    """Shape / dtype / device checks (no values read; the op and its fake kernel run them), in the CPU
    op's words (csrc/cpu/pruned_attention_cpu.cpp): a bad cu_seqlens makes the kernel read / write
    outside qkv and out."""
    _check_common(qkv, num_heads, head_dim, 1, scale)
    if cu_seqlens.device != qkv.device:
        raise ValueError(f"pruned_attention_varlen: cu_seqlens is on {cu_seqlens.device} but qkv is on "
                         f"{qkv.device}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"pruned_attention_varlen: cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"pruned_attention_varlen: cu_seqlens must be 1-D [batch + 1], got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if max_seqlen < 0:
        raise ValueError(f"pruned_attention_varlen: max_seqlen must be >= 0, got {max_seqlen}")


def _attention_varlen_impl(qkv, cu_seqlens, max_seqlen, num_heads, head_dim, scale):
    _check_varlen_args(qkv, cu_seqlens, max_seqlen, num_heads, head_dim, scale)
    t = qkv.shape[0]
    bsz = cu_seqlens.numel() - 1
    if is_traced(cu_seqlens) or cu_seqlens.device.type == "cuda":
        # Values unchecked, every row starts at zero (the rows past cu_seqlens[-1] must read as zeros):
        # torch.compile tracing this (triton_op) body does not know them until run time, and on a GPU
        # reading them is a device -> host sync per call (per layer of an unpadded forward, and not
        # allowed during CUDA-graph capture), as for the BSR op's indices there; bsbert's unpad path
        # builds cu_seqlens itself, and the kernel clamps the bounds to the tokens there are. Under the
        # interpreter (CPU tensors) they are checked below.
        out = torch.zeros((t, num_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
        if is_fake(out):
            return out
    else:
        end = _check_cu_seqlens(cu_seqlens, max_seqlen, t)
        out = torch.empty((t, num_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
        if end < t:  # tokens outside every sequence: zeros, not whatever the allocator left there
            out[end:].zero_()
    if out.numel() == 0 or bsz == 0 or max_seqlen == 0:
        return out
    cu_seqlens = cu_seqlens.contiguous()  # the kernel reads cu_seqlens[b] at cu_ptr + b
    _launch(qkv, out, cu_seqlens, out, t, num_heads, head_dim, scale,
            (0, qkv.stride(0), qkv.stride(1)), (0, 0), (0, out.stride(0)), int(max_seqlen), bsz,
            True, False)
    return out


def _check_cu_seqlens(cu_seqlens, max_seqlen, t) -> int:
    """Value checks of cu_seqlens (on the CPU: under the interpreter); returns cu_seqlens[-1]. The kernel
    trusts these values for its addresses."""
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"pruned_attention_varlen: cu_seqlens[0] must be 0, got {cu[0]}")
    for b in range(len(cu) - 1):
        if cu[b + 1] < cu[b]:
            raise ValueError(f"pruned_attention_varlen: cu_seqlens must be non-decreasing, got {cu[b]} "
                             f"then {cu[b + 1]} at index {b}")
        if cu[b + 1] - cu[b] > max_seqlen:
            raise ValueError(f"pruned_attention_varlen: sequence {b} has {cu[b + 1] - cu[b]} tokens, "
                             f"more than max_seqlen = {max_seqlen}")
    if cu[-1] > t:
        raise ValueError(f"pruned_attention_varlen: cu_seqlens[-1] = {cu[-1]} exceeds the {t} tokens "
                         f"of qkv")
    return cu[-1]


def _register():
    def _fn(qkv: torch.Tensor, key_padding_mask: torch.Tensor | None, num_heads: int,
            head_dim: int, scale: float) -> torch.Tensor:
        return _attention_impl(qkv, key_padding_mask, num_heads, head_dim, scale)

    def _fn_varlen(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int,
                   head_dim: int, scale: float) -> torch.Tensor:
        return _attention_varlen_impl(qkv, cu_seqlens, max_seqlen, num_heads, head_dim, scale)

    op = make_op("bsbert::triton_pruned_attention", _fn, INTERPRETED)
    op_varlen = make_op("bsbert::triton_pruned_attention_varlen", _fn_varlen, INTERPRETED)

    @op.register_fake
    def _fake(qkv, key_padding_mask, num_heads, head_dim, scale):
        _check_padded_args(qkv, key_padding_mask, num_heads, head_dim, scale)
        return qkv.new_empty((qkv.shape[0], qkv.shape[1], num_heads * head_dim))

    @op_varlen.register_fake
    def _fake_varlen(qkv, cu_seqlens, max_seqlen, num_heads, head_dim, scale):
        _check_varlen_args(qkv, cu_seqlens, max_seqlen, num_heads, head_dim, scale)
        return qkv.new_empty((qkv.shape[0], num_heads * head_dim))

    return op, op_varlen


triton_pruned_attention, triton_pruned_attention_varlen = _register()


def pruned_attention_triton(qkv: torch.Tensor, key_padding_mask: torch.Tensor | None,
                            num_heads: int, head_dim: int, scale: float | None = None) -> torch.Tensor:
    """Attention of the kept heads. ``qkv [B, S, 3*H*D]`` (last dim ``(3, H, D)``) -> ``[B, S, H*D]``.

    ``key_padding_mask``: bool ``[B, S]``, ``True`` = attend, or ``None``. ``scale`` defaults to
    ``1/sqrt(head_dim)``. Queries with no valid key get zeros. See the module docstring.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    return torch.ops.bsbert.triton_pruned_attention(qkv, key_padding_mask, int(num_heads),
                                                    int(head_dim), float(scale))


def pruned_attention_varlen_triton(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                   num_heads: int, head_dim: int,
                                   scale: float | None = None) -> torch.Tensor:
    """Varlen attention. ``qkv [T, 3*H*D]``, ``cu_seqlens`` int32 ``[B+1]`` -> ``[T, H*D]``.

    ``max_seqlen`` must be >= the longest sequence (it sizes the launch grid). ``cu_seqlens``' values are checked
    on CPU tensors (the interpreter) and trusted on a GPU (reading them there is a sync per call); rows past
    ``cu_seqlens[-1]`` are zeros.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    return torch.ops.bsbert.triton_pruned_attention_varlen(qkv, cu_seqlens, int(max_seqlen),
                                                           int(num_heads), int(head_dim),
                                                           float(scale))
