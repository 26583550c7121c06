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


def _linear(layer: nn.Module, path: str) -> nn.Linear:
    mod = layer.get_submodule(path)
    if not isinstance(mod, nn.Linear):
        raise UnsupportedModelError(
            f"expected nn.Linear at '{path}', found {type(mod).__name__} (already patched or an "
            f"unsupported variant)")
    return mod


def _check_weights(name: str, lin: nn.Linear) -> None:
    for pname, p in (("weight", lin.weight), ("bias", lin.bias)):
        if p is None:
            continue
        if p.device.type == "meta":
            raise UnsupportedModelError(
                f"{name}.{pname} is on the meta device: load real weights before analyze/patch")
        if not bool(torch.isfinite(p).all()):
            raise UnsupportedModelError(f"{name}.{pname} contains NaN or Inf")


def head_rows(kept_heads, head_dim: int, device) -> torch.Tensor:
    """Row indices of the kept heads in a [num_heads * head_dim, ...] projection, head-major."""
    return torch.tensor([h * head_dim + i for h in kept_heads for i in range(head_dim)], dtype=torch.long,
                        device=device)


def block_density(weight: torch.Tensor, block: int = ANALYSIS_BLOCK) -> float:
    """Fraction of non-empty ``block x block`` tiles (zero-padded to whole blocks)."""
    n, k = weight.shape
    if n == 0 or k == 0:
        return 0.0
    np_, kp = -(-n // block) * block, -(-k // block) * block
    w = torch.zeros(np_, kp, dtype=torch.bool, device=weight.device)
    w[:n, :k] = weight.ne(0)
    tiles = w.reshape(np_ // block, block, kp // block, block).any(dim=(1, 3))
    return float(tiles.float().mean())


def layer_linears(layer: nn.Module, adapter: EncoderAdapter, prefix: str) -> dict[str, nn.Linear]:
    names = {"query": adapter.query, "key": adapter.key, "value": adapter.value,
             "attn_out": adapter.attn_out, "ffn_in": adapter.ffn_in, "ffn_out": adapter.ffn_out}
    lins = {k: _linear(layer, p) for k, p in names.items()}
    for k, lin in lins.items():
        _check_weights(f"{prefix}.{names[k]}", lin)
    return lins


def analyze_layer(index: int, lins: dict[str, nn.Linear], num_heads: int) -> LayerPlan:
    hidden = lins["query"].in_features
    all_head = lins["query"].out_features
    if all_head % num_heads:
        raise UnsupportedModelError(f"layer {index}: {all_head} q outputs not divisible by {num_heads} heads")
    d = all_head // num_heads
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
                          nonzero=int(nonzero), block_density=block_density(packed))

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
    check_config(model)
    cfg = getattr(model, "config", None)
    layers = getattr(encoder, adapter.layers_attr)
    plans = []
    for i, layer in enumerate(layers):
        attn = layer.get_submodule(adapter.self_attention)
        num_heads = _num_heads(attn, cfg)
        if num_heads is None:
            raise UnsupportedModelError(f"layer {i}: cannot tell the number of attention heads")
        prefix = f"{enc_path}.{adapter.layers_attr}.{i}"
        plans.append(analyze_layer(i, layer_linears(layer, adapter, prefix), int(num_heads)))
    if not plans:
        raise UnsupportedModelError("the encoder has no layers")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return Plan(family=adapter.family, encoder_path=enc_path,
                hidden_size=plans[0].linears["attn_out"].dense_shape[0], layers=plans, dtype=dtype)
