"""Attention backends for PrunedSelfAttention: torch SDPA (everywhere), bsbert's Triton kernel and
bsbert's CUDA C++ kernel (GPU), bsbert's SIMD C++ kernel (CPU). Each says why it does not fit; patch()
measures the ones that do.

The bsbert kernels read the fused QKV output [B, S, 3*H*D] directly (no transpose copies) and take a
key-padding mask [B, S]; SDPA takes transformers' 4-D mask unchanged.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from bsbert import _ext


# An additive mask value at or below this masks its key: the softmax weight of a score lowered by 1e4
# underflows to exactly 0 in fp32 (e^-104 already does), so BERT's classic -10000 masks as finfo.min does.
MASKED_AT_OR_BELOW = -1e4


def _check_additive(m: torch.Tensor, eager: bool) -> None:
    """An additive (float) mask holds 0 (attend) or masking values (<= -1e4) only; NaN fails both."""
    if eager and m.dtype != torch.bool and not bool(((m == 0) | (m <= MASKED_AT_OR_BELOW)).all()):
        raise ValueError("additive attention mask has values other than 0 (attend) and <= -1e4 (masked): a "
                         "soft bias, not a padding mask; use patch(..., attention='torch-sdpa') for such masks")


def key_padding_mask(attention_mask: torch.Tensor | None, b: int, s: int) -> torch.Tensor | None:
    """transformers' 4-D encoder mask (bool: True = attend, or additive float) -> bool [B, S].

    BERT encoders only build padding masks, whose rows are all equal; anything else (a custom
    per-query mask, or an additive mask with a value that is neither 0 nor a masking value <= -1e4,
    i.e. a soft bias) cannot be expressed as key padding and raises instead of computing a wrong answer.
    """
    if attention_mask is None:
        return None
    m = attention_mask
    eager = not torch.compiler.is_compiling()  # the value checks are data-dependent: eager only
    if m.dim() == 4:
        if m.shape[1] != 1:
            raise ValueError(f"attention mask with {m.shape[1]} head planes is not a padding mask")
        row = m[:, 0, 0, :]
        _check_additive(row, eager)
        # (rows equal in value: then every row passes the additive check as the first did; one pass over
        # the mask per layer, and none for transformers' [B, 1, 1, S] form)
        if eager and m.shape[2] != 1 and not bool((m == m[:, :, :1, :]).all()):
            raise ValueError("attention mask differs between query rows (not a padding mask); "
                             "use patch(..., attention='torch-sdpa') for custom masks")
        m = row
    elif m.dim() == 2:
        _check_additive(m, eager)
    else:
        raise ValueError(f"unsupported attention mask shape {tuple(attention_mask.shape)}")
    keep = (m if m.dtype == torch.bool else m > MASKED_AT_OR_BELOW).expand(b, s)
    # Eager: no padding -> None, so the kernels take their unmasked path. Under torch.compile that
    # check is data-dependent (a graph break in every layer; each attention module then compiles as a
    # frame of its own and, with a different head count per layer, hits dynamo's recompile limit), so
    # the mask is always passed there: an all-true mask gives the same result.
    if torch.compiler.is_compiling():
        return keep.contiguous()
    return None if bool(keep.all()) else keep.contiguous()


class UnpadInfo:
    """Where the real tokens of a padded batch are: flat indices into [B*S], cumulative lengths."""

    def __init__(self, keep: torch.Tensor, attention_mask: torch.Tensor | None):
        b, s = keep.shape
        self.batch, self.seq = b, s
        self.index = keep.reshape(-1).nonzero().squeeze(1)
        lengths = keep.sum(1)
        self.cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        self.max_seqlen = int(lengths.max()) if b else 0
        self.attention_mask = attention_mask  # the model's own 4-D mask, for the padded SDPA path

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(self.batch * self.seq, t.shape[-1])
        return out.index_copy_(0, self.index, t).view(self.batch, self.seq, t.shape[-1])

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.batch * self.seq, t.shape[-1]).index_select(0, self.index)


class AttentionBackend:
    name = "?"

    def varlen(self, qkv, info: UnpadInfo, num_heads, head_dim, scale):
        """qkv: [T, 3*H*D] of the real tokens -> [T, H*D]. Default: pad, attend, unpad."""
        return info.unpad(self(info.pad(qkv), info.attention_mask, num_heads, head_dim, scale))

    def not_supported_reasons(self, device, dtype, head_dim) -> list[str]:
        raise NotImplementedError

    def forced_only_reason(self, device) -> str | None:
        """Why this backend runs on ``device`` only when forced (and is never measured there), or None."""
        return None

    def __call__(self, qkv, attention_mask, num_heads, head_dim, scale):
        """qkv: [B, S, 3*H*D] -> context [B, S, H*D]."""
        raise NotImplementedError


class TorchSdpa(AttentionBackend):
    name = "torch-sdpa"

    def not_supported_reasons(self, device, dtype, head_dim):
        return []

    def __call__(self, qkv, attention_mask, num_heads, head_dim, scale):
        b, s, _ = qkv.shape
        q, k, v = (t.transpose(1, 2) for t in qkv.view(b, s, 3, num_heads, head_dim).unbind(2))
        mask = attention_mask
        if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return ctx.transpose(1, 2).reshape(b, s, num_heads * head_dim)


class TritonAttention(AttentionBackend):
    name = "triton"

    def not_supported_reasons(self, device, dtype, head_dim):
        from bsbert import triton as bt

        reasons = list(bt.not_supported_reasons(device, dtype, head_dim=head_dim))
        if device.type == "cpu" and not reasons and os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append("on cpu only through the interpreter (TRITON_INTERPRET=1)")
        return reasons

    def forced_only_reason(self, device):
        # The interpreter runs the kernel in numpy, 100-1000x slower than the CPU kernels: timing it
        # against them only costs minutes per patch (it was most of the test suite's patch time).
        if device.type == "cpu":
            return "on cpu Triton runs in its interpreter, for tests and debugging: patch(attention='triton') forces it"
        return None

    def __call__(self, qkv, attention_mask, num_heads, head_dim, scale):
        from bsbert.triton.attention import pruned_attention_triton

        kpm = key_padding_mask(attention_mask, qkv.shape[0], qkv.shape[1])
        return pruned_attention_triton(qkv, kpm, num_heads, head_dim, scale)

    def varlen(self, qkv, info, num_heads, head_dim, scale):
        from bsbert.triton.attention import pruned_attention_varlen_triton

        return pruned_attention_varlen_triton(qkv, info.cu_seqlens, info.max_seqlen, num_heads, head_dim, scale)


class ExtensionAttention(AttentionBackend):
    """bsbert's C++ kernels: torch.ops.bsbert.pruned_attention[_varlen], implemented per dispatch key
    (the dispatcher picks the CUDA or CPU one from the tensor's device). Subclasses say which key,
    dtypes and head sizes their kernel serves."""

    dispatch_key = "?"
    dtypes: tuple = ()

    def head_dim_ok(self, head_dim) -> str | None:
        """None, or the head sizes the kernel supports (for the message)."""
        raise NotImplementedError

    def not_supported_reasons(self, device, dtype, head_dim):
        reasons = []
        dev = self.dispatch_key.lower()
        if device.type != dev:
            reasons.append(f"runs on {dev}, tensor is on {device.type}")
        if not _ext.available():
            reasons.append(f"C++ extension unavailable: {_ext.reason_unavailable()}")
        else:
            try:
                ok = torch._C._dispatch_has_kernel_for_dispatch_key("bsbert::pruned_attention",
                                                                    self.dispatch_key)
            except RuntimeError:
                ok = False
            if not ok:
                reasons.append(f"extension was built without the {self.dispatch_key} attention kernel")
            elif dev == "cuda" and device.type == "cuda" and torch.cuda.is_available() \
                    and _ext.cuda_kernel_problem(device):
                reasons.append(_ext.cuda_kernel_problem(device))
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {dtype} not supported ({names})")
        supported = self.head_dim_ok(head_dim)
        if supported:
            reasons.append(f"head_dim {head_dim} not supported ({supported})")
        return reasons

    def __call__(self, qkv, attention_mask, num_heads, head_dim, scale):
        kpm = key_padding_mask(attention_mask, qkv.shape[0], qkv.shape[1])
        return torch.ops.bsbert.pruned_attention(qkv, kpm, num_heads, head_dim, scale)

    def varlen(self, qkv, info, num_heads, head_dim, scale):
        return torch.ops.bsbert.pruned_attention_varlen(qkv, info.cu_seqlens, info.max_seqlen, num_heads,
                                                        head_dim, scale)


class CudaAttention(ExtensionAttention):
    name = "cuda"
    dispatch_key = "CUDA"
    dtypes = (torch.float16, torch.bfloat16)

    def head_dim_ok(self, head_dim):
        return None if head_dim in (32, 64) else "32, 64"


class CpuAttention(ExtensionAttention):
    """csrc/cpu/pruned_attention*: AVX-512 / AVX2 / portable SIMD, fp32 arithmetic (bf16 input on an
    avx512_bf16 CPU: vdpbf16ps dot products, P rounded to bf16, fp32 softmax and accumulators)."""

    name = "cpu"
    dispatch_key = "CPU"
    dtypes = (torch.float32, torch.bfloat16)

    def head_dim_ok(self, head_dim):
        return None if head_dim % 16 == 0 and 16 <= head_dim <= 1024 else "multiples of 16 up to 1024"

    def not_supported_reasons(self, device, dtype, head_dim):
        reasons = super().not_supported_reasons(device, dtype, head_dim)
        # The portable path (no AVX2+FMA, or BSBERT_CPU_ISA=portable) is correct but ~8x slower than
        # SDPA (scripts/bench_cpu_attention.py): never worth choosing, not even by the heuristic.
        if _ext.available() and _ext.load(warn=False).cpu_isa() == "portable":
            reasons.append("no AVX2+FMA or AVX-512 path on this CPU (BSBERT_CPU_ISA=portable or older CPU); "
                           "the portable fallback is slower than torch SDPA")
        return reasons


ATTENTION_BACKENDS = {b.name: b for b in (CudaAttention(), CpuAttention(), TritonAttention(), TorchSdpa())}


MAX_MEASURE_SEQ = 512  # BERT's position table: no real sequence is longer


def measure_shape(tokens: int, seq: int | None) -> tuple[int, int]:
    """(batch, seq) the attention candidates are timed at: ``tokens`` rows as sequences of ``seq`` (default
    ``min(tokens, 512)``). Attention cost grows with S^2 per sequence, so 4096 rows timed as one sequence
    would rank the kernels for a shape no BERT forward has."""
    if not hasattr(tokens, "__index__") or isinstance(tokens, bool) or tokens < 1:  # (numpy ints pass)
        raise ValueError(f"tokens must be an int >= 1 (the rows the candidates are timed on), got {tokens!r}")
    if seq is not None and seq < 1:
        raise ValueError(f"seq must be >= 1, got {seq}")
    s = min(tokens, MAX_MEASURE_SEQ) if seq is None else seq
    return max(1, tokens // s), s


# How much slower than the fastest measured attention the preferred one (patch: bsbert's cpu kernel, which the
# one-op fused encoder needs in every layer) may time and still be chosen. The fused encoder is worth 2-4.5%
# of a forward, the attention ~10% of it: 10% on the attention alone costs ~1% of the forward. Without the
# margin one layer whose SDPA timed 7% faster on a noisy machine turned the fused encoder off for all layers.
PREFER_WITHIN = 1.10


def choose_attention(device, dtype, num_heads, head_dim, *, backend=None, tokens=384, select="measure", seq=None,
                     prefer: str | None = None):
    """-> (backend, reason). Measures the fitting backends on a [B, S, 3*H*D] input, (B, S) =
    ``measure_shape(tokens, seq)``. ``prefer``: a backend chosen when it measures within ``PREFER_WITHIN``
    of the fastest (the reason says so)."""
    from bsbert.ops.dispatch import check_select, explain, rank_by_time

    check_select(select, device)
    if select == "plan" and not backend and num_heads:
        raise ValueError("select='plan' reuses a plan's attention backend: pass backend= (patch does this per layer)")
    names = [backend] if backend else list(ATTENTION_BACKENDS)
    for n in names:
        if n not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {n!r}; choose from {sorted(ATTENTION_BACKENDS)}")
    fits, why_not = [], {}
    for n in names:
        r = ATTENTION_BACKENDS[n].not_supported_reasons(torch.device(device), dtype, head_dim)
        if not r and not backend and (why := ATTENTION_BACKENDS[n].forced_only_reason(torch.device(device))):
            r = [why]
        if r:
            why_not[n] = r
        else:
            fits.append(n)
    if not fits:
        raise ValueError(f"no attention backend fits device={torch.device(device).type} dtype={dtype} "
                         f"head_dim={head_dim}: {explain(why_not)}")
    if num_heads == 0:  # the module still needs a backend object, but it never calls it
        return ATTENTION_BACKENDS[fits[0]], "no kept heads: no attention runs"
    if len(fits) == 1 or select == "heuristic":
        return ATTENTION_BACKENDS[fits[0]], ("forced" if backend else "first eligible") + (
            f" (not eligible: {explain(why_not)})" if why_not and not backend else "")
    batch, seq = measure_shape(tokens, seq)
    qkv = torch.randn(batch, seq, 3 * num_heads * head_dim, device=device).to(dtype)
    scale = head_dim ** -0.5
    fns = {n: (lambda x, be=ATTENTION_BACKENDS[n]: be(x, None, num_heads, head_dim, scale)) for n in fits}
    order, ms, reason = rank_by_time(fns, qkv, f"B={batch} S={seq}", gpu=select == "measure-gpu")
    if prefer in ms and order[0] != prefer and ms[prefer] <= PREFER_WITHIN * ms[order[0]]:
        return ATTENTION_BACKENDS[prefer], (f"{reason}; {prefer} kept: within {PREFER_WITHIN - 1:.0%} of "
                                            f"{order[0]}, and the fused encoder runs it in every layer")
    return ATTENTION_BACKENDS[order[0]], reason
