"""Local checkpoints saved with pruned heads (``config.pruned_heads``), loaded under transformers 5.

nn_pruning's hub models (the seed model among them: ../shared/seed-model-card.md, "Parameters count
(includes only head pruning ...)") were saved by transformers 4 after ``model.prune_heads(...)``: their
config lists the removed heads per layer, and each such layer's query / key / value weights and biases
hold only the kept heads' rows, its attention output projection only their columns. transformers 5
has no head pruning any more: it keeps ``pruned_heads`` as an unused config attribute, builds every
layer with all heads and stops at the first smaller tensor ("size mismatch"), so such a checkpoint does
not load at all.

``load_pruned_heads_checkpoint`` puts each layer's kept heads back at their original positions of
full-size tensors and zeros the removed ones (query, key, value rows and biases, output columns): the
masked dense model, whose outputs equal the pruned model's (a removed head's attention weights then
average V = 0, and its zero output columns add nothing). ``bsbert.analyze`` / ``patch`` find those heads
empty and remove them again. The loaded config no longer lists ``pruned_heads``, so saving it cannot
ask a transformers 4 reader to prune the already-zero heads a second time.
"""
from __future__ import annotations

import json
import os
import re

import torch

# Per-layer tensor names of a head's rows (Q/K/V) and of its columns (the output projection): BERT-style
# encoders (BERT, RoBERTa, ELECTRA, ...), then DistilBERT's.
_ROWS = re.compile(r"(?:^|\.)layer\.(\d+)\.attention\.(?:self\.(?:query|key|value)|(?:q_lin|k_lin|v_lin))\.(weight|bias)$")
_COLS = re.compile(r"(?:^|\.)layer\.(\d+)\.attention\.(?:output\.dense|out_lin)\.weight$")

_SINGLE = ("model.safetensors", "pytorch_model.bin")
_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def pruned_heads(config_dict: dict) -> dict[int, list[int]]:
    """``config.json``'s ``pruned_heads`` as {layer: sorted heads} (JSON keys are strings); {} if none."""
    raw = config_dict.get("pruned_heads") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config.json: pruned_heads must map layer -> list of heads, got {type(raw).__name__}")
    out = {}
    for layer, heads in raw.items():
        # a list of whole numbers only: int() took a string "12" as heads 1 and 2, 1.7 as head 1, true as head 1
        # and a dict as its keys, so an edited config pruned other heads than it said, silently
        ok = isinstance(heads, list) and all(_whole(h) for h in heads) and _whole(layer)
        if not ok:
            raise ValueError(f"config.json: pruned_heads[{layer!r}] = {heads!r} is not a list of head indices")
        out[int(layer)] = sorted({int(h) for h in heads})
    return {k: v for k, v in out.items() if v}


def _whole(v) -> bool:
    """An int, or a string of one (JSON's object keys are strings; transformers 4 wrote the heads as ints)."""
    if isinstance(v, str):
        return v.strip().lstrip("-").isdigit()
    return isinstance(v, int) and not isinstance(v, bool)


def _read_file(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors' and torch's own errors for a truncated / corrupt file do not name it
        raise ValueError(f"{path} is corrupt or not a weights file: {type(exc).__name__}: {exc}") from exc


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in directory ``path``: one safetensors / PyTorch file or a sharded
    set with its index (safetensors first, as transformers prefers it)."""
    for name in _SINGLE:
        if os.path.isfile(os.path.join(path, name)):
            return _read_file(os.path.join(path, name))
    for name in _INDEX:
        index = os.path.join(path, name)
        if os.path.isfile(index):
            try:  # (a KeyError or JSONDecodeError without the file's name before)
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{index} is not a shard index with a 'weight_map' ({type(exc).__name__}: {exc})") \
                    from exc
            sd = {}
            for fname in files:
                sd.update(_read_file(os.path.join(path, fname)))
            return sd
    raise ValueError(f"{path!r} holds no model weights (looked for {', '.join(_SINGLE + _INDEX)})")


def expand_pruned_heads(sd: dict[str, torch.Tensor], pruned: dict[int, list[int]], num_heads: int,
                        head_dim: int) -> dict[str, torch.Tensor]:
    """A copy of state dict ``sd`` in which every layer of ``pruned`` has full-size attention tensors:
    kept heads at their original positions (transformers 4 keeps their order), removed heads zero."""
    kept_of = {}
    for layer, heads in pruned.items():
        if heads[-1] >= num_heads or heads[0] < 0:
            raise ValueError(f"config.json: pruned_heads[{layer}] = {heads} names a head outside 0..{num_heads - 1}")
        kept_of[layer] = [h for h in range(num_heads) if h not in heads]
    out = dict(sd)
    seen = set()
    for key, t in sd.items():
        m_rows, m_cols = _ROWS.search(key), _COLS.search(key)
        m = m_rows or m_cols
        if m is None or int(m.group(1)) not in pruned:
            continue
        layer = int(m.group(1))
        kept = kept_of[layer]
        dim = 0 if m_rows else 1
        want = len(kept) * head_dim
        if t.shape[dim] != want:
            raise ValueError(
                f"{key}: {tuple(t.shape)} does not fit pruned_heads[{layer}] = {pruned[layer]}: dimension {dim} should "
                f"hold the {len(kept)} kept heads x {head_dim} = {want} values (is pruned_heads from another checkpoint?)")
        shape = list(t.shape)
        shape[dim] = num_heads * head_dim
        full = t.new_zeros(shape)
        for i, h in enumerate(kept):
            full.narrow(dim, h * head_dim, head_dim).copy_(t.narrow(dim, i * head_dim, head_dim))
        out[key] = full
        seen.add(layer)
    missing = sorted(set(pruned) - seen)
    if missing:
        raise ValueError(f"config.json lists pruned heads for layers {missing}, but the checkpoint has no attention "
                         f"tensors for them (names like '...layer.N.attention.self.query.weight')")
    return out


def load_pruned_heads_checkpoint(path: str, loader, config, pruned: dict[int, list[int]], dtype):
    """``loader.from_pretrained(path)`` for a checkpoint saved with ``pruned`` heads: the expanded state
    dict (see the module docstring), and a config without ``pruned_heads``."""
    num_heads, hidden = config.num_attention_heads, config.hidden_size  # (DistilBERT's config maps both names)
    if hidden % num_heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of the {num_heads} attention heads")
    sd = expand_pruned_heads(read_state_dict(path), pruned, num_heads, hidden // num_heads)
    if hasattr(config, "pruned_heads"):
        del config.pruned_heads
    # transformers 5 takes a state dict only without a path, and its Auto classes need one: the concrete
    # class the Auto class maps this config to (its mapping, else the class of a model built from it)
    mapping = getattr(loader, "_model_mapping", None)
    cls = mapping[type(config)] if mapping is not None and type(config) in mapping else type(loader.from_config(config))
    return cls.from_pretrained(None, config=config, state_dict=sd, dtype=dtype).eval()
