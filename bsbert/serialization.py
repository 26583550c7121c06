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
import uuid

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
    from bsbert.errors import BsbertError, NotPatchedError
    from bsbert.patching import _unwrap_compiled

    model = _unwrap_compiled(model)  # torch.compile's wrapper: its class and "_orig_mod." keys are not the model's
    if not bsbert.is_patched(model):
        raise NotPatchedError("save() needs a model patched by bsbert.patch")
    # load rebuilds the model as transformers.<class name>(config): refuse now, before anything is written, what
    # it could not rebuild (a user's subclass, a wrapper module without a config), instead of a save that only
    # fails when loaded, or an AttributeError half way through
    cls_name = type(model).__name__
    if getattr(transformers, cls_name, None) is not type(model) or getattr(model, "config", None) is None:
        raise BsbertError(f"save() stores transformers models, which load() rebuilds by class name and config: "
                          f"{type(model).__module__}.{type(model).__qualname__} is not a class of transformers "
                          f"{transformers.__version__} (a subclass or a wrapper); patch and save the transformers "
                          f"model itself")
    w_final = os.path.join(path, WEIGHTS_FILE)
    found = _hf_checkpoint_files(path)
    if found:
        # e.g. save(model, the directory it came from): the dense checkpoint's model.safetensors would be replaced
        # by packed weights, or (a transformers 4 checkpoint's pytorch_model.bin) put beside it, and from_pretrained
        # then loads the packed file as a randomly initialised encoder
        raise BsbertError(f"{path} holds a Hugging Face checkpoint ({', '.join(found)}): a bsbert save would "
                          f"overwrite it or sit beside it, and from_pretrained would then load the packed weights "
                          f"as a randomly initialised encoder; save to another directory")
    _, encoder, adapter = find_encoder(model)
    state = model.state_dict()
    for (i, name), lin in _linear_modules(model, adapter, encoder).items():
        state[f"bsbert.layers.{i}.{name}.weight"] = lin.packed_weight().detach()
        state[f"bsbert.layers.{i}.{name}.bias"] = lin.bias.detach()
    # with the packed tensors: a layer (or its attention) used twice in the encoder has the same packed tensors
    # under two layer indices, which safetensors refuses to write like any tied weight
    tensors, aliases = _own_tensors(state)
    tensors = {k: v.cpu() for k, v in tensors.items()}
    # one id in both files: the two renames below are not one atomic step, so a save interrupted between them
    # (or files copied from two saves) leaves weights of one save beside the JSON of another; load refuses that
    save_id = uuid.uuid4().hex
    meta = {"format_version": FORMAT_VERSION, "bsbert": bsbert.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "model_class": type(model).__name__,
            "init_kwargs": _init_kwargs(model), "aliases": aliases, "save_id": save_id,
            "config": model.config.to_dict(), "plan": model.bsbert_plan.to_dict()}
    meta_text = _json_text(meta)  # before anything is written: a config value JSON cannot hold leaves no files
    _check_rebuildable(model, state)  # (after: it rebuilds from the config that JSON could hold)
    os.makedirs(path, exist_ok=True)
    # write to temporary names, then rename (load checks that both files come from the same save)
    tmp_w, tmp_m = os.path.join(path, WEIGHTS_FILE + ".tmp"), os.path.join(path, META_FILE + ".tmp")
    safetensors.torch.save_file(tensors, tmp_w, metadata={"format": "pt", "bsbert_format": str(FORMAT_VERSION),
                                                          "bsbert_save_id": save_id})
    with open(tmp_m, "w", encoding="utf-8") as f:
        f.write(meta_text)
    os.replace(tmp_w, w_final)
    os.replace(tmp_m, os.path.join(path, META_FILE))


def _hf_checkpoint_files(path: str) -> list[str]:
    """The files of a Hugging Face checkpoint in directory ``path`` (a model.safetensors only if save did not
    write it)."""
    from bsbert.checkpoints import _WEIGHT_FILES

    found = []
    for name in ("config.json", *_WEIGHT_FILES):
        f = os.path.join(path, name)
        if os.path.exists(f) and not (name == WEIGHTS_FILE and _is_bsbert_weights(f)):
            found.append(name)
    return found


def _expected_state(skeleton, plan, adapter, enc_prefix: str) -> tuple[dict, list[str]]:
    """(the skeleton's state_dict without the modules patch replaces, their key prefixes): what a save must
    hold beside the packed weights."""
    replaced_prefixes = []
    for lp in plan.layers:
        base = f"{enc_prefix}.{adapter.layers_attr}.{lp.index}."
        paths = [adapter.self_attention] + ([adapter.attn_out] if not adapter.attention_includes_output else []) \
            + ([adapter.ffn_block] if adapter.ffn_block else [adapter.intermediate, adapter.ffn_out])
        replaced_prefixes += [base + p + "." for p in paths]
    expected = {k: v for k, v in skeleton.state_dict().items()
                if not any(k.startswith(p) for p in replaced_prefixes)}
    return expected, replaced_prefixes


def _state_problem(expected: dict, state: dict, have: str = "file", want: str = "model") -> str | None:
    """What keeps ``state`` (named ``have`` in the text) from filling a skeleton whose tensors are ``expected``
    (named ``want``); None: nothing."""
    missing = sorted(set(expected) - set(state))
    if missing:
        return f"lacks {len(missing)} tensors, e.g. {missing[:3]}"
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            return f"shape mismatch for {k}: {have} {tuple(state[k].shape)}, {want} {tuple(v.shape)}"
        if state[k].is_floating_point() != v.is_floating_point():
            return f"dtype mismatch for {k}: {have} {state[k].dtype}, {want} {v.dtype}"
    return None


def _check_rebuildable(model, state: dict) -> None:
    """Refuse, before anything is written, a model that load() could not rebuild from its class and config:
    e.g. layers dropped from the encoder without lowering ``config.num_hidden_layers`` (the save was written,
    and every load of it failed)."""
    from bsbert.adapters import find_encoder
    from bsbert.errors import BsbertError

    cls, plan = type(model), model.bsbert_plan
    try:
        with torch.device("meta"):
            skeleton = cls(cls.config_class.from_dict(model.config.to_dict()), **_init_kwargs(model))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise BsbertError(f"save(): load() could not rebuild {cls.__name__} from its config ({type(exc).__name__}: "
                          f"{exc}); nothing was written") from exc
    enc_prefix, encoder, adapter = find_encoder(skeleton)
    built = len(getattr(encoder, adapter.layers_attr))
    if built != len(plan.layers):
        raise BsbertError(f"save(): the model's encoder has {len(plan.layers)} layers, but its config builds {built} "
                          f"(set config.num_hidden_layers after removing layers); load() could not rebuild it, "
                          f"so nothing was written")
    problem = _state_problem(_expected_state(skeleton, plan, adapter, enc_prefix)[0], state, "model", "config")
    if problem:
        what = f"the model {problem}" if problem.startswith("lacks") else problem
        raise BsbertError(f"save(): load() could not rebuild this model from its config ({what}), so nothing "
                          f"was written")


def _is_bsbert_weights(path: str) -> bool:
    """``path`` is a weights file written by save (its safetensors metadata says so)."""
    import safetensors

    try:
        with safetensors.safe_open(path, "pt") as f:
            return "bsbert_format" in (f.metadata() or {})
    except Exception:  # not a safetensors file at all, or a corrupt one: not ours to overwrite
        return False


def _json_text(meta: dict) -> str:
    """bsbert.json's text; BsbertError naming the config entry that JSON cannot hold (a tensor or a set put
    on the config), instead of json's TypeError without a key."""
    from bsbert.errors import BsbertError

    try:
        return json.dumps(meta, indent=1)
    except (TypeError, ValueError) as exc:
        where = "config or plan"
        for k, v in meta["config"].items():
            try:
                json.dumps(v)
            except (TypeError, ValueError):
                where = f"config.{k}"
                break
        raise BsbertError(f"save(): the model's {where} cannot be written as JSON ({exc}); nothing was written") \
            from exc


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
    import transformers

    from bsbert.adapters import check_config, find_encoder, set_submodule
    from bsbert.errors import BsbertError
    from bsbert.ops.attention_backends import measure_shape
    from bsbert.ops.dispatch import check_select
    from bsbert.patching import (_encoder_owner, check_no_forced_choice, mark_patched, modules_from_packed,
                                  preferred_attention, set_fast_layers, set_fused_encoder, set_huge_pages)
    from bsbert.plan import Plan

    meta_path, w_path = os.path.join(path, META_FILE), os.path.join(path, WEIGHTS_FILE)
    for p in (meta_path, w_path):
        if not os.path.isfile(p):
            raise BsbertError(f"not a bsbert save: {p} is missing")
    device, st_device = _load_device(device)
    # the arguments patch would refuse, refused as patch does and before the file is read (a negative
    # tokens= came out of the first measurement as torch's "negative dimension")
    check_select(select, device)
    check_no_forced_choice(select, backend=backend, attention=attention)
    measure_shape(tokens, None)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:  # ValueError: invalid JSON, and UnicodeDecodeError (a binary file)
        raise BsbertError(f"{meta_path} is corrupt: {exc}") from exc
    if not isinstance(meta, dict):
        raise BsbertError(f"{meta_path} is corrupt: it holds a JSON {type(meta).__name__}, not an object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise BsbertError(f"{meta_path} has format version {version!r}; this bsbert reads version {FORMAT_VERSION}")
    for key in ("model_class", "config", "plan"):
        if key not in meta:
            raise BsbertError(f"{meta_path} lacks '{key}'")
    # only a transformers model class (any other attribute of the module, e.g. "AutoConfig", failed later with
    # an AttributeError)
    cls = getattr(transformers, meta["model_class"], None) if isinstance(meta["model_class"], str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise BsbertError(f"{meta_path}: transformers {transformers.__version__} has no model class "
                          f"{meta['model_class']!r}")
    try:
        # one open for the tensors and the save id in the header (what safetensors.torch.load_file does, plus
        # the metadata it drops)
        with safetensors.safe_open(w_path, "pt", device=st_device) as f:
            file_id = (f.metadata() or {}).get("bsbert_save_id")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise BsbertError(f"{w_path} is corrupt or unreadable: {exc}") from exc
    # save renames the weights first: weights with an id the JSON lacks are the interrupted case (a file with no id
    # is a save from before the id, or one rewritten by another tool: its shapes are checked below)
    if file_id is not None and file_id != meta.get("save_id"):
        raise BsbertError(f"{w_path} and {meta_path} come from different saves (an interrupted bsbert.save, or "
                          f"files copied from two saves): save the model again")

    for dup, kept in (meta.get("aliases") or {}).items():  # tied tensors, written once (_own_tensors)
        if kept in tensors and dup not in tensors:
            tensors[dup] = tensors[kept]
    # a config, constructor arguments or plan that cannot be read (edited, or written by another version) is
    # named as such, not left as a KeyError / TypeError from transformers' or the plan's constructors
    try:
        config = cls.config_class.from_dict(meta["config"])
        with torch.device("meta"):
            model = cls(config, **(meta.get("init_kwargs") or {}))
        plan = Plan.from_dict(meta["plan"])
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise BsbertError(f"{meta_path}: cannot rebuild {meta['model_class']} from its config, init_kwargs and "
                          f"plan ({type(exc).__name__}: {exc})") from exc
    model.eval()
    if select == "plan":
        from bsbert.patching import check_plan_choices

        check_plan_choices(plan)
    enc_prefix, encoder, adapter = find_encoder(model)
    check_config(model, encoder)  # as patch refuses them: decoders, relative-position attention
    layers = getattr(encoder, adapter.layers_attr)
    if len(plan.layers) != len(layers):
        raise BsbertError(f"plan has {len(plan.layers)} layers, config builds {len(layers)}")
    _check_plan(plan, layers, adapter, enc_prefix, meta_path)

    # every tensor the skeleton needs must be in the file with the right shape
    state = {k: v for k, v in tensors.items() if not k.startswith("bsbert.layers.")}
    expected, replaced_prefixes = _expected_state(model, plan, adapter, enc_prefix)
    problem = _state_problem(expected, state)
    if problem:
        raise BsbertError(f"{w_path} {problem}" if problem.startswith("lacks") else problem)
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
            # the bias too: a wrong one only failed at the first forward, inside a kernel
            got = tuple(packed[f"{name}.bias"].shape)
            if got != want[:1]:
                raise BsbertError(f"shape mismatch for layer {lp.index} {name} bias: file {got}, plan {want[:1]}")
        packed_all[lp.index] = packed
    # the packed weights of a patched model share one floating dtype (the encoder's); one of another dtype (an
    # edited file) loaded, then failed inside a kernel at the first forward. (The other tensors may differ: a
    # bf16 model with fp32 LayerNorms patches, saves and loads.)
    packed_dtypes = {t.dtype for p in packed_all.values() for t in p.values()}
    if len(packed_dtypes) > 1 or not all(dt.is_floating_point for dt in packed_dtypes):
        raise BsbertError(f"{w_path}: the packed weights (bsbert.layers.*) must share one floating dtype, got "
                          f"{', '.join(sorted(str(dt).replace('torch.', '') for dt in packed_dtypes))}")

    model.load_state_dict(state, strict=False, assign=True)
    # buffers that are not persistent (e.g. position_ids) are still on meta: recreate them
    for mod_name, mod in model.named_modules():
        for bname, buf in list(mod._buffers.items()):
            if buf is not None and buf.device.type == "meta" and not any(
                    (f"{mod_name}." if mod_name else "").startswith(p) for p in replaced_prefixes):
                mod._buffers[bname] = _rebuild_buffer(mod, bname, buf, device)
    # the saved model's switches (the reasons say "fused_encoder=False" / "fast_layers=False" when it was off)
    fused_on = plan.fused_encoder_reason != "fused_encoder=False"
    fast_on = plan.fast_layers_reason != "fast_layers=False"
    opts = {"select": select, "backend": backend, "format": None, "blocks": (32,), "tokens": tokens,
            "attention": attention, "prefer_attention": preferred_attention(fused_on, fast_on, plan.unpad)}
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
    set_fast_layers(model, plan, layers, adapter, fast_on)
    set_fused_encoder(plan, encoder, layers, fused_on,
                      _encoder_owner(model, plan.encoder_path), model)
    mark_patched(model, encoder, swaps, plan)
    return model


def _load_device(device) -> tuple[torch.device, str]:
    """(the torch.device, the name safetensors takes for it); BsbertError for a device load cannot place the model
    on. Checked first: safetensors' own error for a bad device was reported as a corrupt file ("cpu:0",
    "cuda" without a GPU), and "cpu:0", a valid torch device, was refused."""
    from bsbert.devices import device_problem
    from bsbert.errors import BsbertError

    dev, why = device_problem(device)
    if why is not None:
        hint = "; load onto 'cpu'" if dev is not None and dev.type == "cuda" else ""
        raise BsbertError(f"load(device={device!r}): {why}{hint}")
    return dev, "cpu" if dev.type == "cpu" else str(dev)


def _check_plan(plan, layers, adapter, enc_prefix: str, meta_path: str) -> None:
    """The plan must describe the model the config builds, and its packed shapes must follow from its kept heads
    and neurons: load builds each attention from the plan's kept_heads / head_dim (with the config's scale) and
    checks the file's tensors only against packed_shape, so an edited plan (or a config that disagrees with it)
    loaded and then failed inside a kernel at the first forward, or computed silently with another head size."""
    from bsbert.errors import BsbertError

    def refuse(what: str):
        raise BsbertError(f"{meta_path}: the plan does not fit the model its config builds: {what}")

    if plan.family != adapter.family or plan.encoder_path != enc_prefix:
        refuse(f"plan encoder {plan.family} at {plan.encoder_path!r}, model {adapter.family} at {enc_prefix!r}")
    for lp, layer in zip(plan.layers, layers):
        query, hidden = layer.get_submodule(adapter.query), layer.get_submodule(adapter.attn_out).out_features
        head_dim = getattr(layer.get_submodule(adapter.self_attention), "attention_head_size", None)
        if not isinstance(head_dim, int) or isinstance(head_dim, bool):
            head_dim = lp.head_dim  # (no head size of its own: the rows per head are checked below)
        if lp.head_dim != head_dim or lp.num_heads * lp.head_dim != query.out_features:
            refuse(f"layer {lp.index} has {lp.num_heads} heads of {lp.head_dim} in the plan, the model "
                   f"{query.out_features} attention rows in heads of {head_dim}")
        if set(lp.linears) != set(_LINEARS):
            refuse(f"layer {lp.index} has linears {sorted(lp.linears)}, not {list(_LINEARS)}")
        h, n = len(lp.kept_heads) * lp.head_dim, len(lp.kept_neurons)
        want = {"qkv": (3 * h, hidden), "attn_out": (hidden, h), "ffn_in": (n, hidden), "ffn_out": (hidden, n)}
        for name, shape in want.items():
            got = tuple(lp.linears[name].packed_shape)
            if got != shape:
                refuse(f"shape mismatch for layer {lp.index} {name}: packed_shape {got}, but its "
                       f"{len(lp.kept_heads)} kept heads and {n} kept neurons make {shape}")


def _rebuild_buffer(module, name, buf, device):
    if name == "position_ids":
        return torch.arange(buf.shape[-1], device=device).expand(buf.shape).clone()
    if name == "token_type_ids":
        return torch.zeros(buf.shape, dtype=buf.dtype, device=device)
    raise ValueError(f"cannot rebuild non-persistent buffer {name} of {type(module).__name__}")
