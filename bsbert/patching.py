"""plan -> swapped modules. ``patch`` is all-or-nothing: every replacement is built first, then the
swaps (plain attribute assignments, which cannot fail) happen together; ``unpatch`` restores."""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from bsbert.adapters import check_config, find_encoder, set_submodule
from bsbert.analyze import analyze, check_no_patched_part, head_rows, layer_linears
from bsbert.errors import AlreadyPatchedError, BsbertError, NotPatchedError, UnsupportedModelError
from bsbert.guards import install_guards, remove_guards
from bsbert.nn import DenseAddLayerNorm, FusedFFN, FusedIntermediate, PrunedSelfAttention, SparseLinear
from bsbert.ops.attention_backends import measure_shape
from bsbert.ops.dispatch import check_select, choose_linear
from bsbert.plan import LinearPlan, Plan


def _is_exact_gelu(act) -> bool:
    # transformers' GELUActivation() with use_gelu_python=False calls F.gelu (erf form)
    name = type(act).__name__
    fn = getattr(act, "act", None)
    return (act is F.gelu) or (name == "GELUActivation" and fn is F.gelu) or isinstance(act, nn.GELU) and \
        getattr(act, "approximate", "none") == "none"


def _bias(lin: nn.Linear) -> torch.Tensor:
    if lin.bias is not None:
        return lin.bias.detach()
    return torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device)


def _make_linear(name, weight, bias, gelu, lp: LinearPlan, opts, layer_index, ln_tail=False) -> SparseLinear:
    n, k = weight.shape
    choice = None
    if n and k:
        from_plan = opts["select"] == "plan"  # the plan's backend and block, checked by check_plan_choices
        choice = choose_linear(weight.contiguous(), bias, gelu, select=opts["select"],
                               backend=lp.backend if from_plan else opts["backend"],
                               fmt=None if from_plan else opts["format"],
                               blocks=(lp.block,) if from_plan and lp.block else opts["blocks"],
                               tokens=opts["tokens"], block_density=lp.block_density,
                               add_layer_norm_tail=ln_tail)
        if from_plan:
            lp.reason = lp.reason if (lp.reason or "").startswith("plan: ") else f"plan: {lp.reason}"
        else:
            lp.format, lp.block, lp.backend, lp.reason = choice.format, choice.block, choice.backend, choice.reason
            lp.timings_ms = dict(choice.timings_ms)
    else:
        lp.format, lp.block, lp.backend, lp.reason = "empty", None, "bias-only", "no weights left"
        lp.timings_ms = {}
    return SparseLinear(k, n, bias, choice, gelu, lp.density, name=f"layer{layer_index}.{name}")


def check_plan_choices(plan: Plan) -> None:
    """select='plan' reuses the backends a plan records (from an earlier patch, or bsbert.save): every
    linear with weights needs one, and every layer with kept heads an attention backend. Raised before
    anything changes; a backend that does not fit this device is refused later, also before any swap."""
    missing = [f"layer {lp.index} {name}" for lp in plan.layers for name, lin in lp.linears.items()
               if lin.backend is None or (lin.backend == "bias-only") != (lin.format == "empty")]
    missing += [f"layer {lp.index} attention" for lp in plan.layers
                if lp.kept_heads and lp.attention_backend is None]
    if missing:
        raise ValueError(f"select='plan' needs a plan with every backend chosen (from a patched model's "
                         f"bsbert_plan or a bsbert save); this one has none for {', '.join(missing[:4])}"
                         + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))


def check_no_forced_choice(select: str, **forced) -> None:
    """select='plan' takes every backend from the plan: a ``backend=`` / ``format=`` / ``attention=`` given
    with it would be ignored (patch and load used to drop them silently), so it is refused instead."""
    given = [f"{k}={v!r}" for k, v in forced.items() if v is not None]
    if select == "plan" and given:
        raise ValueError(f"select='plan' takes every backend from the plan, so {', '.join(given)} would be "
                         f"ignored: drop {'it' if len(given) == 1 else 'them'}, or choose anew with "
                         f"select='measure' or 'heuristic'")


_LAYER_STRUCTURE = ("num_heads", "head_dim", "kept_heads", "folded_heads", "ffn_size", "kept_neurons",
                    "folded_neurons")


def _differs(a, b) -> bool:
    norm = (lambda v: list(v) if isinstance(v, (list, tuple)) else v)
    return norm(a) != norm(b)


def plan_for_model(plan: Plan, model: nn.Module) -> Plan:
    """A plan passed to patch only lends its choices (backends, blocks, attention kernels): which heads
    and neurons are kept and folded must be this model's own, or patch would pack the wrong rows and
    fold the wrong biases, silently (another model's plan, even one with the same counts). -> this
    model's analysis with ``plan``'s choices; BsbertError naming the first layer and field that differ.
    Runs before anything changes."""
    own = analyze(model)

    def refuse(where: str, mine, theirs):
        def short(v):
            text = str(list(v) if isinstance(v, tuple) else v)
            return text if len(text) <= 60 else text[:57] + "..."

        raise BsbertError(f"the plan passed to patch does not describe this model: {where} is {short(theirs)} "
                          f"in the plan but {short(mine)} in the model (a plan records which heads and FFN "
                          f"neurons a model keeps; pass this model's own plan, or none)")

    for name in ("family", "encoder_path", "hidden_size"):
        if _differs(getattr(own, name), getattr(plan, name)):
            refuse(name, getattr(own, name), getattr(plan, name))
    if len(own.layers) != len(plan.layers):
        refuse("the number of layers", len(own.layers), len(plan.layers))
    for mine, theirs in zip(own.layers, plan.layers):
        for name in _LAYER_STRUCTURE:
            if _differs(getattr(mine, name), getattr(theirs, name)):
                refuse(f"layer {mine.index} {name}", getattr(mine, name), getattr(theirs, name))
        if set(mine.linears) != set(theirs.linears):
            refuse(f"layer {mine.index} linears", sorted(mine.linears), sorted(theirs.linears))
        for lname, lin in mine.linears.items():
            other = theirs.linears[lname]
            for shape in ("dense_shape", "packed_shape"):
                if _differs(getattr(lin, shape), getattr(other, shape)):
                    refuse(f"layer {mine.index} {lname} {shape}", getattr(lin, shape), getattr(other, shape))
            lin.format, lin.block, lin.backend, lin.reason = other.format, other.block, other.backend, other.reason
            lin.timings_ms = dict(other.timings_ms)
        mine.attention_backend, mine.attention_reason = theirs.attention_backend, theirs.attention_reason
    return own


def fold_dead_heads(lins, lp) -> torch.Tensor:
    """Output-projection bias (float64) plus what dead heads still add: a head whose V rows are zero
    outputs the constant b_v[h] (softmax rows sum to one), so it adds W_o[:, h] @ b_v[h]."""
    wo = lins["attn_out"].weight.detach()
    bo = _bias(lins["attn_out"]).double()
    bv = _bias(lins["value"]).double()
    d = lp.head_dim
    for h in lp.folded_heads:
        # not +=: in a float64 model bo is the original's own bias tensor
        bo = bo + wo[:, h * d:(h + 1) * d].double() @ bv[h * d:(h + 1) * d]
    return bo


def fold_dead_neurons(lins, act) -> torch.Tensor:
    """FFN output bias (float64) plus what dead neurons still add: a neuron whose intermediate row is
    zero outputs the constant act(b_1[j]), so it adds act(b_1[j]) * W_2[:, j]."""
    w1, b1 = lins["ffn_in"].weight.detach(), _bias(lins["ffn_in"])
    w2, b2 = lins["ffn_out"].weight.detach(), _bias(lins["ffn_out"]).double()
    dead_rows = ~w1.ne(0).any(1) & w2.ne(0).any(0)
    if bool(dead_rows.any()):
        b2 = b2 + w2[:, dead_rows].double() @ act(b1[dead_rows].double())
    return b2


def layer_act(layer, adapter):
    owner, _, attr = adapter.act.rpartition(".")
    return getattr(layer.get_submodule(owner) if owner else layer, attr)


@torch.no_grad()
def pack_layer(layer, adapter, lp, prefix) -> dict[str, torch.Tensor]:
    """The packed (dead heads/neurons removed, dead contributions folded) weights and biases of one
    layer: ``{qkv,attn_out,ffn_in,ffn_out}.{weight,bias}``. This is also what bsbert.save stores."""
    lins = layer_linears(layer, adapter, prefix)
    d, dev, dt = lp.head_dim, lins["query"].weight.device, lins["query"].weight.dtype
    rows = head_rows(lp.kept_heads, d, dev)
    neurons = torch.tensor(lp.kept_neurons, dtype=torch.long, device=dev)
    w1, w2 = lins["ffn_in"].weight.detach(), lins["ffn_out"].weight.detach()
    return {
        # fused QKV over the kept heads: [q_heads | k_heads | v_heads], each head-major
        "qkv.weight": torch.cat([lins[n].weight.detach()[rows] for n in ("query", "key", "value")]),
        "qkv.bias": torch.cat([_bias(lins[n])[rows] for n in ("query", "key", "value")]),
        "attn_out.weight": lins["attn_out"].weight.detach()[:, rows],
        # copy=True: in a float64 model the folded bias can be the original's own tensor
        "attn_out.bias": fold_dead_heads(lins, lp).to(dt, copy=True),
        "ffn_in.weight": w1[neurons],
        "ffn_in.bias": _bias(lins["ffn_in"])[neurons],
        "ffn_out.weight": w2[:, neurons],
        "ffn_out.bias": fold_dead_neurons(lins, layer_act(layer, adapter)).to(dt, copy=True),
    }


@torch.no_grad()
def modules_from_packed(layer, adapter, lp, packed: dict, opts) -> dict[str, nn.Module]:
    """Kernel-backed replacement modules for one layer, from its packed tensors."""
    attn = layer.get_submodule(adapter.self_attention)
    act = layer_act(layer, adapter)
    fuse_gelu = _is_exact_gelu(act)
    d = lp.head_dim
    w = packed["qkv.weight"]
    dev, dt = w.device, w.dtype
    L = lp.linears
    # BERT-style output projections feed DenseAddLayerNorm: measured with that tail (see _output_swap)
    ln_tails = {"attn_out", "ffn_out"} if adapter.layer_style == "bert" else set()
    lin = {name: _make_linear(name, packed[f"{name}.weight"], packed[f"{name}.bias"],
                              fuse_gelu and name == "ffn_in", L[name], opts, lp.index, name in ln_tails)
           for name in ("qkv", "attn_out", "ffn_in", "ffn_out")}
    scale = float(getattr(attn, "scaling", d ** -0.5))
    from bsbert.ops.attention_backends import choose_attention

    from_plan = opts["select"] == "plan" and lp.kept_heads
    attn_backend, attn_reason = choose_attention(dev, dt, len(lp.kept_heads), d,
                                                 backend=lp.attention_backend if from_plan else opts["attention"],
                                                 tokens=opts["tokens"], select=opts["select"],
                                                 seq=opts.get("seq"), prefer=opts.get("prefer_attention"))
    if from_plan:
        attn_reason = lp.attention_reason if (lp.attention_reason or "").startswith("plan: ") \
            else f"plan: {lp.attention_reason}"
    lp.attention_backend, lp.attention_reason = attn_backend.name, attn_reason
    attention = PrunedSelfAttention(lin["qkv"], lp.kept_heads, d, scale, lp.index,
                                    out_proj=lin["attn_out"] if adapter.attention_includes_output else None,
                                    backend=attn_backend, reason=attn_reason)
    swaps = {adapter.self_attention: attention}
    if not adapter.attention_includes_output:
        swaps.update(_output_swap(layer, adapter, adapter.attn_out, lin["attn_out"]))
    if adapter.ffn_block:
        swaps[adapter.ffn_block] = FusedFFN(lin["ffn_in"], None if fuse_gelu else act, lin["ffn_out"])
    else:
        swaps[adapter.intermediate] = FusedIntermediate(lin["ffn_in"], None if fuse_gelu else act)
        swaps.update(_output_swap(layer, adapter, adapter.ffn_out, lin["ffn_out"]))
    for path, new in swaps.items():  # in the mode of the module each replaces (a new module is in training mode)
        new.train(layer.get_submodule(path).training)
    return swaps


def _output_swap_path(layer, adapter, dense_path: str) -> str:
    """The module _output_swap replaces: BERT's SelfOutput / Output (dense -> dropout -> LayerNorm(h +
    input_tensor)) as a whole, a parent with any other make-up (a variant with extra submodules) only its linear."""
    parent_path = dense_path.rpartition(".")[0]
    parent = layer.get_submodule(parent_path) if parent_path else None
    children = dict(parent.named_children()) if parent is not None else {}
    if (adapter.layer_style == "bert" and set(children) == {"dense", "dropout", "LayerNorm"}
            and isinstance(children["LayerNorm"], nn.LayerNorm)):
        return parent_path
    return dense_path


def _output_swap(layer, adapter, dense_path: str, dense: SparseLinear) -> dict[str, nn.Module]:
    """BERT's SelfOutput / Output is replaced as a whole by DenseAddLayerNorm (fused add + LayerNorm,
    reusing the original LayerNorm module); elsewhere only the linear is swapped (_output_swap_path)."""
    path = _output_swap_path(layer, adapter, dense_path)
    if path != dense_path:
        return {path: DenseAddLayerNorm(dense, layer.get_submodule(path).LayerNorm)}
    return {dense_path: dense}


def _replaced_paths(layer, adapter) -> list[str]:
    """The paths (inside one layer) of the modules patch replaces, as modules_from_packed swaps them."""
    paths = [adapter.self_attention]
    if not adapter.attention_includes_output:
        paths.append(_output_swap_path(layer, adapter, adapter.attn_out))
    if adapter.ffn_block:
        paths.append(adapter.ffn_block)
    else:
        paths += [adapter.intermediate, _output_swap_path(layer, adapter, adapter.ffn_out)]
    return paths


def _forward_is_library(m: nn.Module) -> bool:
    """``m`` computes what transformers' or torch's own class computes: its class's forward is defined in
    transformers or torch.nn (a subclass that only adds attributes passes) and no instance forward."""
    fwd = getattr(type(m), "forward", None)
    origin = getattr(fwd, "__module__", "") or ""
    return "forward" not in vars(m) and origin.startswith(("transformers.", "torch.nn."))


def check_replaceable(encoder: nn.Module, adapter, enc_path: str) -> None:
    """Refuse (before anything changes) a model whose modules that patch replaces compute something bsbert
    does not reproduce, which patch would otherwise drop silently: a forward hook or pre-hook on one of them
    or inside (it would no longer run; transformers' own output-capturing hooks and torch.nn.utils.prune's
    hooks excepted: the latter are read by analyze), a user subclass or instance with its own forward, an
    attention function registered with transformers under a name of one's own. The LayerNorm that
    DenseAddLayerNorm keeps may have hooks (it then calls the module): only its forward is checked."""
    from torch.nn.utils import prune

    from bsbert.fused_encoder import _is_capture_hook

    for i, layer in enumerate(getattr(encoder, adapter.layers_attr)):
        act = layer_act(layer, adapter)
        for path in _replaced_paths(layer, adapter):
            top = layer.get_submodule(path)
            # (DenseAddLayerNorm keeps an output block's LayerNorm and calls it when it has hooks)
            kept_norm = top._modules.get("LayerNorm") if isinstance(top, nn.Module) and path != adapter.self_attention \
                else None
            linears = [f"{sub}." if sub else "" for sub, m in top.named_modules() if isinstance(m, nn.Linear)]
            for sub, m in top.named_modules():
                if any(sub.startswith(lin) and sub != lin[:-1] for lin in linears):
                    continue  # inside a linear (torch.nn.utils.parametrize's modules): analyze reads its weight
                where = f"{enc_path}.{adapter.layers_attr}.{i}.{path}" + (f".{sub}" if sub else "")
                if m is not act and not _forward_is_library(m):
                    fwd = getattr(type(m), "forward", None)
                    origin = "set on the instance" if "forward" in vars(m) else \
                        f"{getattr(fwd, '__module__', '?')}.{getattr(fwd, '__qualname__', fwd)}"
                    raise UnsupportedModelError(
                        f"{where} ({type(m).__module__}.{type(m).__qualname__}) has a forward of its own "
                        f"({origin}), not transformers' or torch's: bsbert replaces this module by kernels that "
                        f"compute transformers' {adapter.family} layer, so the patched model would silently differ "
                        f"(a quantized, LoRA/adapter-wrapped or subclassed module: merge / dequantize it into "
                        f"transformers' modules and a plain nn.Linear first)")
                if m is kept_norm:
                    continue
                hooks = [h for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
                         if not _is_capture_hook(h) and not isinstance(h, prune.BasePruningMethod)]
                if hooks:
                    raise UnsupportedModelError(
                        f"{where} ({type(m).__name__}) has a forward hook or pre-hook "
                        f"({getattr(hooks[0], '__qualname__', type(hooks[0]).__qualname__)}): bsbert replaces this "
                        f"module, so the hook would silently stop running; remove it (handle.remove()) before patch "
                        f"and register it again after bsbert.unpatch, or hook the layer itself")
        attn = layer.get_submodule(adapter.self_attention)
        impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
        if impl not in (None, "eager"):
            try:
                from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

                fn = ALL_ATTENTION_FUNCTIONS.get(impl)
            except Exception:  # another transformers: nothing to look up
                fn = None
            origin = getattr(fn, "__module__", "") or ""
            if fn is not None and not origin.startswith("transformers."):
                raise UnsupportedModelError(
                    f"layer {i} attention runs attn_implementation={impl!r}, a function registered with "
                    f"transformers' AttentionInterface ({origin}.{getattr(fn, '__qualname__', fn)}): bsbert's "
                    f"kernels compute standard softmax attention, not whatever that function does; patch a "
                    f"model with attn_implementation 'sdpa' or 'eager'")


def _build_layer(layer, adapter, lp, opts, prefix):
    return modules_from_packed(layer, adapter, lp, pack_layer(layer, adapter, lp, prefix), opts)


def patch(model: nn.Module, *, plan: Plan | None = None, backend: str | None = None,
          format: str | None = None, block: int = 32, select: str = "measure", tokens: int = 384,
          seq: int | None = None,
          progress: bool = True, keep_original: bool = True, verify: bool = False,
          attention: str | None = None, unpad: bool = False, fast_layers: bool = True,
          fused_encoder: bool = True, check_model: bool | None = None) -> nn.Module:
    """Swap a pruned BERT-like model's attention and FFN for kernel-backed modules, in place.

    Dead heads and FFN neurons are removed (their constant contributions folded into biases), Q/K/V
    are fused into one GEMM, and each remaining linear runs on the fastest backend that fits
    (``select='measure'`` times the candidates on ``tokens`` rows, wall clock as an eager caller sees it;
    ``'measure-gpu'`` ranks them by GPU time from CUDA-graph replays, for a model that will run under
    CUDA graphs such as torch.compile(mode="reduce-overhead"); ``'heuristic'`` uses a block-density
    rule; ``'plan'`` reuses the backends recorded in ``plan`` (a patched model's ``bsbert_plan``), no
    measuring; ``seq``: the sequence length the attention candidates are timed at, as ``tokens // seq``
    sequences, default ``min(tokens, 512)``). ``backend=`` ('cpu-bsr', 'onednn-dense', 'torch-dense', 'cuda-bsr', 'triton-bsr') and
    ``format=`` ('dense', 'bsr') force a choice, ``attention=`` ('torch-sdpa', 'triton', 'cuda',
    'cpu') the attention kernel (default: measured among those that fit; on CPU that is bsbert's C++
    kernel vs torch SDPA). Returns the model; ``model.bsbert_plan`` holds the plan with every choice and
    its reason; ``bsbert.unpatch(model)`` restores the original modules.
    ``check_model``: after choosing per call, time the whole forward on ``tokens // seq`` random
    sequences with those choices, with torch SDPA attention, and with every block-sparse linear on its
    fastest dense backend, and keep a variant that is clearly faster (bsbert.model_check: timings of each
    call in isolation can mislead where a forward's calls interact, e.g. host-bound GPU launches).
    Default (None): on for CUDA models with ``select='measure'``; False never; True also on CPU. The
    plan's ``model_check`` says what ran.
    A model without pruning is patched too (fused QKV, faster kernels); the plan shows it.
    ``keep_original=False`` drops the replaced modules so memory goes down (then unpatch/verify are
    impossible). ``verify=True`` compares the patched model with its masked dense original once on
    generated inputs and, if it fails, restores the original modules and raises.
    ``unpad=True`` runs the encoder padding-free (bsbert.unpad): linears on real tokens only; real
    tokens' outputs are exact, padded positions come out as zeros.
    ``fast_layers=True`` (default) gives each BERT-style layer bsbert's lean forward
    (bsbert.fast_layer: the same modules without transformers' per-layer Python); False keeps
    transformers' layer forward.
    ``fused_encoder=True`` (default) runs the whole encoder as one C++ op on CPU when every layer fits
    (bsbert.fused_encoder: the same kernels, no Python between them; calls it does not cover, such as
    torch.compile or collected hidden states, take the per-layer path); ``model.bsbert_plan`` says
    whether it is on and why not.
    """
    from bsbert import model_check

    if verify and not keep_original:
        raise ValueError("verify=True needs keep_original=True (the original is the reference)")
    given, model = model, _unwrap_compiled(model)
    if getattr(model, "_bsbert_patched", False):
        raise AlreadyPatchedError("model is already patched by bsbert; call bsbert.unpatch(model) first")
    enc_path, encoder, adapter = find_encoder(model)  # an unsupported model is refused first (and again in _patch_once)
    check_no_patched_part(model)
    check_config(model, encoder)
    check_replaceable(encoder, adapter, enc_path)
    device = next(model.parameters()).device
    check_select(select, device)
    check_no_forced_choice(select, backend=backend, format=format, attention=attention)
    measure_shape(tokens, seq)  # a bad seq is an error before anything changes
    if select == "plan":
        if plan is None:
            raise ValueError("select='plan' reuses a plan's backends: pass plan= (e.g. another patched "
                             "model's bsbert_plan)")
        check_plan_choices(plan)
    if plan is not None:
        # often another model's own plan: patch fills in a new one, built from this model's analysis
        plan = plan_for_model(plan, model)
    check_why_not = model_check.why_not(check_model, select, backend, format, device)  # errors here too
    opts = {"select": select, "backend": backend, "format": format, "blocks": (block,), "tokens": tokens,
            "seq": seq, "attention": attention}
    setup = {"unpad": unpad, "fast_layers": fast_layers, "fused_encoder": fused_encoder, "progress": progress}
    opts["prefer_attention"] = preferred_attention(fused_encoder, fast_layers, unpad)
    # A model in training mode would run as a hybrid that matches neither mode: dropout in the modules bsbert
    # keeps (embeddings, task head), none in its own (a forward's outputs changed from call to call, ~0.1 off
    # the eval-mode model's). So patch puts the model in eval mode, and unpatch gives every module back its flag.
    was_training = [m for m in model.modules() if m.training]
    _patch_in_eval(model, was_training, plan, opts, setup)
    if was_training:  # (after: a patch that refuses leaves the model, and its training flags, as they were)
        warnings.warn("patching a model in training mode: bsbert modules are inference-only (no dropout, no "
                      "gradients through custom kernels), so patch put the model in eval mode; bsbert.unpatch "
                      "restores training mode", RuntimeWarning, stacklevel=2)
    if check_why_not is None:
        model_check.run(model, lambda p: _repatch(model, p, opts, setup), tokens, seq,
                        attention_forced=bool(attention))
    else:
        model.bsbert_plan.model_check = {"checked": False, "reason": f"not run ({check_why_not})"}
    if verify:
        from bsbert.verify import verify as run_verify

        try:
            report = run_verify(model)
        except BaseException:  # a forward that raises leaves the model as patch found it, as a failed check does
            unpatch(model)
            raise
        if not report.passed:
            unpatch(model)
            raise BsbertError(f"patch refused: the patched model does not match its original\n{report}")
        model.bsbert_verify_report = report
    if not keep_original:
        for s in model._bsbert_swaps:
            s[2] = None
    # BSBERT_NVTX=1: named ranges for the patched model's life (attached last, so that neither the model
    # check nor verify times their hooks)
    from bsbert import nvtx

    if nvtx.attach_if_enabled(model) and model.bsbert_plan.fused_encoder:
        # the one-op encoder stays installed but steps aside for hooks: the plan must not claim it runs
        model.bsbert_plan.fused_encoder = False
        model.bsbert_plan.fused_encoder_reason = ("BSBERT_NVTX=1: its range hooks send every call down the "
                                                  "per-layer path")
    return given


def _patch_in_eval(model: nn.Module, was_training: list, plan: Plan | None, opts: dict, setup: dict) -> None:
    """_patch_once with ``was_training`` (the modules in training mode before patch) in eval mode, and recorded
    for unpatch; if it fails, they are given their flag back, as the model was."""
    for m in was_training:
        m.training = False
    try:
        _patch_once(model, plan, opts, setup)
    except BaseException:
        _restore_training(was_training)
        raise
    model._bsbert_was_training = was_training


def _restore_training(modules) -> None:
    """Training mode back on exactly the modules that had it (``Module.train()`` would set every child)."""
    for m in modules:
        m.training = True


def _repatch(model: nn.Module, plan: Plan, opts: dict, setup: dict) -> Plan:
    """Unpatch (if patched: a failed re-patch leaves the original modules), then patch again with the
    backends ``plan`` records (no measuring), on a copy as ``patch(select="plan")`` does; -> the model's plan."""
    was_training = model.__dict__.get("_bsbert_was_training", [])
    if is_patched(model):
        unpatch(model)  # (gives those modules their training flag back: off again while patched)
    _patch_in_eval(model, was_training, copy.deepcopy(plan), {**opts, "select": "plan"},
                   {**setup, "progress": False, "repatch": True})
    return model.bsbert_plan


def _warn_if_bf16_widened() -> None:
    """A bf16 CPU model on a CPU without a bf16 dot product: say that fp32 may be the faster choice, since
    patch cannot change the model's dtype for the user."""
    from bsbert import _ext

    if _ext.bf16_widened_on_cpu():
        warnings.warn("this CPU has no bf16 dot-product instruction (AVX512-BF16): bsbert's bf16 kernels widen "
                      "bf16 to fp32, so a float32 copy of the model may run faster (on a Zen 5 capped to AVX2 "
                      "the bf16 forward took 1.2x the float32 one); `python -m bsbert.info` shows the CPU level",
                      RuntimeWarning, stacklevel=4)


def _patch_once(model: nn.Module, plan: Plan | None, opts: dict, setup: dict) -> None:
    """Build every replacement (choosing backends as opts say), then swap them in and install the lean
    forwards; the model's plan is ``plan`` (or a fresh analysis) with the choices filled in."""
    enc_path, encoder, adapter = find_encoder(model)
    check_config(model, encoder)
    if plan is None:
        plan = analyze(model)
    layers = getattr(encoder, adapter.layers_attr)
    if len(plan.layers) != len(layers):
        raise UnsupportedModelError(f"plan has {len(plan.layers)} layers, model has {len(layers)}")
    first = next(model.parameters())
    device = first.device
    if device.type == "cpu" and first.dtype == torch.bfloat16 and not setup.get("repatch"):
        _warn_if_bf16_widened()
    replacements = []
    for lp, layer in tqdm(list(zip(plan.layers, layers)), desc="bsbert patch", disable=not setup["progress"],
                          unit="layer"):
        prefix = f"{enc_path}.{adapter.layers_attr}.{lp.index}"
        replacements.append((layer, _build_layer(layer, adapter, lp, opts, prefix)))
    # all replacements exist: swap them in one go
    swaps = []
    for layer, new_modules in replacements:
        for path, new in new_modules.items():
            swaps.append([layer, path, layer.get_submodule(path), new])
            set_submodule(layer, path, new)
    plan.device = str(device)
    if setup["unpad"]:
        from bsbert import unpad as unpad_mod
        from bsbert.nn.linear import activation_like

        unpad_mod.install(encoder, adapter, plan.hidden_size, activation_like(encoder).dtype)
    plan.unpad = bool(setup["unpad"])
    set_huge_pages(plan, layers)
    set_fast_layers(model, plan, layers, adapter, setup["fast_layers"])
    set_fused_encoder(plan, encoder, layers, setup["fused_encoder"], _encoder_owner(model, enc_path), model)
    mark_patched(model, encoder, swaps, plan)


def mark_patched(model: nn.Module, encoder: nn.Module, swaps: list, plan: Plan) -> None:
    """The last step of patch and bsbert.load: record what was swapped and install the guards."""
    object.__setattr__(model, "_bsbert_encoder", encoder)  # a reference, not a registered submodule
    model._bsbert_swaps = swaps
    model._bsbert_patched = True
    model.bsbert_plan = plan
    install_guards(model)


def set_huge_pages(plan: Plan, layers) -> None:
    """Move the block-sparse CPU kernel's packed weights into 2 MiB pages (bsbert.hugepages); the plan
    records how many bytes and why none."""
    from bsbert import hugepages

    plan.huge_page_bytes, plan.huge_pages_reason = hugepages.place_packed_weights(layers)


def set_fast_layers(model: nn.Module, plan: Plan, layers, adapter, on: bool) -> None:
    """Install bsbert.fast_layer's lean forward on the patched layers (if ``on`` and it fits); the
    plan records the outcome and why it is off."""
    from bsbert import fast_layer

    why = fast_layer.install(layers, adapter, plan.hidden_size) if on else "fast_layers=False"
    plan.fast_layers, plan.fast_layers_reason = why is None, why or ""
    model._bsbert_fast_layers = list(layers) if why is None else []  # a plain list: not submodules


def _encoder_owner(model: nn.Module, enc_path: str) -> nn.Module:
    """The module whose attribute the encoder is (BertModel for 'bert.encoder')."""
    return model.get_submodule(enc_path.rpartition(".")[0]) if "." in enc_path else model


def preferred_attention(fused_encoder: bool, fast_layers: bool, unpad: bool) -> str | None:
    """The attention backend kept where it times close to the fastest (``choose_attention``'s ``prefer``):
    bsbert's cpu kernel when the one-op encoder may run, since it runs that kernel in every layer (CPU only:
    elsewhere "cpu" never fits). The same conditions as ``set_fused_encoder``'s."""
    return "cpu" if fused_encoder and fast_layers and not unpad else None


def set_fused_encoder(plan: Plan, encoder: nn.Module, layers, on: bool, owner: nn.Module | None = None,
                      model: nn.Module | None = None) -> None:
    """Install bsbert.fused_encoder's one-op forward on the encoder (if ``on`` and it fits), then
    bsbert.lean_model's forward on its owner (a BertModel) and on the whole ``model`` when that is a
    BertForQuestionAnswering; the plan records the outcome and why not."""
    from bsbert import fused_encoder, lean_model

    if not on:
        why = "fused_encoder=False"
    elif plan.unpad:
        why = "unpad=True (the padding-free encoder forward)"
    elif not plan.fast_layers:
        why = "the lean layer forward is off"
    else:
        from bsbert.nn.linear import activation_like

        why = fused_encoder.install(encoder, layers, plan.hidden_size, activation_like(encoder).dtype)
    plan.fused_encoder, plan.fused_encoder_reason = why is None, why or ""
    if why is None:
        why = lean_model.install(owner, encoder) if owner is not None else "no owner module given"
    plan.lean_model, plan.lean_model_reason = why is None, why or ""
    if why is None and model is not None and model is not owner:
        lean_model.install_head(model, owner)  # BertForQuestionAnswering only; print(model) shows it


_NO_ORIGINALS = ("the original modules were dropped (patch(..., keep_original=False)) or never loaded "
                 "(a model from bsbert.load holds only the packed ones)")


def swap_modules(model: nn.Module, which: str) -> None:
    """Put the 'original' or the 'patched' modules in place (verify uses this to compare)."""
    if any(s[2] is None for s in model._bsbert_swaps):  # before anything changes
        raise NotPatchedError(f"verify needs the original modules: {_NO_ORIGINALS}")
    from bsbert import unpad as unpad_mod

    enc = getattr(model, "_bsbert_encoder", None)
    if which == "original" and enc is not None and getattr(enc, "_bsbert_unpadded", False):
        model._bsbert_unpad_forward = unpad_mod.detach(enc)
    elif which == "patched" and getattr(model, "_bsbert_unpad_forward", None) is not None:
        unpad_mod.reattach(enc, model._bsbert_unpad_forward)
        model._bsbert_unpad_forward = None
    from bsbert import fast_layer

    from bsbert import fused_encoder

    from bsbert import lean_model

    fast = getattr(model, "_bsbert_fast_layers", [])
    owners = [m for m in model.modules() if "_bsbert_output_type" in vars(m)]  # lean model forwards
    if which == "original":
        fast_layer.uninstall(fast)
        if enc is not None:
            fused_encoder.detach(enc)
        for m in owners:
            lean_model.detach(m)
    else:
        fast_layer.attach(fast)
        if enc is not None and getattr(enc, "_bsbert_program", None) is not None:
            fused_encoder.attach(enc)
        for m in owners:
            lean_model.attach(m)
    # the originals back in reverse order: where two layers share a module (the same layer object twice
    # in the list, a shared BertAttention), the later swap recorded the earlier one's replacement as its
    # "original", and undoing in order left that replacement in place
    swaps = model._bsbert_swaps if which != "original" else reversed(model._bsbert_swaps)
    for layer, path, original, new in swaps:
        set_submodule(layer, path, original if which == "original" else new)


def _unwrap_compiled(model):
    """The model a torch.compile wrapper (OptimizedModule) runs, else ``model``. The wrapper forwards most
    attribute reads and writes to that model but not all (``object.__setattr__``, ``del``): patching the
    wrapper itself split bsbert's state between the two, and unpatch then failed half way. patch / unpatch
    work on the wrapped model, which the wrapper then runs (and recompiles for)."""
    while type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_modules", {}).get("_orig_mod"), nn.Module):
        model = model._modules["_orig_mod"]
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the modules that :func:`patch` replaced."""
    given, model = model, _unwrap_compiled(model)
    if not getattr(model, "_bsbert_patched", False):
        from bsbert.analyze import patched_part

        part = patched_part(model) if isinstance(model, nn.Module) else None
        raise NotPatchedError("model was not patched by bsbert" + (
            f" (its part '{part}' was: bsbert.unpatch that)" if part else ""))
    if any(s[2] is None for s in model._bsbert_swaps):
        raise NotPatchedError(f"cannot unpatch: {_NO_ORIGINALS}")
    remove_guards(model.modules())
    swap_modules(model, "original")
    from bsbert import unpad as unpad_mod

    unpad_mod.uninstall(model._bsbert_encoder)
    from bsbert import fused_encoder

    fused_encoder.uninstall(model._bsbert_encoder)
    from bsbert import lean_model

    for m in [m for m in model.modules() if "_bsbert_output_type" in vars(m)]:
        lean_model.uninstall(m)
    del model._bsbert_encoder
    del model._bsbert_swaps
    model.__dict__.pop("_bsbert_fast_layers", None)
    del model.bsbert_plan
    model.__dict__.pop("bsbert_verify_report", None)
    model.__dict__.pop("_bsbert_unpad_forward", None)
    for m in model.modules():  # the lean forward's cache of the embeddings' default-id buffers
        m.__dict__.pop("_bsbert_default_ids", None)
    _restore_training(model.__dict__.pop("_bsbert_was_training", ()))
    model._bsbert_patched = False
    return given

def is_patched(model: nn.Module) -> bool:
    return bool(getattr(_unwrap_compiled(model), "_bsbert_patched", False))
