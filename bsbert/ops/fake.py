"""Fake (meta) kernels of bsbert's compiled ops, for torch.compile / export / opcheck.

Registration is guarded: it only happens when the op exists (the compiled extension is loaded), and
only once. Call :func:`register_fakes` (idempotent); importing this module does it too.
"""
from __future__ import annotations

import torch

_registered: set[str] = set()


def _op_exists(qualname: str) -> bool:
    ns, name = qualname.split("::")
    try:
        return hasattr(getattr(torch.ops, ns), name)
    except Exception:  # pragma: no cover
        return False


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
    torch._check(x.dim() >= 1, lambda: "bsr_linear: x must have at least 1 dimension")
    torch._check(x.shape[-1] == in_features,
                 lambda: f"bsr_linear: x.shape[-1] = {x.shape[-1]} does not match in_features = {in_features}")
    torch._check(packed_values.dtype == x.dtype,
                 lambda: f"bsr_linear: packed_values dtype ({packed_values.dtype}) must match x's dtype ({x.dtype})")
    torch._check(crow_indices.dtype == torch.int32 and col_indices.dtype == torch.int32,
                 lambda: "bsr_linear: crow_indices and col_indices must be int32")
    torch._check(crow_indices.numel() == (out_features + block - 1) // block + 1,
                 lambda: "bsr_linear: crow_indices must have ceil(out_features/block)+1 entries")
    if bias is not None:
        torch._check(tuple(bias.shape) == (out_features,),
                     lambda: f"bsr_linear: bias must have shape [{out_features}], got {tuple(bias.shape)}")
    return x.new_empty((*x.shape[:-1], out_features))


def _pruned_attention_fake(qkv, key_padding_mask, num_heads, head_dim, scale):
    _same_device("pruned_attention", "qkv", qkv, key_padding_mask=key_padding_mask)
    torch._check(qkv.dim() == 3, lambda: "pruned_attention: qkv must be [B, S, 3*H*D]")
    torch._check(qkv.shape[-1] == 3 * num_heads * head_dim,
                 lambda: f"pruned_attention: qkv last dim {qkv.shape[-1]} != 3*{num_heads}*{head_dim}")
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], num_heads * head_dim))


def _pruned_attention_varlen_fake(qkv, cu_seqlens, max_seqlen, num_heads, head_dim, scale):
    _same_device("pruned_attention_varlen", "qkv", qkv, cu_seqlens=cu_seqlens)
    torch._check(qkv.dim() == 2, lambda: "pruned_attention_varlen: qkv must be [T, 3*H*D]")
    torch._check(qkv.shape[-1] == 3 * num_heads * head_dim,
                 lambda: f"pruned_attention_varlen: qkv last dim {qkv.shape[-1]} != 3*{num_heads}*{head_dim}")
    return qkv.new_empty((qkv.shape[0], num_heads * head_dim))


def _add_layer_norm_fake(x, residual, weight, bias, eps):
    _same_device("add_layer_norm", "x", x, residual=residual, weight=weight, bias=bias)
    torch._check(x.dim() >= 1, lambda: "add_layer_norm: x must have at least 1 dimension")
    torch._check(residual.dtype == x.dtype,
                 lambda: f"add_layer_norm: residual dtype ({residual.dtype}) must match x's dtype ({x.dtype})")
    torch._check(tuple(residual.shape) == tuple(x.shape),
                 lambda: f"add_layer_norm: residual shape {tuple(residual.shape)} must equal x's shape "
                         f"{tuple(x.shape)} (no broadcasting)")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        torch._check(tuple(t.shape) == (n,),
                     lambda: f"add_layer_norm: {name} must have shape [{n}] (the last dim of x), got {tuple(t.shape)}")
        torch._check(t.dtype in (x.dtype, torch.float32),
                     lambda: f"add_layer_norm: {name} must be float32 or x's dtype ({x.dtype}), got {t.dtype}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _bsr_linear_add_layer_norm_fake(x, crow_indices, col_indices, packed_values, bias, out_features, in_features,
                                    block, residual, ln_weight, ln_bias, eps):
    y = _bsr_linear_fake(x, crow_indices, col_indices, packed_values, bias, out_features, in_features, block,
                         False)
    return _add_layer_norm_fake(y, residual, ln_weight, ln_bias, eps)


def _bert_encoder_fake(hidden, key_padding_mask, tensors, ints, floats):
    _same_device("bert_encoder", "hidden", hidden, key_padding_mask=key_padding_mask, tensors=list(tensors))
    torch._check(hidden.dim() == 3, lambda: f"bert_encoder: hidden must be [B, S, hidden_size], got {tuple(hidden.shape)}")
    from bsbert.fused_encoder import FLOATS_PER_LAYER, INTS_PER_LAYER, TENSORS_PER_LAYER

    layers = len(floats) // FLOATS_PER_LAYER
    torch._check(len(floats) == FLOATS_PER_LAYER * layers and len(ints) == INTS_PER_LAYER * layers
                 and len(tensors) == TENSORS_PER_LAYER * layers,
                 lambda: f"bert_encoder: expected {TENSORS_PER_LAYER} tensors, {INTS_PER_LAYER} ints and "
                         f"{FLOATS_PER_LAYER} floats per layer")
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


def _bert_encoder_registered_fake(hidden, key_padding_mask, handle):
    _same_device("bert_encoder_registered", "hidden", hidden, key_padding_mask=key_padding_mask)
    torch._check(hidden.dim() == 3, lambda: f"bert_encoder: hidden must be [B, S, hidden_size], got {tuple(hidden.shape)}")
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


def _bert_embeddings_fake(input_ids, token_type_ids, word, position, token_type, ln_weight, ln_bias, eps):
    _same_device("bert_embeddings", "word", word, input_ids=input_ids, token_type_ids=token_type_ids,
                 position=position, token_type=token_type, ln_weight=ln_weight, ln_bias=ln_bias)
    torch._check(input_ids.dim() == 2, lambda: f"bert_embeddings: input_ids must be [batch, seq], got shape "
                                               f"{tuple(input_ids.shape)}")
    torch._check(word.dim() == 2, lambda: "bert_embeddings: word must be a 2-D [vocab, hidden] table")
    for name, t in (("position", position), ("token_type", token_type)):
        torch._check(t.dtype == word.dtype and t.dim() == 2 and t.shape[1] == word.shape[1],
                     lambda: f"bert_embeddings: {name} must be a [rows, {word.shape[1]}] {word.dtype} table")
    return word.new_empty((input_ids.shape[0], input_ids.shape[1], word.shape[1]))


def _head_logits_fake(x, weight, bias):
    _same_device("head_logits", "x", x, weight=weight, bias=bias)
    torch._check(x.dim() >= 1, lambda: "head_logits: x must have at least 1 dimension")
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
                 lambda: f"head_logits: weight must be [out_features, {x.shape[-1]}] (x's last dim), got shape "
                         f"{tuple(weight.shape)}")
    torch._check(weight.dtype == x.dtype,
                 lambda: f"head_logits: weight dtype ({weight.dtype}) must match x's dtype ({x.dtype})")
    if bias is not None:
        torch._check(tuple(bias.shape) == (weight.shape[0],),
                     lambda: f"head_logits: bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
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


INFERENCE_ONLY = ("{op} has no backward: bsbert's kernels are inference-only (a patched model runs forward "
                  "passes); to train or take gradients, bsbert.unpatch(model) first, or run under "
                  "torch.inference_mode() / torch.no_grad()")


# The backward of every bsbert op: a gradient from this op, which raises when it runs. The backward must not
# raise itself: AOTAutograd traces it (with fake tensors) whenever an input requires grad, i.e. torch.compile
# of a patched model called outside no_grad / inference_mode, so raising there made such a *forward* fail
# (BackendCompilerFailed). Returning None instead would let backward() succeed with no gradient for the
# encoder's weights: silently wrong. The op is in the backward graph and raises only if a backward runs.
@torch.library.custom_op("bsbert::inference_only_grad", mutates_args=())
def _inference_only_grad(grad: torch.Tensor, size: list[int], dtype: torch.dtype, device: torch.device,
                         op: str) -> torch.Tensor:
    from bsbert.errors import BsbertError

    raise BsbertError(INFERENCE_ONLY.format(op=op))


@_inference_only_grad.register_fake
def _(grad, size, dtype, device, op):
    return torch.empty(size, dtype=dtype, device=device)


def _grad_meta(v):
    """What the backward needs to stand a gradient in for an input: (size, dtype, device) of a tensor that
    requires grad (a list: one entry per element), else None. Metadata only: no tensor is kept alive."""
    if isinstance(v, torch.Tensor):
        return (tuple(v.shape), v.dtype, v.device) if v.requires_grad else None
    if isinstance(v, (list, tuple)):
        return [_grad_meta(u) for u in v]
    return None


def _no_backward(qualname: str):
    def setup_context(ctx, inputs, output):
        ctx.bsbert_grad_meta = [_grad_meta(v) for v in inputs]

    def backward(ctx, *grads):
        g = next((t for t in grads if isinstance(t, torch.Tensor)), None)

        def stand_in(meta):
            if isinstance(meta, list):
                return [stand_in(m) for m in meta]
            if meta is None or g is None:
                return None
            size, dtype, device = meta
            return torch.ops.bsbert.inference_only_grad(g, list(size), dtype, device, qualname)

        return tuple(stand_in(m) for m in ctx.bsbert_grad_meta)

    return backward, setup_context


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
        try:
            backward, setup_context = _no_backward(qualname)
            torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        except RuntimeError as exc:
            if "already" not in str(exc):
                raise
        _registered.add(qualname)
        done.append(qualname)
    return done


try:
    from bsbert import _ext

    if _ext.available():
        register_fakes()
except Exception:  # pragma: no cover - never let an import fail because of fakes
    pass
