"""The whole patched encoder as one C++ op call on CPU (``torch.ops.bsbert.bert_encoder``).

Why: a patched BERT-large forward at seq 128 on the 2-core CPU makes ~120 kernel calls, and the
Python and torch dispatch between them (module calls, argument parsing, in caches the GEMMs have just
flushed) kept the main thread busy while the other core waited: perf counted 10% of the main
thread outside the kernels and 14% of the worker idle. ``bert_encoder`` runs the same kernels over the
same tensors from a C++ loop, so the values are bit for bit those of the per-layer path. Inside it,
a layer whose linears are all block-sparse runs its attention output, FFN in, FFN out and the next
layer's QKV as one parallel region over each thread's rows (``bsbert::cpu::BsrRowChain``: a thread's
rows of each GEMM need only its own rows of the one before), prepared by the calling thread while the
attention runs, with the intermediates in per-thread buffers; torch.profiler shows each as a
``bsbert::bsr_row_chain`` range, and ``BSBERT_ENCODER_CHAIN=0`` calls every linear on its own.
The program's argument lists are registered with the extension on its first run
(``bsbert._C.encoder_register``; released with the program), so a call passes the activations and one
handle (``bsbert::bert_encoder_registered``) rather than ~20 tensors a layer: 0.46-0.60% of a bf16
seq-128 forward on the 2-core CPU (two runs of 600 alternating forwards, median of the paired ratios).

:func:`install` gives the encoder module an instance-level ``forward`` that calls the op when the call
is a plain encoder forward, and the class's own forward (bsbert's per-layer path) otherwise: under
torch.compile (which traces the per-layer ops), for tensors on another device or dtype, cross-attention
or cache arguments, while transformers collects hidden states / attentions, and when any forward hook
(NVTX ranges, a user's hook) sits on a layer's modules, since those would not run. The encoder stays
what it was (``print(model)`` says the forward changed); :func:`uninstall` restores it.

It applies to BERT-style layers on bsbert's lean layer forward whose four linears run on ``cpu-bsr``,
``onednn-dense`` or ``torch-dense`` (the FFN-in one with the exact GELU), whose attention runs on bsbert's CPU kernel, and whose
output blocks end in an affine LayerNorm; :func:`program` says why not otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.modules import module as nn_module
from torch.utils.hooks import RemovableHandle

from bsbert import generation, instance_forward

_BACKEND_KIND = {"cpu-bsr": 0, "onednn-dense": 1, "torch-dense": 2}
# the op's per-layer argument layout (csrc/ops.cpp, csrc/cpu/bert_encoder.cpp): 4 linears x 4 tensors +
# 2 LayerNorms x 2; heads, head_dim + 4 linears x (kind, out, in, block); scale + 2 eps
TENSORS_PER_LAYER, INTS_PER_LAYER, FLOATS_PER_LAYER = 20, 18, 3


@dataclass
class Program:
    """The flat argument lists of ``bert_encoder`` (layout: csrc/ops.cpp) for one patched encoder."""
    tensors: list
    ints: list[int]
    floats: list[float]
    dtype: torch.dtype
    layers: list = field(repr=False)          # the layer modules (still on the lean forward?)
    modules: list = field(repr=False)         # every module inside them (hooks would be skipped)
    output_type: type | None = None           # what the encoder's own forward returns
    # the modules' pre-hook and hook dicts themselves (registering a hook adds to the same dict), so
    # that the per-call check is a truth test per dict rather than two attribute lookups per module
    hook_dicts: list = field(default_factory=list, repr=False)
    # (dict, key, object) for every module / choice the tensors were taken from: a module or backend
    # choice replaced after patch would otherwise leave the op computing with the old one. ``watch``:
    # what no write bumps bsbert.generation's counter for (attributes of other classes that are not
    # submodules, or every submodule of theirs on a torch without module-registration hooks), looked up
    # on every call; ``watch_bsbert``: the rest (bsbert's own classes' attributes, other modules'
    # submodules), looked up only when the counter has moved
    watch: list = field(default_factory=list, repr=False)
    watch_bsbert: list = field(default_factory=list, repr=False)
    generation: int = -1  # the counter's value when watch_bsbert last matched
    # (dict, key, float) for every float the op was given (a LayerNorm's eps, the attention scale), compared
    # by value: the op holds the number, not the attribute. ``values``: LayerNorm eps, a plain attribute of
    # torch's class that no hook sees set, looked up on every call (2 a layer); ``values_bsbert``: the
    # attention scale (PrunedSelfAttention bumps the counter), looked up only when the counter has moved
    values: list = field(default_factory=list, repr=False)
    values_bsbert: list = field(default_factory=list, repr=False)
    # (module, class) for each LayerNorm the op normalises with: a class swapped in place (what
    # torch.nn.utils.parametrize does; it also registers modules and parameters, which bump the
    # counter) would compute something else. Looked at only when the counter has moved
    types: list = field(default_factory=list, repr=False)
    # the encoder's layer list as the op took it: (the encoder's _modules dict, the ModuleList's name there,
    # the ModuleList, a tuple of its layers). A layer deleted, inserted, replaced or appended, or another
    # list put in its place, leaves the op running the old layers; `del` / insert / pop write the
    # ModuleList's dict directly (no hook, no counter), so this is looked at on every call: one lookup and
    # a tuple of the layers compared by identity (~0.3 us for 24 layers). None: not watched (a program
    # made by program() alone, not installed on an encoder)
    layer_list: tuple | None = field(default=None, repr=False)
    # list name -> for each entry of that list, the object whose __dict__ the entry's dict is (else None): a
    # copy (deepcopy, pickle) of the program must watch its copied modules' own __dict__s, and a copied
    # module gets a fresh __dict__ (nn.Module.__setstate__ updates it from the copied state), so
    # __setstate__ takes vars() of the copied owners again. (_modules / _parameters dicts copy as they are.)
    vars_owners: dict = field(default_factory=dict, repr=False)
    # the lists registered with the extension (bsbert._C.encoder_register) on the first run: a call then
    # passes one int instead of ~20 tensors a layer (480 for BERT-large: ~150 us of a cold bf16 seq-128
    # forward, plus ~3 us a layer to unpack them in the op). False: this build has no registry.
    _registered: object = field(default=None, repr=False, compare=False)
    # torch's hook-handle counter (RemovableHandle.next_id) when a check last found no hook on `modules`
    # (see _hooked); -1: not checked since this program was made or copied
    no_hooks_at: int = field(default=-1, repr=False, compare=False)

    def __post_init__(self):
        self.hook_dicts = [d for m in self.modules for d in (m._forward_pre_hooks, m._forward_hooks)]
        self._index_values()

    def _index_values(self):
        # `values` as parallel sequences: the per-call check is then one list built by map() in C and one
        # list comparison (48 LayerNorm eps of BERT-large: ~0.9 us warm against ~1.9 us for a generator)
        self._value_dicts = tuple(d for d, _, _ in self.values)
        self._value_keys = tuple(k for _, k, _ in self.values)
        self._value_floats = [v for _, _, v in self.values]

    def run(self, hidden, key_padding_mask):
        """The encoder op on ``hidden`` (the registered form when the build has it)."""
        reg = self._registered
        if reg is None:
            reg = self._registered = _Registration.of(self)
        if reg is False:
            return torch.ops.bsbert.bert_encoder(hidden, key_padding_mask, self.tensors, self.ints, self.floats)
        return torch.ops.bsbert.bert_encoder_registered(hidden, key_padding_mask, reg.handle)

    def __getstate__(self):
        # a copy (copy.deepcopy of a patched model, pickling) registers its own tensors on its first run
        state = dict(self.__dict__)
        state["_registered"] = None
        state["no_hooks_at"] = -1  # the copy's modules are others (a deep copy carries their hooks along)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        for name, owners in self.vars_owners.items():
            entries = getattr(self, name)
            for i, owner in enumerate(owners):
                if owner is not None:
                    entries[i] = (vars(owner),) + tuple(entries[i][1:])
        self._index_values()

    def stale(self) -> bool:
        listed = self.layer_list
        if listed is not None:
            owner, name, ml, entries = listed
            if owner.get(name) is not ml or tuple(ml._modules.values()) != entries:
                return True
        if any(d.get(k) is not v for d, k, v in self.watch) \
                or list(map(dict.get, self._value_dicts, self._value_keys)) != self._value_floats:
            return True
        now = generation.current()
        if now == self.generation:
            return False
        if any(d.get(k) is not v for d, k, v in self.watch_bsbert) \
                or any(d.get(k) != v for d, k, v in self.values_bsbert) or any(type(m) is not t for m, t in self.types):
            return True
        self.generation = now  # nothing of this encoder's was replaced: the counter moved elsewhere
        return False

    def watch_layer_list(self, encoder: nn.Module, name: str) -> None:
        """Watch ``encoder.<name>`` (the ModuleList the layers came from) for edits (see ``layer_list``)."""
        ml = encoder._modules[name]
        self.layer_list = (encoder._modules, name, ml, tuple(ml._modules.values()))


class _Registration:
    """A program's lists registered with the extension; released when the program goes away."""

    def __init__(self, handle: int, release):
        self.handle = handle
        self._release = release

    @classmethod
    def of(cls, prog: Program):
        from bsbert import _ext

        mod = _ext.load(warn=False)
        if mod is None or not hasattr(mod, "encoder_register") or not _has_cpu_kernel("bert_encoder_registered"):
            return False
        return cls(mod.encoder_register(prog.tensors, prog.ints, prog.floats), mod.encoder_release)

    def __del__(self):
        try:
            self._release(self.handle)
        except Exception:  # interpreter shutdown: nothing left to release into
            pass


def _watch(owner, name: str) -> tuple:
    """(the dict that holds owner.name, name, its current value, whether a write of it bumps
    bsbert.generation's counter: any attribute of a bsbert class, a submodule of any module once
    generation.watch_module_assignments is in place; owner when the dict is its __dict__, else None), for
    Program.stale."""
    if isinstance(owner, nn.Module) and name in owner._modules:
        d = owner._modules
        counted = isinstance(owner, generation.Bumps) or generation.watch_module_assignments()
        return d, name, d[name], counted, None
    d = vars(owner)
    return d, name, d[name], isinstance(owner, generation.Bumps), owner


def _watch_parameter(owner: nn.Module, name: str) -> tuple:
    """_watch for the parameter ``owner.name`` (a LayerNorm's weight / bias): the entry of its
    ``_parameters`` dict. Assigning a Parameter or None (``norm.weight = nn.Parameter(...)``,
    ``load_state_dict(assign=True)``, torch.nn.utils.parametrize) goes through register_parameter,
    whose global hook bumps the counter once :func:`generation.watch_parameter_assignments` is in place
    (a torch without that hook: the entry is looked up on every call)."""
    return owner._parameters, name, owner._parameters.get(name), generation.watch_parameter_assignments(), None


def _linear_args(lin, gelu: bool, where: str):
    """tensors, ints of one SparseLinear, or a str saying why it cannot be part of the program."""
    choice = getattr(lin, "choice", None)
    if choice is None:
        return f"{where}: no weight left (bias only)"
    kind = _BACKEND_KIND.get(choice.backend)
    if kind is None:
        return f"{where}: backend {choice.backend} (the fused encoder runs {', '.join(_BACKEND_KIND)})"
    if lin.gelu != gelu:
        return f"{where}: GELU {'not ' if gelu else ''}fused as expected"
    t = choice.prepared.tensors
    if not all(k in t for k in (("bsm", "crow_indices", "col_indices", "values") if kind == 0 else ("weight",))):
        return f"{where}: prepared tensors do not match backend {choice.backend}"
    if kind == 0:
        n, k = t["bsm"].shape
        return [t["crow_indices"], t["col_indices"], t["values"], t["bias"]], [0, n, k, choice.block]
    return [t["weight"], None, None, t["bias"]], [kind, lin.out_features, lin.in_features, 0]


def program(layers, dtype: torch.dtype) -> Program | str:
    """The op's arguments for ``layers`` (patched BERT layers), or why they do not fit it."""
    from bsbert import fast_layer
    from bsbert.nn import DenseAddLayerNorm, FusedIntermediate, PrunedSelfAttention

    tensors, ints, floats, modules, watch, values, types = [], [], [], [], [], [], []
    for i, layer in enumerate(layers):
        if not fast_layer.installed(layer):
            return f"layer {i} is not on bsbert's lean layer forward"
        try:
            sa, so = layer.attention.self, layer.attention.output
            inter, out = layer.intermediate, layer.output
        except AttributeError as exc:
            return f"layer {i}: not a BERT layer ({exc})"
        if not isinstance(sa, PrunedSelfAttention) or sa.out_proj is not None:
            return f"layer {i}: attention is not bsbert's PrunedSelfAttention"
        if sa.backend.name != "cpu":
            return f"layer {i}: attention backend {sa.backend.name} (the fused encoder runs bsbert's cpu kernel)"
        if sa.num_heads == 0:
            return f"layer {i}: every head removed"
        if not (isinstance(so, DenseAddLayerNorm) and isinstance(out, DenseAddLayerNorm)
                and isinstance(inter, FusedIntermediate) and inter.act is None):
            return f"layer {i}: output blocks / intermediate are not bsbert's fused modules"
        lt, li = [], [sa.num_heads, sa.head_dim]
        for lin, gelu, where in ((sa.qkv, False, "qkv"), (so.dense, False, "attention output"),
                                 (inter.dense, True, "FFN in"), (out.dense, False, "FFN out")):
            got = _linear_args(lin, gelu, f"layer {i} {where}")
            if isinstance(got, str):
                return got
            lt += got[0]
            li += got[1]
        for norm in (so.LayerNorm, out.LayerNorm):
            if norm.weight is None or norm.bias is None or len(norm.normalized_shape) != 1:
                return f"layer {i}: LayerNorm without affine weights"
            if norm.weight.dtype not in (dtype, torch.float32) or norm.bias.dtype not in (dtype, torch.float32):
                return f"layer {i}: LayerNorm weights in {norm.weight.dtype} (the kernel takes {dtype} or float32)"
            lt += [norm.weight, norm.bias]
        tensors += lt
        ints += li
        watch += [_watch(layer, "attention"), _watch(layer.attention, "self"), _watch(layer.attention, "output"),
                  _watch(layer, "intermediate"), _watch(layer, "output"), _watch(sa, "backend"),
                  _watch(so, "LayerNorm"), _watch(out, "LayerNorm")]
        for owner in (sa, so, inter, out):
            lin = owner.qkv if owner is sa else owner.dense
            watch += [_watch(owner, "qkv" if owner is sa else "dense"), _watch(lin, "choice"),
                      _watch(lin.choice, "prepared")]
        for norm in (so.LayerNorm, out.LayerNorm):  # the op holds these tensors: watch the norms' entries
            watch += [_watch_parameter(norm, "weight"), _watch_parameter(norm, "bias")]
            types.append((norm, type(norm)))
        floats += [float(sa.scale), float(so.LayerNorm.eps), float(out.LayerNorm.eps)]
        values += [(vars(sa), "scale", floats[-3], isinstance(sa, generation.Bumps), sa),
                   (vars(so.LayerNorm), "eps", floats[-2], False, so.LayerNorm),
                   (vars(out.LayerNorm), "eps", floats[-1], False, out.LayerNorm)]
        modules += list(layer.modules())
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        return "weights are not on the CPU"
    if not _has_cpu_kernel("bert_encoder"):
        return "bsbert::bert_encoder has no CPU kernel in this build"
    if not all(k in d for d, k, *_ in values):
        return "the attention scale or a LayerNorm's eps is not a plain attribute"
    lists = {"watch": [w for w in watch if not w[3]], "watch_bsbert": [w for w in watch if w[3]],
             "values": [v for v in values if not v[3]], "values_bsbert": [v for v in values if v[3]]}
    return Program(tensors, ints, floats, dtype, list(layers), modules, types=types,
                   vars_owners={k: [e[4] for e in v] for k, v in lists.items()},
                   **{k: [e[:3] for e in v] for k, v in lists.items()})


def _has_cpu_kernel(op: str) -> bool:
    from bsbert import _ext

    if not _ext.available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"bsbert::{op}", "CPU")
    except RuntimeError:
        return False


_COLLECTOR: list = []  # [transformers' capture context variable, or None], looked up once


def _capturing() -> bool:
    """transformers (>= 5) is collecting hidden states / attentions through its layer hooks. (The context
    variable is looked up once: the import statement alone cost ~30 us per call in a cold forward.)"""
    return bool(_collected())


def collecting(key: str) -> bool:
    """transformers is collecting ``key`` ("attentions", "hidden_states") in this forward."""
    collected = _collected()
    return bool(collected) and key in collected


def _collected():
    """What transformers collects in this forward (a dict keyed by output name), or None."""
    if not _COLLECTOR:
        try:
            from transformers.utils.output_capturing import _active_collector
        except ImportError:
            _active_collector = None
        _COLLECTOR.append(_active_collector)
    collector = _COLLECTOR[0]
    if collector is None:
        return None
    # Under torch.compile transformers keeps a capture in a plain attribute (its CompileableContextVar
    # sets `compiling` then), and before torch 2.14 dynamo cannot trace ContextVar.get: calling get()
    # broke the graph of every compiled patched forward on torch 2.11-2.13 (found with torch 2.13).
    if torch.compiler.is_compiling() and not getattr(collector, "compiling", False):
        return None
    return collector.get()


def _is_capture_hook(hook) -> bool:
    # transformers' output-capturing hooks stay installed once used and do nothing while no capture runs
    return (getattr(hook, "__name__", "") == "output_capturing_hook"
            and getattr(hook, "__module__", "").startswith("transformers."))


def _hooked(prog: Program) -> bool:
    """A forward (pre-)hook that the op would skip: a global one, or one on a module of the layers.

    The ~480 hook dicts are looked at only when torch's hook-handle counter has moved since they were
    last found empty: every registration through torch's API (``register_forward_hook`` and the like,
    transformers' capture hooks too) takes a new ``RemovableHandle`` id, and removing hooks cannot add
    one. Looking at them cost ~32 us of a cold bf16 seq-128 forward (their dicts miss the caches after
    the op has streamed the weights). A hook put into a module's dict without torch's API is not seen
    while the counter stands (as bsbert.generation does not see such writes)."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    handles = RemovableHandle.next_id
    if prog.no_hooks_at == handles:
        return False
    if any(prog.hook_dicts) and any(d and not all(_is_capture_hook(h) for h in d.values())
                                    for d in prog.hook_dicts):
        return True
    prog.no_hooks_at = handles
    return False


def why_not_now(prog: Program, hidden, encoder_hidden_states, args, kwargs) -> str | None:
    """None if this call can run as one op, else why it takes the per-layer path."""
    if torch.compiler.is_compiling():
        return "torch.compile traces the per-layer ops"
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.device.type != "cpu" \
            or hidden.dtype != prog.dtype:
        return "hidden states are not a [B, S, H] CPU tensor of the model's dtype"
    return why_not_for_call(prog, encoder_hidden_states, args, kwargs)


def why_not_for_call(prog: Program, encoder_hidden_states, args, kwargs) -> str | None:
    """:func:`why_not_now` without the hidden states: what the lean BertModel forward asks before it computes
    the embeddings (it computed them, found a hook, and then transformers computed them again)."""
    from bsbert import fast_layer

    if torch.compiler.is_compiling():
        return "torch.compile traces the per-layer ops"
    if encoder_hidden_states is not None or args or any(
            kwargs.get(k) is not None for k in ("encoder_attention_mask", "cache", "past_key_values", "head_mask")):
        return "cross-attention, cache or head-mask arguments"
    if kwargs.get("output_hidden_states") or kwargs.get("output_attentions") or _capturing():
        return "hidden states / attentions are being collected"
    if not fast_layer.installed(prog.layers[0]):
        return "the original layers are in place (bsbert.verify / unpatch)"
    if _hooked(prog):
        return "forward hooks on the layers' modules"
    if prog.stale():
        return ("a module, backend choice, layer of the layer list, LayerNorm parameter or eps, or attention scale "
                "was changed after patch (reinstall with bsbert.fused_encoder.install)")
    return None


def _fused_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, *args, **kwargs):
    from bsbert.ops.attention_backends import key_padding_mask

    prog = self._bsbert_program
    if why_not_now(prog, hidden_states, encoder_hidden_states, args, kwargs) is not None:
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states, *args, **kwargs)
    b, s, _ = hidden_states.shape
    kpm = key_padding_mask(attention_mask, b, s)
    out = prog.run(hidden_states, kpm)
    return out if prog.output_type is None else prog.output_type(last_hidden_state=out)


def chained_layers(prog: Program) -> int:
    """Layers whose attention output, FFN in and FFN out are all block-sparse (kind 0): those run as one
    row-tile region with the next layer's QKV (bsbert::cpu::BsrRowChain) when the call has enough rows
    for the row split (2 register tiles of 12 rows per thread)."""
    per = INTS_PER_LAYER
    return sum(all(prog.ints[i * per + 2 + 4 * j] == 0 for j in (1, 2, 3)) for i in range(len(prog.layers)))


def _extra_repr(self) -> str:
    prog = self._bsbert_program
    n = len(prog.layers)
    return (f"forward=bsbert fused encoder ({n} layers in one op, bsbert::bert_encoder; {chained_layers(prog)} "
            f"with a row chain; bsbert.fused_encoder)")


@torch.inference_mode()
def _output_type(encoder: nn.Module, hidden_size: int, dtype: torch.dtype):
    """The type of the encoder class's own output (one token through it), so that the fused forward
    returns the same kind of object; None when that is a plain tensor."""
    probe = torch.zeros(1, 1, hidden_size, dtype=dtype)
    out = type(encoder).forward(encoder, probe)
    if isinstance(out, torch.Tensor):
        return None
    if not hasattr(out, "last_hidden_state"):
        raise TypeError(f"{type(encoder).__name__}.forward returns {type(out).__name__}")
    return type(out)


def install(encoder: nn.Module, layers, hidden_size: int, dtype: torch.dtype) -> str | None:
    """Give ``encoder`` the fused forward; returns None, or why not (then nothing is changed)."""
    name = next((k for k, v in encoder._modules.items() if v is layers), None)
    if name is None or not isinstance(layers, nn.ModuleList):
        return "the layers are not a ModuleList of the encoder (its edits could not be watched)"
    prog = program(list(layers), dtype)
    if isinstance(prog, str):
        return prog
    prog.watch_layer_list(encoder, name)
    try:
        prog.output_type = _output_type(encoder, hidden_size, dtype)
    except Exception as exc:  # the probe must never leave a half-patched model behind
        return f"probe forward of {type(encoder).__name__} failed: {exc}"
    encoder._bsbert_program = prog
    attach(encoder)
    return None


def attach(encoder: nn.Module) -> None:
    instance_forward.attach(encoder, _fused_forward, _extra_repr)


def detach(encoder: nn.Module) -> None:
    """Back to the class's forward (the program is kept for :func:`attach`)."""
    instance_forward.detach(encoder, _fused_forward, _extra_repr)


def uninstall(encoder: nn.Module) -> None:
    detach(encoder)
    encoder.__dict__.pop("_bsbert_program", None)


def installed(encoder: nn.Module) -> bool:
    return instance_forward.installed(encoder, _fused_forward)
