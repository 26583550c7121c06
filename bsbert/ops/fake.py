"""Fake (meta) kernels of bsbert's compiled ops, for torch.compile / export / opcheck.

Registration is guarded: it only happens when the op exists (the compiled extension is loaded), and
only once. Call :func:`register_fakes` (idempotent); importing this module does it too.
"""
from __future__ import annotations

import math

import torch

from bsbert.ops import inference_only

_registered: set[str] = set()


def _op_exists(qualname: str) -> bool:
    ns, name = qualname.split("::")
    try:
        return hasattr(getattr(torch.ops, ns), name)
    except Exception:  # pragma: no cover
        return False


# The fakes repeat the real kernels' device-neutral checks (shapes, dtypes, int / float arguments; csrc/cpu/*.cpp)
# with their messages, so that torch.compile / torch.export refuse a bad call when they trace it, as the eager op
# does, instead of tracing it and failing only when the program runs. Not repeated here: checks of tensor *values*
# (index ranges, cu_seqlens' contents: a fake tensor has none) and the refusals of one device's kernel (float16 or
# head_dim 8 on the CPU, head_dim 32 / 64 only on CUDA), which the kernel that runs still reports.
# Each check is torch._check(cond, lambda: message): a SymBool condition (dynamic shapes) becomes a guard or a
# runtime assertion instead of failing the trace; conditions joined with `and` would force a guard, so such
# checks are split into several calls with one message.

# c10::toString of a dtype: what the C++ messages print ("Float", not "torch.float32")
_C10_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
                    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
                    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
                    torch.complex128: "ComplexDouble"}

# bert_encoder's key_padding_mask: bool or an integer attention mask (int8-int64 or uint8)
_ENCODER_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _dt(dtype) -> str:
    return _C10_DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _sz(t) -> str:
    """A tensor's sizes as the C++ messages print them: [2, 4]."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _is_number(v) -> bool:
    """A plain Python number (not a SymInt / SymFloat of a dynamic trace, whose value is unknown here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_eps(op: str, eps) -> None:
    if _is_number(eps):  # (std::to_string(double) prints "%f": -0.000010)
        torch._check(math.isfinite(eps) and eps >= 0, lambda: f"{op}: eps must be finite and >= 0, got {eps:f}")


def _same_device(op: str, ref_name: str, ref, **others) -> None:
    """A tensor argument on another device than ``ref`` (one meta tensor among CPU ones sends the call
    here, to the Meta kernel, which would return an uninitialised CPU tensor as the op's result)."""
    for name, t in others.items():
        ts = t if isinstance(t, (list, tuple)) else [t]
        for i, u in enumerate(ts):
            if u is not None and u.device != ref.device:
                where = f"{name}[{i}]" if isinstance(t, (list, tuple)) else name
                raise RuntimeError(f"{op}: {where} is on {u.device} but {ref_name} is on {ref.device}; "
                                   f"all tensors must share a device")


def _bsr_linear_fake(x, crow_indices, col_indices, packed_values, bias, out_features, in_features,
                     block, gelu):
    _same_device("bsr_linear", "x", x, crow_indices=crow_indices, col_indices=col_indices,
                 packed_values=packed_values, bias=bias)
    torch._check(block in (16, 32, 64), lambda: f"bsr_linear: block must be 16, 32 or 64, got {block}")

    def negative():
        return f"bsr_linear: negative out_features ({out_features}) or in_features ({in_features})"

    torch._check(out_features >= 0, negative)
    torch._check(in_features >= 0, negative)
    torch._check(packed_values.dtype == x.dtype,
                 lambda: f"bsr_linear: packed_values dtype ({_dt(packed_values.dtype)}) must match x's dtype "
                         f"({_dt(x.dtype)})")
    torch._check(x.dim() >= 1, lambda: "bsr_linear: x must have at least 1 dimension")
    torch._check(x.shape[-1] == in_features,
                 lambda: f"bsr_linear: x.shape[-1] = {x.shape[-1]} does not match in_features = {in_features}")
    torch._check(crow_indices.dtype == torch.int32 and col_indices.dtype == torch.int32,
                 lambda: f"bsr_linear: crow_indices and col_indices must be int32, got {_dt(crow_indices.dtype)} "
                         f"and {_dt(col_indices.dtype)}")
    torch._check(crow_indices.dim() == 1 and col_indices.dim() == 1,
                 lambda: "bsr_linear: crow_indices and col_indices must be 1-D")
    nbr = (out_features + block - 1) // block
    torch._check(crow_indices.numel() == nbr + 1,
                 lambda: f"bsr_linear: crow_indices must have ceil(out_features/block)+1 = {nbr + 1} entries, got "
                         f"{crow_indices.numel()}")
    nnzb = col_indices.numel()
    torch._check(packed_values.numel() == nnzb * block * block,
                 lambda: f"bsr_linear: packed_values must hold nnz_blocks*block*block = {nnzb * block * block} "
                         f"values, got {packed_values.numel()} (shape {_sz(packed_values)})")
    # (crow_indices running from 0 to nnz_blocks, non-decreasing, col_indices in range: values, not checked here)
    if bias is not None:
        torch._check(tuple(bias.shape) == (out_features,),
                     lambda: f"bsr_linear: bias must have shape [{out_features}], got {_sz(bias)}")
    return x.new_empty((*x.shape[:-1], out_features))


def _attention_common(op, qkv, num_heads, head_dim, want_dim, scale):
    """pruned_attention(_varlen)'s checks of qkv and the ints that every kernel makes (check_common in
    csrc/cpu/pruned_attention_cpu.cpp, less the CPU kernel's dtype and head_dim limits)."""
    torch._check(num_heads >= 1, lambda: f"{op}: num_heads must be >= 1, got {num_heads}")
    torch._check(qkv.dim() == want_dim,
                 lambda: f"{op}: qkv must be {want_dim}-D ({'[B, S, 3*H*D]' if want_dim == 3 else '[T, 3*H*D]'}), "
                         f"got shape {_sz(qkv)}")
    torch._check(qkv.shape[-1] == 3 * num_heads * head_dim,
                 lambda: f"{op}: qkv last dimension must be 3 * num_heads * head_dim = 3 * {num_heads} * {head_dim}, "
                         f"got {qkv.shape[-1]}")
    if _is_number(scale):
        torch._check(math.isfinite(scale), lambda: f"{op}: scale must be finite, got {scale:f}")


def _pruned_attention_fake(qkv, key_padding_mask, num_heads, head_dim, scale):
    _same_device("pruned_attention", "qkv", qkv, key_padding_mask=key_padding_mask)
    _attention_common("pruned_attention", qkv, num_heads, head_dim, 3, scale)
    B, S = qkv.shape[0], qkv.shape[1]
    if key_padding_mask is not None:
        m = key_padding_mask
        torch._check(m.dtype == torch.bool,
                     lambda: f"pruned_attention: key_padding_mask must be bool (true = attend), got {_dt(m.dtype)}")

        def shape():
            return f"pruned_attention: key_padding_mask must have shape [{B}, {S}] (qkv's [B, S]), got {_sz(m)}"

        torch._check(m.dim() == 2, shape)
        torch._check(m.shape[0] == B, shape)
        torch._check(m.shape[1] == S, shape)
    return qkv.new_empty((B, S, num_heads * head_dim))


def _pruned_attention_varlen_fake(qkv, cu_seqlens, max_seqlen, num_heads, head_dim, scale):
    _same_device("pruned_attention_varlen", "qkv", qkv, cu_seqlens=cu_seqlens)
    _attention_common("pruned_attention_varlen", qkv, num_heads, head_dim, 2, scale)
    torch._check(cu_seqlens.dtype == torch.int32,
                 lambda: f"pruned_attention_varlen: cu_seqlens must be int32, got {_dt(cu_seqlens.dtype)}")

    def one_d():
        return f"pruned_attention_varlen: cu_seqlens must be 1-D [batch + 1], got shape {_sz(cu_seqlens)}"

    torch._check(cu_seqlens.dim() == 1, one_d)
    torch._check(cu_seqlens.numel() >= 1, one_d)
    torch._check(max_seqlen >= 0, lambda: f"pruned_attention_varlen: max_seqlen must be >= 0, got {max_seqlen}")
    # Not checked here: cu_seqlens' values (cu_seqlens[0] == 0, non-decreasing, every length <= max_seqlen,
    # cu_seqlens[-1] <= T). A fake tensor has no values (reading them would be a data-dependent trace); the
    # kernel checks them when it runs.
    return qkv.new_empty((qkv.shape[0], num_heads * head_dim))


# add_layer_norm's words, and bsr_linear_add_layer_norm's for its LayerNorm (LayerNormNames in
# csrc/cpu/add_layer_norm_op.h): (op, weight, bias, width)
_ALN_NAMES = ("add_layer_norm", "weight", "bias", "the last dim of x")
_FUSED_LN_NAMES = ("bsr_linear_add_layer_norm", "ln_weight", "ln_bias", "out_features")


def _add_layer_norm_checks(x, residual, weight, bias, eps, names=_ALN_NAMES):
    op, weight_name, bias_name, width = names
    torch._check(residual.dtype == x.dtype,
                 lambda: f"{op}: residual dtype ({_dt(residual.dtype)}) must match x's dtype ({_dt(x.dtype)})")
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least 1 dimension")
    torch._check(tuple(residual.shape) == tuple(x.shape),
                 lambda: f"{op}: residual shape {_sz(residual)} must equal x's shape {_sz(x)} (no broadcasting)")
    _check_eps(op, eps)
    n = x.shape[-1]
    for name, t in ((weight_name, weight), (bias_name, bias)):
        torch._check(tuple(t.shape) == (n,),
                     lambda: f"{op}: {name} must have shape [{n}] ({width}), got {_sz(t)}")
        torch._check(t.dtype in (x.dtype, torch.float32),
                     lambda: f"{op}: {name} must be float32 or x's dtype ({_dt(x.dtype)}), got {_dt(t.dtype)}")


def _add_layer_norm_fake(x, residual, weight, bias, eps):
    _same_device("add_layer_norm", "x", x, residual=residual, weight=weight, bias=bias)
    _add_layer_norm_checks(x, residual, weight, bias, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _bsr_linear_add_layer_norm_fake(x, crow_indices, col_indices, packed_values, bias, out_features, in_features,
                                    block, residual, ln_weight, ln_bias, eps):
    _same_device("bsr_linear_add_layer_norm", "x", x, residual=residual, ln_weight=ln_weight, ln_bias=ln_bias)
    y = _bsr_linear_fake(x, crow_indices, col_indices, packed_values, bias, out_features, in_features, block,
                         False)
    torch._check(tuple(residual.shape) == tuple(y.shape),
                 lambda: f"bsr_linear_add_layer_norm: residual shape {_sz(residual)} must equal the output shape "
                         f"{_sz(y)} (x.shape[:-1] + [{out_features}])")
    _add_layer_norm_checks(y, residual, ln_weight, ln_bias, eps, _FUSED_LN_NAMES)
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _encoder_mask_checks(hidden, key_padding_mask):
    """bert_encoder(_registered)'s key_padding_mask (attention_padding_mask in csrc/cpu/bert_encoder.cpp)."""
    if key_padding_mask is None:
        return
    m = key_padding_mask
    torch._check(m.dtype in _ENCODER_MASK_DTYPES,
                 lambda: f"bert_encoder: key_padding_mask must be bool (true = attend) or an integer attention mask "
                         f"(nonzero = attend; int8-int64 or uint8), got {_dt(m.dtype)}")

    def shape():
        return (f"bert_encoder: key_padding_mask must have shape [{hidden.shape[0]}, {hidden.shape[1]}] "
                f"(hidden's [B, S]), got {_sz(m)}")

    torch._check(m.dim() == 2, shape)
    torch._check(m.shape[0] == hidden.shape[0], shape)
    torch._check(m.shape[1] == hidden.shape[1], shape)


def _check_hidden(hidden):
    torch._check(hidden.dim() == 3,
                 lambda: f"bert_encoder: hidden must be [B, S, hidden_size], got shape {_sz(hidden)}")


def _bert_encoder_fake(hidden, key_padding_mask, tensors, ints, floats):
    _same_device("bert_encoder", "hidden", hidden, key_padding_mask=key_padding_mask, tensors=list(tensors))
    _check_hidden(hidden)
    from bsbert.fused_encoder import FLOATS_PER_LAYER, INTS_PER_LAYER, TENSORS_PER_LAYER

    layers = len(floats) // FLOATS_PER_LAYER
    torch._check(len(floats) == FLOATS_PER_LAYER * layers and len(ints) == INTS_PER_LAYER * layers
                 and len(tensors) == TENSORS_PER_LAYER * layers,
                 lambda: f"bert_encoder: expected {TENSORS_PER_LAYER} tensors, {INTS_PER_LAYER} ints and "
                         f"{FLOATS_PER_LAYER} floats per layer, got {len(tensors)}, {len(ints)} and {len(floats)}")
    _encoder_mask_checks(hidden, key_padding_mask)
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


def _handle_registered(handle) -> bool:
    """Whether an encoder is registered under ``handle`` in this process (True when that cannot be told: a
    symbolic handle, or an extension without the registry)."""
    if not isinstance(handle, int) or isinstance(handle, bool):
        return True
    from bsbert import _ext

    if not -(2 ** 63) <= handle < 2 ** 63:
        return False  # handles are int64: no encoder is registered under this one
    query = getattr(_ext.load(warn=False), "encoder_is_registered", None)
    return True if query is None else bool(query(handle))


def _bert_encoder_registered_fake(hidden, key_padding_mask, handle):
    _same_device("bert_encoder_registered", "hidden", hidden, key_padding_mask=key_padding_mask)
    # (a lookup in the process's registry, as the kernel's first check: tracing a call with a released or
    # never-registered handle would only fail when the traced program ran)
    torch._check(_handle_registered(handle),
                 lambda: f"bert_encoder_registered: no encoder is registered under handle {handle} (released, or "
                         f"never registered in this process; see bsbert._C.encoder_register)")
    _check_hidden(hidden)
    _encoder_mask_checks(hidden, key_padding_mask)
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


def _bert_embeddings_fake(input_ids, token_type_ids, word, position, token_type, ln_weight, ln_bias, eps):
    _same_device("bert_embeddings", "word", word, input_ids=input_ids, token_type_ids=token_type_ids,
                 position=position, token_type=token_type, ln_weight=ln_weight, ln_bias=ln_bias)
    torch._check(input_ids.dim() == 2,
                 lambda: f"bert_embeddings: input_ids must be [batch, seq], got shape {_sz(input_ids)}")
    torch._check(input_ids.dtype == torch.int64,
                 lambda: f"bert_embeddings: input_ids must be int64, got {_dt(input_ids.dtype)}")
    torch._check(word.dim() == 2,
                 lambda: f"bert_embeddings: word must be a 2-D [vocab, hidden] table, got shape {_sz(word)}")
    B, S, H, dt = input_ids.shape[0], input_ids.shape[1], word.shape[1], word.dtype
    for name, t in (("position", position), ("token_type", token_type)):
        torch._check(t.dim() == 2,
                     lambda: f"bert_embeddings: {name} must be a 2-D [rows, hidden] table, got shape {_sz(t)}")
        torch._check(t.shape[1] == H,
                     lambda: f"bert_embeddings: {name} has hidden size {t.shape[1]}, the word table {H}")
        torch._check(t.dtype == dt,
                     lambda: f"bert_embeddings: {name} is {_dt(t.dtype)}, the word table {_dt(dt)} (one dtype for "
                             f"all tables)")
    torch._check(S <= position.shape[0],
                 lambda: f"bert_embeddings: sequence length {S} exceeds the {position.shape[0]} rows of the "
                         f"position table")
    _check_eps("bert_embeddings", eps)
    torch._check(H > 0, lambda: "bert_embeddings: hidden size must be > 0")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):

        def bad(name=name, t=t):
            return (f"bert_embeddings: {name} must be a CPU [{H}] tensor of {_dt(dt)} or float32, got "
                    f"{_dt(t.dtype)} {_sz(t)} on {t.device}")

        torch._check(t.dim() == 1, bad)
        torch._check(t.shape[0] == H, bad)
        torch._check(t.dtype in (dt, torch.float32), bad)
    if token_type_ids is not None:
        t = token_type_ids

        def bad_tt():
            return (f"bert_embeddings: token_type_ids must be a CPU int64 tensor of input_ids' shape "
                    f"{_sz(input_ids)}, got {_dt(t.dtype)} {_sz(t)} on {t.device}")

        torch._check(t.dtype == torch.int64, bad_tt)
        torch._check(t.dim() == 2, bad_tt)
        torch._check(t.shape[0] == B, bad_tt)
        torch._check(t.shape[1] == S, bad_tt)
    else:
        # (| rather than `or`: either side may be a SymBool)
        torch._check((token_type.shape[0] > 0) | (input_ids.numel() == 0),
                     lambda: "bert_embeddings: token_type_ids None means type 0 for every token, but the token-type "
                             "table has no rows")
    # (the ids' values, in [0, rows) of their tables: not checked here)
    return word.new_empty((B, S, H))


def _head_logits_fake(x, weight, bias):
    _same_device("head_logits", "x", x, weight=weight, bias=bias)
    torch._check(x.dim() >= 1, lambda: "head_logits: x must have at least 1 dimension")
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
                 lambda: f"head_logits: weight must be [out_features, {x.shape[-1]}] (x's last dim), got shape "
                         f"{_sz(weight)}")
    torch._check(weight.dtype == x.dtype,
                 lambda: f"head_logits: weight dtype ({_dt(weight.dtype)}) must match x's dtype ({_dt(x.dtype)})")
    if bias is not None:
        torch._check(tuple(bias.shape) == (weight.shape[0],),
                     lambda: f"head_logits: bias must have shape [{weight.shape[0]}], got {_sz(bias)}")
        torch._check(bias.dtype == x.dtype,
                     lambda: f"head_logits: bias dtype ({_dt(bias.dtype)}) must match x's dtype ({_dt(x.dtype)})")
    return x.new_empty((weight.shape[0], *x.shape[:-1]))


_FAKES = {"bsbert::bsr_linear": _bsr_linear_fake,
          "bsbert::head_logits": _head_logits_fake,
          "bsbert::bert_embeddings": _bert_embeddings_fake,
          "bsbert::bert_encoder": _bert_encoder_fake,
          "bsbert::bert_encoder_registered": _bert_encoder_registered_fake,
          "bsbert::bsr_linear_add_layer_norm": _bsr_linear_add_layer_norm_fake,
          "bsbert::add_layer_norm": _add_layer_norm_fake,
          "bsbert::pruned_attention": _pruned_attention_fake,
          "bsbert::pruned_attention_varlen": _pruned_attention_varlen_fake}


def register_fakes() -> list[str]:
    """Register every fake kernel whose op exists, and a backward that says the op is inference-only (torch's
    own "derivative for bsbert::bert_encoder_registered is not implemented" named an internal op); returns
    the names registered by this call."""
    done = []
    for qualname, fn in _FAKES.items():
        if qualname in _registered or not _op_exists(qualname):
            continue
        try:
            torch.library.register_fake(qualname)(fn)
        except RuntimeError as exc:  # already registered elsewhere (e.g. a reload)
            if "already" not in str(exc):
                raise
        inference_only.register(qualname)
        _registered.add(qualname)
        done.append(qualname)
    return done


try:
    from bsbert import _ext

    if _ext.available():
        register_fakes()
except Exception:  # pragma: no cover - never let an import fail because of fakes
    pass
