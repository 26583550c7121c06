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
import pickle
import re

import torch

# Per-layer tensor names of a head's rows (Q/K/V) and of its columns (the output projection): BERT-style
# encoders (BERT, RoBERTa, ELECTRA, ...), then DistilBERT's.
_ROWS = re.compile(r"(?:^|\.)layer\.(\d+)\.attention\.(?:self\.(?:query|key|value)|(?:q_lin|k_lin|v_lin))\.(weight|bias)$")
_COLS = re.compile(r"(?:^|\.)layer\.(\d+)\.attention\.(?:output\.dense|out_lin)\.weight$")
# model_type values whose checkpoints name their attention tensors as above (the encoders bsbert patches)
_HEAD_NAMED_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "data2vec-text", "ernie", "distilbert")

# The order transformers reads them in: safetensors (one file, then shards) before PyTorch pickles, so that a
# stale pytorch_model.bin next to sharded safetensors is not what the pruned-heads path loads instead.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def pruned_heads(config_dict: dict) -> dict[int, list[int]]:
    """``config.json``'s ``pruned_heads`` as {layer: sorted heads} (JSON keys are strings); {} if none."""
    raw = config_dict.get("pruned_heads") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config.json: pruned_heads must map layer -> list of heads, got {type(raw).__name__}")
    out, key_of = {}, {}
    for layer, heads in raw.items():
        # a list of whole numbers only: int() took a string "12" as heads 1 and 2, 1.7 as head 1, true as head 1
        # and a dict as its keys, so an edited config pruned other heads than it said, silently
        ok = isinstance(heads, list) and all(_whole(h) for h in heads) and _whole(layer)
        if not ok:
            raise ValueError(f"config.json: pruned_heads[{layer!r}] = {heads!r} is not a list of head indices")
        n = int(layer)
        if n in key_of:  # "0" and "00" (or " 0") are both layer 0: one list silently replaced the other
            raise ValueError(f"config.json: pruned_heads has two entries for layer {n} ({key_of[n]!r} and {layer!r})")
        key_of[n] = layer
        out[n] = sorted({int(h) for h in heads})
    return {k: v for k, v in out.items() if v}


def _whole(v) -> bool:
    """An int, or a string of one (JSON's object keys are strings; transformers 4 wrote the heads as ints)."""
    if isinstance(v, str):
        # ASCII digits only: str.isdigit() also accepts "²", which int() then refuses with its own error
        digits = v.strip().lstrip("-")
        return digits.isascii() and digits.isdigit()
    return isinstance(v, int) and not isinstance(v, bool)


def _read_file(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except EOFError as exc:  # (its message is empty)
        raise ValueError(f"{path} is corrupt or not a weights file: it is empty or truncated (EOFError)") from exc
    except pickle.UnpicklingError as exc:  # torch's message is many lines of advice about weights_only=False
        raise ValueError(f"{path} is corrupt or not a weights file: torch.load(weights_only=True) cannot read it "
                         f"as a state dict (not a PyTorch file, or a pickled whole model rather than its "
                         f"state_dict())") from exc
    except Exception as exc:  # safetensors' and torch's own errors for a truncated / corrupt file do not name it
        raise ValueError(f"{path} is corrupt or not a weights file: {type(exc).__name__}: {exc}") from exc
    # torch.save'd anything loads (a list of tensors, a dict of lists): refused here rather than by an
    # AttributeError / TypeError of the code that reads it as {name: tensor}
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{path} is corrupt or not a weights file: it holds a {type(sd).__name__}, not a dict of "
                         f"tensor name -> tensor")
    return sd


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in directory ``path``: one safetensors / PyTorch file or a sharded
    set with its index (safetensors first, as transformers prefers it: _WEIGHT_FILES' order)."""
    for name in _WEIGHT_FILES:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        if not name.endswith(".index.json"):
            return _read_file(file)
        try:  # (a KeyError or JSONDecodeError without the file's name before)
            with open(file) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{file} is not a shard index with a 'weight_map' ({type(exc).__name__}: {exc})") \
                from exc
        sd = {}
        for fname in files:
            sd.update(_read_file(os.path.join(path, fname)))
        return sd
    raise ValueError(f"{path!r} holds no model weights (looked for {', '.join(_WEIGHT_FILES)})")


def expand_pruned_heads(sd: dict[str, torch.Tensor], pruned: dict[int, list[int]], num_heads: int,
                        head_dim: int, model_type: str | None = None) -> dict[str, torch.Tensor]:
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
        # another architecture (ALBERT's shared layer groups, ...) names them otherwise: say that, not "missing"
        other = (f"; model_type {model_type!r} is not an encoder bsbert supports (its pruned heads can be restored "
                 f"for {', '.join(_HEAD_NAMED_TYPES)})" if model_type and model_type not in _HEAD_NAMED_TYPES else "")
        raise ValueError(f"config.json lists pruned heads for layers {missing}, but the checkpoint has no attention "
                         f"tensors for them (names like '...layer.N.attention.self.query.weight'){other}")
    return out


def model_class(config):
    """The class to load a checkpoint with: the one ``config.json``'s ``architectures[0]`` names when transformers
    has it (BertForSequenceClassification, BertForMaskedLM, ...), else AutoModel. (Only QuestionAnswering
    checkpoints got their class before: the others came back as a bare encoder without their task head, a
    MaskedLM one with a random pooler.)"""
    import transformers
    from transformers import AutoModel, PreTrainedModel

    archs = getattr(config, "architectures", None) or []
    if archs and isinstance(archs[0], str):
        try:
            cls = getattr(transformers, archs[0], None)
        except Exception:  # a class whose optional dependency is missing: transformers' lazy import raises
            cls = None
        config_class = getattr(cls, "config_class", None)
        if (isinstance(cls, type) and issubclass(cls, PreTrainedModel)
                and (config_class is None or isinstance(config, config_class))):
            return cls
    return AutoModel


def check_attention_sizes(config) -> None:
    """ValueError unless the head count and hidden size are positive whole numbers: 0 heads ended in a
    ZeroDivisionError (here and inside transformers' attention), and transformers' own config validation
    lets 0, negative and bool values through."""
    for name in ("num_attention_heads", "hidden_size"):  # (DistilBERT's, GPT-2's configs map both names)
        if not hasattr(config, name):
            continue
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config.json: {name} must be a whole number >= 1, got {value!r}")


def check_loaded(model, info: dict, path: str) -> None:
    """BsbertError when the checkpoint had no weights for part of the encoder or embeddings (``info``: what
    ``from_pretrained(..., output_loading_info=True)`` returns). transformers initialises such weights randomly
    with a warning, so a checkpoint whose tensor names do not match (a DDP "module." prefix) loaded as a random
    model, which analyze and bench then reported under the checkpoint's name. Missing task-head weights (a
    fresh classifier, the pooler of a base model loaded from an MLM checkpoint) are initialised on purpose and
    stay a warning."""
    from bsbert.errors import BsbertError

    base = getattr(model, "base_model", model)
    prefix = getattr(model, "base_model_prefix", "") + "."

    def in_encoder(key: str) -> bool:
        if base is not model:  # a task model: its encoder / embeddings live under base_model_prefix
            if not key.startswith(prefix):
                return False
            key = key[len(prefix):]
        return not key.startswith("pooler.")

    missing = sorted(k for k in info.get("missing_keys") or () if in_encoder(k))
    if missing:
        unexpected = sorted(info.get("unexpected_keys") or ())
        found = f"; its tensors are named like {unexpected[0]!r}" if unexpected else ""
        raise BsbertError(f"model path {path!r}: the checkpoint has no weights for {len(missing)} encoder / embedding "
                          f"tensors of {type(model).__name__} (e.g. {', '.join(missing[:3])}){found}: its tensor "
                          f"names do not match the model (a DDP 'module.' prefix?), and it would load as a random "
                          f"model")


def load_pruned_heads_checkpoint(path: str, loader, config, pruned: dict[int, list[int]], dtype):
    """``loader.from_pretrained(path)`` for a checkpoint saved with ``pruned`` heads: the expanded state
    dict (see the module docstring), and a config without ``pruned_heads``. ``loader``: a model class
    (``model_class(config)``) or an Auto class."""
    from transformers import PreTrainedModel

    check_attention_sizes(config)
    num_heads, hidden = config.num_attention_heads, config.hidden_size  # (DistilBERT's config maps both names)
    if hidden % num_heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of the {num_heads} attention heads")
    sd = expand_pruned_heads(read_state_dict(path), pruned, num_heads, hidden // num_heads,
                             getattr(config, "model_type", None))
    if hasattr(config, "pruned_heads"):
        del config.pruned_heads
    # transformers 5 takes a state dict only without a path, and its Auto classes need one: the concrete
    # class the Auto class maps this config to (its mapping, else the class of a model built from it)
    if isinstance(loader, type) and issubclass(loader, PreTrainedModel):
        cls = loader
    else:
        mapping = getattr(loader, "_model_mapping", None)
        cls = (mapping[type(config)] if mapping is not None and type(config) in mapping
               else type(loader.from_config(config)))
    model, info = cls.from_pretrained(None, config=config, state_dict=sd, dtype=dtype, output_loading_info=True)
    check_loaded(model, info, path)
    return model.eval()
