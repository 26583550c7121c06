"""model -> Plan: which heads and FFN neurons are alive, what dead units still contribute, densities.

A head is dead when its V rows or its output-projection columns are all zero. If only V is zero, the
head still adds the constant ``W_o[:, head] @ b_v[head]`` (softmax rows sum to one) and that is folded
into the output bias. Likewise an FFN neuron is dead when its intermediate row or its output column is
all zero; a zero row with a non-zero column adds ``act(b_1[j]) * W_2[:, j]``, folded into ``b_2``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bsbert.adapters import EncoderAdapter, check_config, find_encoder, num_heads as _num_heads
from bsbert.errors import UnsupportedModelError
from bsbert.plan import LayerPlan, LinearPlan, Plan

ANALYSIS_BLOCK = 32


def _linear(layer: nn.Module, path: str, prefix: str = ""):
    """The nn.Linear at ``path``, as its forward sees it (:class:`_PrunedLinear` under torch.nn.utils.prune).
    Anything that computes more than ``F.linear(x, weight, bias)`` is refused: a LoRA / adapter subclass
    with its own forward (its weight alone would be packed: a silently different model), a quantized or
    wrapped linear, an instance-level forward."""
    where = f"{prefix}.{path}" if prefix else path
    try:
        mod = layer.get_submodule(path)
    except AttributeError:
        raise UnsupportedModelError(f"{where}: no such module (found {type(layer).__name__} without it): "
                                    f"already patched, or an unsupported variant of the layer") from None
    cls = type(mod)
    if not isinstance(mod, nn.Linear) or cls.forward is not nn.Linear.forward or "forward" in vars(mod):
        what = f"{cls.__module__}.{cls.__qualname__}"
        why = ("a subclass of nn.Linear with a forward of its own" if isinstance(mod, nn.Linear)
               and cls.forward is not nn.Linear.forward else
               "an nn.Linear whose forward was replaced on the instance" if isinstance(mod, nn.Linear)
               else "not a torch.nn.Linear")
        raise UnsupportedModelError(
            f"{where} is {what} ({why}): bsbert packs the weight and bias of a plain torch.nn.Linear, so a "
            f"quantized, LoRA/adapter-wrapped or otherwise customised linear would not compute the same; merge "
            f"adapters / dequantize into nn.Linear first (or the module is already patched)")
    return _effective(mod)


class _PrunedLinear:
    """What ``layer_linears`` hands on for a linear under torch.nn.utils.prune: the weight and bias as its
    forward computes them (``<name>_orig * <name>_mask``, what the pruning pre-hook sets before every
    call). The ``weight`` attribute itself is only as fresh as the last forward (an optimizer step on
    ``weight_orig`` since then leaves it stale), so patch must not read it."""

    def __init__(self, lin: nn.Linear, values: dict):
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight, self.bias = values.get("weight", lin.weight), values.get("bias", lin.bias)


def _effective(lin: nn.Linear):
    """``lin``, or its :class:`_PrunedLinear` view when torch.nn.utils.prune's pre-hooks are on it. (Other
    hooks, which would stop running once the linear is packed, are refused by patch: check_replaceable.)"""
    if not lin._forward_pre_hooks:
        return lin
    from torch.nn.utils import prune

    pruning = [h for h in lin._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
    if not pruning:
        return lin
    with torch.no_grad():
        values = {h._tensor_name: h.apply_mask(lin) for h in pruning}
    return _PrunedLinear(lin, values)


def _check_weights(name: str, lin: nn.Linear) -> None:
    for pname, p in (("weight", lin.weight), ("bias", lin.bias)):
        if p is None:
            continue
        if p.device.type == "meta":
            raise UnsupportedModelError(
                f"{name}.{pname} is on the meta device: load real weights before analyze/patch")
        if not bool(torch.isfinite(p).all()):
            raise UnsupportedModelError(f"{name}.{pname} contains NaN or Inf")


def patched_part(model: nn.Module) -> str | None:
    """The name of a submodule of ``model`` that bsbert already patched (``bsbert.patch(model.bert)``,
    then ``model`` itself), or of a module inside it that is one of bsbert's; None if there is none."""
    from bsbert.nn.linear import NotPickled  # every patched module type

    for name, m in model.named_modules():
        if name and getattr(m, "_bsbert_patched", False) is True:
            return name
    for name, m in model.named_modules():
        if isinstance(m, NotPickled):
            return name
    return None


def check_no_patched_part(model: nn.Module) -> None:
    """AlreadyPatchedError naming the part of ``model`` bsbert already patched (else the analysis would stop
    at a missing 'query' deep inside it)."""
    part = patched_part(model)
    if part is not None:
        from bsbert.errors import AlreadyPatchedError

        raise AlreadyPatchedError(f"'{part}' inside this {type(model).__name__} is already patched by bsbert: "
                                  f"bsbert.unpatch it (or use the model it was patched as) before patching or "
                                  f"analyzing the whole")


def head_rows(kept_heads, head_dim: int, device) -> torch.Tensor:
    """Row indices of the kept heads in a [num_heads * head_dim, ...] projection, head-major."""
    return torch.tensor([h * head_dim + i for h in kept_heads for i in range(head_dim)], dtype=torch.long,
                        device=device)


def _tiles(weight: torch.Tensor, block: int) -> torch.Tensor:
    """bool [ceil(n/block), ceil(k/block)]: which ``block x block`` tiles (zero-padded) hold a non-zero."""
    n, k = weight.shape
    np_, kp = -(-n // block) * block, -(-k // block) * block
    w = torch.zeros(np_, kp, dtype=torch.bool, device=weight.device)
    w[:n, :k] = weight.ne(0)
    return w.reshape(np_ // block, block, kp // block, block).any(dim=(1, 3))


def block_density(weight: torch.Tensor, block: int = ANALYSIS_BLOCK) -> float:
    """Fraction of non-empty ``block x block`` tiles (zero-padded to whole blocks)."""
    n, k = weight.shape
    if n == 0 or k == 0:
        return 0.0
    return float(_tiles(weight, block).float().mean())


def nonempty_area(weight: torch.Tensor, block: int = ANALYSIS_BLOCK) -> int:
    """Weights inside non-empty tiles, each tile clipped to the matrix: the multiply-adds per token of a kernel
    that skips empty tiles. (block_density x rows x cols counted a partial edge tile as a whole one: 5600
    instead of 5376 for a 100 x 64 weight.)"""
    n, k = weight.shape
    if n == 0 or k == 0:
        return 0
    rows = torch.full((-(-n // block),), block, dtype=torch.long)
    cols = torch.full((-(-k // block),), block, dtype=torch.long)
    rows[-1], cols[-1] = n - (rows.numel() - 1) * block, k - (cols.numel() - 1) * block
    return int((_tiles(weight, block).cpu().long() * rows[:, None] * cols[None, :]).sum())


def layer_linears(layer: nn.Module, adapter: EncoderAdapter, prefix: str) -> dict[str, nn.Linear]:
    names = {"query": adapter.query, "key": adapter.key, "value": adapter.value,
             "attn_out": adapter.attn_out, "ffn_in": adapter.ffn_in, "ffn_out": adapter.ffn_out}
    lins = {k: _linear(layer, p, prefix) for k, p in names.items()}
    for k, lin in lins.items():
        _check_weights(f"{prefix}.{names[k]}", lin)
    return lins


def analyze_layer(index: int, lins: dict[str, nn.Linear], num_heads: int, head_dim: int | None = None) -> LayerPlan:
    """``head_dim``: the attention module's own head size where it has one (transformers'
    ``attention_head_size``, what its forward splits Q/K/V by); then the head count is the rows / head_dim,
    so that a layer whose heads were removed from the linears (transformers 4's prune_heads, or by hand)
    without its head count being updated is still split as its forward splits it."""
    hidden = lins["query"].in_features
    all_head = lins["query"].out_features
    if head_dim is not None:
        if head_dim < 1 or all_head % head_dim:
            raise UnsupportedModelError(f"layer {index}: {all_head} q outputs are not a whole number of heads of "
                                        f"size {head_dim} (the attention's attention_head_size)")
        num_heads = all_head // head_dim
    elif num_heads < 1 or all_head % num_heads:
        raise UnsupportedModelError(f"layer {index}: {all_head} q outputs not divisible by {num_heads} heads")
    d = head_dim if head_dim is not None else all_head // num_heads
    shapes = {n: tuple(lins[n].weight.shape) for n in lins}
    want = {"query": (all_head, hidden), "key": (all_head, hidden), "value": (all_head, hidden),
            "attn_out": (hidden, all_head), "ffn_in": (shapes["ffn_in"][0], hidden),
            "ffn_out": (hidden, shapes["ffn_in"][0])}
    bad = [n for n in want if shapes[n] != want[n]]
    if bad:
        raise UnsupportedModelError(f"layer {index}: linear shapes do not fit one another ({bad[0]} is "
                                    f"{list(shapes[bad[0]])}, expected {list(want[bad[0]])}; all: {shapes})")
    wq, wk, wv = (lins[n].weight.detach() for n in ("query", "key", "value"))
    wo, w1, w2 = (lins[n].weight.detach() for n in ("attn_out", "ffn_in", "ffn_out"))
    bv = lins["value"].bias
    v_live = wv.reshape(num_heads, d, hidden).ne(0).flatten(1).any(1)
    o_live = wo.reshape(wo.shape[0], num_heads, d).ne(0).permute(1, 0, 2).flatten(1).any(1)
    kept_heads = [h for h in range(num_heads) if bool(v_live[h]) and bool(o_live[h])]
    folded_heads = [h for h in range(num_heads)
                    if not bool(v_live[h]) and bool(o_live[h]) and bv is not None
                    and bool(bv.detach()[h * d:(h + 1) * d].ne(0).any())]
    row_live = w1.ne(0).any(1)
    col_live = w2.ne(0).any(0)
    ffn = w1.shape[0]
    kept_neurons = [j for j in range(ffn) if bool(row_live[j]) and bool(col_live[j])]
    folded_neurons = int((~row_live & col_live).sum())

    rows = head_rows(kept_heads, d, wq.device)
    neurons = torch.tensor(kept_neurons, dtype=torch.long, device=wq.device)
    qkv_packed = torch.cat([wq[rows], wk[rows], wv[rows]]) if len(kept_heads) else wq[:0]
    out_packed = wo[:, rows]
    ffn_in_packed, ffn_out_packed = w1[neurons], w2[:, neurons]

    def lp(name, dense_shape, nonzero, packed):
        return LinearPlan(name=name, dense_shape=dense_shape, packed_shape=tuple(packed.shape),
                          nonzero=int(nonzero), block_density=block_density(packed),
                          nonempty_area=nonempty_area(packed))

    linears = {
        "qkv": lp("qkv", (3 * all_head, hidden),
                  sum(int(w.ne(0).sum()) for w in (wq, wk, wv)), qkv_packed),
        "attn_out": lp("attn_out", tuple(wo.shape), int(wo.ne(0).sum()), out_packed),
        "ffn_in": lp("ffn_in", tuple(w1.shape), int(w1.ne(0).sum()), ffn_in_packed),
        "ffn_out": lp("ffn_out", tuple(w2.shape), int(w2.ne(0).sum()), ffn_out_packed),
    }
    return LayerPlan(index=index, num_heads=num_heads, head_dim=d, kept_heads=kept_heads,
                     folded_heads=folded_heads, ffn_size=ffn, kept_neurons=kept_neurons,
                     folded_neurons=folded_neurons, linears=linears)


@torch.no_grad()
def analyze(model: nn.Module) -> Plan:
    """Read a BERT-like model's pruning structure. Returns a :class:`bsbert.plan.Plan`;
    ``print(plan)`` shows the per-layer table, ``plan.to_dict()`` the same as a dict."""
    if getattr(model, "_bsbert_patched", False):
        from bsbert.errors import AlreadyPatchedError

        raise AlreadyPatchedError("model is already patched by bsbert: its plan is model.bsbert_plan")
    enc_path, encoder, adapter = find_encoder(model)
    check_no_patched_part(model)
    check_config(model, encoder)
    cfg = getattr(model, "config", None)
    layers = getattr(encoder, adapter.layers_attr)
    plans = []
    for i, layer in enumerate(layers):
        attn = layer.get_submodule(adapter.self_attention)
        num_heads = _num_heads(attn, cfg)
        head_dim = getattr(attn, "attention_head_size", None)
        head_dim = head_dim if isinstance(head_dim, int) and not isinstance(head_dim, bool) else None
        if num_heads is None and head_dim is None:
            raise UnsupportedModelError(f"layer {i}: cannot tell the number of attention heads")
        prefix = f"{enc_path}.{adapter.layers_attr}.{i}"
        plans.append(analyze_layer(i, layer_linears(layer, adapter, prefix), int(num_heads or 0), head_dim))
    if not plans:
        raise UnsupportedModelError("the encoder has no layers")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return Plan(family=adapter.family, encoder_path=enc_path,
                hidden_size=plans[0].linears["attn_out"].dense_shape[0], layers=plans, dtype=dtype)
