"""Save a patched model and load it back without the dense original and without re-analysis.

A saved model is a directory:
  bsbert.json          format version, versions of bsbert/torch/transformers, model class, config, the
                       plan (kept heads, packed shapes, chosen backends and why)
  model.safetensors    every tensor of the model that patch did not replace (embeddings, LayerNorms,
                       task head) plus ``bsbert.layers.{i}.{qkv,attn_out,ffn_in,ffn_out}.{weight,bias}``,
                       the packed weights and folded biases
Loading rebuilds the transformers skeleton on the meta device (no dense weights are ever allocated),
fills it, and re-selects backends for the device it is loaded on. It either returns a complete model
or raises; nothing half-loaded escapes.
"""
from __future__ import annotations

import json
import os

import torch

FORMAT_VERSION = 1
META_FILE, WEIGHTS_FILE = "bsbert.json", "model.safetensors"
_LINEARS = ("qkv", "attn_out", "ffn_in", "ffn_out")


def _linear_modules(model, adapter, encoder):
    """(layer index, name) -> SparseLinear in a patched model."""
    from bsbert.nn import FusedFFN, FusedIntermediate, PrunedSelfAttention

    out = {}
    for i, layer in enumerate(getattr(encoder, adapter.layers_attr)):
        att = layer.get_submodule(adapter.self_attention)
        if not isinstance(att, PrunedSelfAttention):
            raise ValueError(f"layer {i} is not patched")
        out[(i, "qkv")] = att.qkv
        out[(i, "attn_out")] = att.out_proj if adapter.attention_includes_output else \
            layer.get_submodule(adapter.attn_out)
        if adapter.ffn_block:
            ffn = layer.get_submodule(adapter.ffn_block)
            assert isinstance(ffn, FusedFFN)
            out[(i, "ffn_in")], out[(i, "ffn_out")] = ffn.ffn_in, ffn.ffn_out
        else:
            inter = layer.get_submodule(adapter.intermediate)
            assert isinstance(inter, FusedIntermediate)
            out[(i, "ffn_in")], out[(i, "ffn_out")] = inter.dense, layer.get_submodule(adapter.ffn_out)
    return out


def save(model, path: str) -> None:
    """Write a patched model to directory ``path`` (created if needed)."""
    import safetensors.torch
    import transformers

    import bsbert
    from bsbert.adapters import find_encoder
    from bsbert.errors import NotPatchedError
    from bsbert.patching import _unwrap_compiled

    model = _unwrap_compiled(model)  # torch.compile's wrapper: its class and "_orig_mod." keys are not the model's
    if not bsbert.is_patched(model):
        raise NotPatchedError("save() needs a model patched by bsbert.patch")
    _, encoder, adapter = find_encoder(model)
    tensors, aliases = _own_tensors(model.state_dict())
    for (i, name), lin in _linear_modules(model, adapter, encoder).items():
        tensors[f"bsbert.layers.{i}.{name}.weight"] = lin.packed_weight().detach().contiguous()
        tensors[f"bsbert.layers.{i}.{name}.bias"] = lin.bias.detach().contiguous()
    tensors = {k: v.cpu() for k, v in tensors.items()}
    meta = {"format_version": FORMAT_VERSION, "bsbert": bsbert.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "model_class": type(model).__name__,
            "init_kwargs": _init_kwargs(model), "aliases": aliases,
            "config": model.config.to_dict(), "plan": model.bsbert_plan.to_dict()}
    os.makedirs(path, exist_ok=True)
    # write to temporary names, then rename: an interrupted save never leaves a mixed directory
    tmp_w, tmp_m = os.path.join(path, WEIGHTS_FILE + ".tmp"), os.path.join(path, META_FILE + ".tmp")
    safetensors.torch.save_file(tensors, tmp_w, metadata={"format": "pt", "bsbert_format": str(FORMAT_VERSION)})
    with open(tmp_m, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp_w, os.path.join(path, WEIGHTS_FILE))
    os.replace(tmp_m, os.path.join(path, META_FILE))


def _own_tensors(state: dict) -> tuple[dict, dict]:
    """state_dict -> (tensors to write, {key: the key whose tensor it is}). Tied weights (a masked-LM head's
    decoder is the word-embedding matrix, its bias the head's bias) are one tensor under two keys, which
    safetensors refuses to write ("Some tensors share memory"): each is written once and recorded as an
    alias that load fills in again. A tensor that only partly overlaps another is written as a copy."""
    tensors, aliases, exact, storages = {}, {}, {}, set()
    for k, v in state.items():
        v = v.detach()
        if v.numel() == 0:
            tensors[k] = v.contiguous()
            continue
        ptr = v.untyped_storage().data_ptr()
        ident = (ptr, v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if ident in exact:
            aliases[k] = exact[ident]
            continue
        exact[ident] = k
        tensors[k] = v.clone() if ptr in storages else v.contiguous()
        storages.add(ptr)
    return tensors, aliases


def _init_kwargs(model) -> dict:
    """Constructor arguments beyond the config that load must repeat to build the same skeleton:
    ``add_pooling_layer=False`` of a BertModel-like base model built without its pooler (its state has
    no pooler tensors, and the default skeleton would ask for them)."""
    import inspect

    try:
        params = inspect.signature(type(model).__init__).parameters
    except (TypeError, ValueError):
        return {}
    if "add_pooling_layer" in params and hasattr(model, "pooler") and model.pooler is None:
        return {"add_pooling_layer": False}
    return {}


def load(path: str, device: str | torch.device = "cpu", *, select: str = "measure", backend: str | None = None,
         attention: str | None = None, tokens: int = 384, progress: bool = False):
    """Load a model written by :func:`save`; backends are chosen anew for ``device`` (``select="plan"``:
    the backends the saved plan records, for loading on the kind of device it was saved from)."""
    import safetensors
    import safetensors.torch
    import transformers

    from bsbert.adapters import find_encoder, set_submodule
    from bsbert.errors import BsbertError
    from bsbert.patching import (_encoder_owner, mark_patched, modules_from_packed, set_fast_layers,
                                  set_fused_encoder, set_huge_pages)
    from bsbert.plan import Plan

    meta_path, w_path = os.path.join(path, META_FILE), os.path.join(path, WEIGHTS_FILE)
    for p in (meta_path, w_path):
        if not os.path.isfile(p):
            raise BsbertError(f"not a bsbert save: {p} is missing")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise BsbertError(f"{meta_path} is corrupt: {exc}") from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise BsbertError(f"{meta_path} has format version {version!r}; this bsbert reads version {FORMAT_VERSION}")
    for key in ("model_class", "config", "plan"):
        if key not in meta:
            raise BsbertError(f"{meta_path} lacks '{key}'")
    cls = getattr(transformers, meta["model_class"], None)
    if cls is None:
        raise BsbertError(f"transformers {transformers.__version__} has no class {meta['model_class']}")
    try:
        tensors = safetensors.torch.load_file(w_path, device=str(device))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise BsbertError(f"{w_path} is corrupt or unreadable: {exc}") from exc

    for dup, kept in (meta.get("aliases") or {}).items():  # tied tensors, written once (_own_tensors)
        if kept in tensors and dup not in tensors:
            tensors[dup] = tensors[kept]
    config = cls.config_class.from_dict(meta["config"])
    with torch.device("meta"):
        model = cls(config, **(meta.get("init_kwargs") or {}))
    model.eval()
    plan = Plan.from_dict(meta["plan"])
    if select == "plan":
        from bsbert.patching import check_plan_choices

        check_plan_choices(plan)
    _, encoder, adapter = find_encoder(model)
    layers = getattr(encoder, adapter.layers_attr)
    if len(plan.layers) != len(layers):
        raise BsbertError(f"plan has {len(plan.layers)} layers, config builds {len(layers)}")

    # every tensor the skeleton needs must be in the file with the right shape
    state = {k: v for k, v in tensors.items() if not k.startswith("bsbert.layers.")}
    replaced_prefixes = []
    enc_prefix = find_encoder(model)[0]
    for lp in plan.layers:
        base = f"{enc_prefix}.{adapter.layers_attr}.{lp.index}."
        paths = [adapter.self_attention] + ([adapter.attn_out] if not adapter.attention_includes_output else []) \
            + ([adapter.ffn_block] if adapter.ffn_block else [adapter.intermediate, adapter.ffn_out])
        replaced_prefixes += [base + p + "." for p in paths]
    expected = {k: v for k, v in model.state_dict().items()
                if not any(k.startswith(p) for p in replaced_prefixes)}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise BsbertError(f"{w_path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise BsbertError(f"shape mismatch for {k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}")
    packed_all = {}
    for lp in plan.layers:
        packed = {}
        for name in _LINEARS:
            for part in ("weight", "bias"):
                key = f"bsbert.layers.{lp.index}.{name}.{part}"
                if key not in tensors:
                    raise BsbertError(f"{w_path} lacks {key}")
                packed[f"{name}.{part}"] = tensors[key]
            want = tuple(lp.linears[name].packed_shape)
            got = tuple(packed[f"{name}.weight"].shape)
            if got != want:
                raise BsbertError(f"shape mismatch for layer {lp.index} {name}: file {got}, plan {want}")
        packed_all[lp.index] = packed

    model.load_state_dict(state, strict=False, assign=True)
    # buffers that are not persistent (e.g. position_ids) are still on meta: recreate them
    for mod_name, mod in model.named_modules():
        for bname, buf in list(mod._buffers.items()):
            if buf is not None and buf.device.type == "meta" and not any(
                    (f"{mod_name}." if mod_name else "").startswith(p) for p in replaced_prefixes):
                mod._buffers[bname] = _rebuild_buffer(mod, bname, buf, device)
    opts = {"select": select, "backend": backend, "format": None, "blocks": (32,), "tokens": tokens,
            "attention": attention}
    swaps_all = []
    for lp, layer in zip(plan.layers, layers):
        swaps_all.append((layer, modules_from_packed(layer, adapter, lp, packed_all[lp.index], opts)))
    swaps = []
    for layer, new_modules in swaps_all:
        for p, new in new_modules.items():
            swaps.append([layer, p, None, new])
            set_submodule(layer, p, new)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftovers:
        raise BsbertError(f"loaded model still has tensors without data: {leftovers[:3]}")
    plan.device = str(device)
    if plan.unpad:
        from bsbert import unpad as unpad_mod

        unpad_mod.install(encoder, adapter)
    set_huge_pages(plan, layers)
    set_fast_layers(model, plan, layers, adapter, plan.fast_layers_reason != "fast_layers=False")
    set_fused_encoder(plan, encoder, layers, plan.fused_encoder_reason != "fused_encoder=False",
                      _encoder_owner(model, plan.encoder_path), model)
    mark_patched(model, encoder, swaps, plan)
    return model


def _rebuild_buffer(module, name, buf, device):
    if name == "position_ids":
        return torch.arange(buf.shape[-1], device=device).expand(buf.shape).clone()
    if name == "token_type_ids":
        return torch.zeros(buf.shape, dtype=buf.dtype, device=device)
    raise ValueError(f"cannot rebuild non-persistent buffer {name} of {type(module).__name__}")
