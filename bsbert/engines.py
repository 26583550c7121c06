"""Other inference engines on the pruned model's packed structure, for `bsbert bench --engines`.

A user choosing bsbert is choosing against more than torch eager: a CPU inference engine running the
packing-only model (dead heads and neurons removed, dense kernels over the zero blocks inside the kept
heads) is the other serious option. ``engine_runner`` builds that model with plain torch ops
(``bsbert.packed_export.packed_bert``), hands it to the engine with static input shapes, the bench's
thread count and the run's precision, and returns an ``EngineRunner`` (its forward, and its settings).

Engines:
- ``openvino`` (``pip install openvino``): converted from the torch module, compiled for its CPU plugin
  with the latency hint; bf16 runs ask for bf16 inference precision, fp32 runs for f32.
- ``onnxruntime`` (``pip install onnxruntime onnx``): exported by torch.onnx (TorchScript exporter,
  opset 17), run by its CPU execution provider with every graph optimisation; fp32 only (that provider
  has no bf16 GEMM: a bf16 run would be an fp32 one, not a comparison in the same precision).
An engine that is not installed or does not run here raises ``EngineUnavailable`` naming why.
"""
from __future__ import annotations

import copy
import importlib
import io
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

_PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class _Engine:
    """What bsbert needs to know of one engine (the table ``_ENGINES`` follows its builder functions)."""
    modules: tuple[str, ...]  # what it needs importable
    install: str              # how to get them
    dtypes: dict              # model dtype -> None (runs it) or why not
    build: Callable           # (packed, args, dtype, threads) -> (alone, beside, info)


class EngineUnavailable(RuntimeError):
    """The engine cannot run this model here (not installed, unsupported device / dtype / model)."""


def why_unavailable(name: str) -> str | None:
    """None when engine ``name`` can be tried here, else the reason it cannot."""
    if name not in ENGINES:
        return f"unknown engine {name!r} (known: {', '.join(ENGINES)})"
    spec = _ENGINES[name]
    for module in spec.modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a broken install
            return f"{module} is not importable ({type(exc).__name__}: {exc}); {spec.install}"
    return None


def _fp32_copy(model: nn.Module) -> nn.Module:
    """An fp32 copy of the model (bf16 values widen exactly), leaving the model as it is: the engines
    take fp32 weights (OpenVINO runs them at the requested precision)."""
    return copy.deepcopy(model).float() if next(model.parameters()).dtype != torch.float32 else model


def _type_name(t) -> str:
    """'f32' / 'bf16' for an openvino element type (its repr is "<Type: 'float32'>")."""
    return t.get_type_name() if hasattr(t, "get_type_name") else str(t)


def _openvino(packed, args, dtype, threads):
    import openvino as ov

    with warnings.catch_warnings():  # the tracer's notes on shape arithmetic (the shapes are made static below)
        warnings.simplefilter("ignore")
        ov_model = ov.convert_model(packed, example_input=args)
    ov_model.reshape({p.get_any_name(): list(a.shape) for p, a in zip(ov_model.inputs, args)})
    config = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
              "INFERENCE_PRECISION_HINT": _PRECISION[dtype]}
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()
    feed = {i: a.numpy() for i, a in enumerate(args)}

    def run() -> list:
        out = request.infer(feed, share_inputs=True)
        return [out[i] for i in range(len(out))]

    # (its threads do not keep a core busy after a call: a bsbert forward timed right after one ran as fast
    # as alone, 83.1 vs 83.4 ms bf16 seq 384; so the same runner serves beside other work)
    return run, run, {"version": ov.get_version(), "hint": "LATENCY",
                 "precision": _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
                 "threads": int(compiled.get_property("INFERENCE_NUM_THREADS"))}


def _onnxruntime(packed, args, dtype, threads):
    import onnxruntime as ort

    names = ["input_ids", "attention_mask", "token_type_ids"]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(packed, args, buf, dynamo=False, opset_version=17, input_names=names)
    arrays = {n: a.numpy() for n, a in zip(names, args)}

    def session(spin: bool):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads), 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        # the graph's own inputs: the export drops one the model never reads (attention_mask, when no layer
        # keeps a head), and a feed naming it fails ("Invalid input name")
        feed = {i.name: arrays[i.name] for i in sess.get_inputs()}
        return lambda: sess.run(None, feed)

    # Its default: worker threads spin between calls (its fastest alone), which took a core from a bsbert
    # forward timed right after it (fp32 seq 128: 64.9 ms instead of 48.0). Beside other work: not.
    return session(True), session(False), {"version": ort.__version__, "precision": "f32", "threads": int(threads),
                                           "optimisation": "ORT_ENABLE_ALL", "opset": 17}


_NO_BF16_GEMM = "onnxruntime: its CPU provider has no bf16 GEMM; compare it in float32, got torch.bfloat16"
_ENGINES = {
    "openvino": _Engine(("openvino",), "pip install openvino", {torch.float32: None, torch.bfloat16: None},
                        _openvino),
    "onnxruntime": _Engine(("onnxruntime", "onnx"), "pip install onnxruntime onnx",
                           {torch.float32: None, torch.bfloat16: _NO_BF16_GEMM}, _onnxruntime),
}
ENGINES = tuple(_ENGINES)


@dataclass
class EngineRunner:
    """One engine's forward on the packed model, built by ``engine_runner``.

    ``run()``: one forward with the engine's own settings (its fastest alone), returning a dict of output
    name -> tensor (``start_logits`` / ``end_logits``, or ``last_hidden_state``). ``run_beside()``: the
    same forward configured not to busy-wait between calls, for timing in alternation with other work
    (an engine whose idle threads spin would otherwise slow what runs next). ``info``: version, settings."""
    run: Callable[[], dict]
    run_beside: Callable[[], dict]
    info: dict


@torch.no_grad()
def engine_runner(name: str, model: nn.Module, inputs: dict, threads: int) -> EngineRunner:
    """Engine ``name`` on ``model``'s packed structure, for the inputs (``input_ids``, optional
    ``attention_mask`` (default: all ones) and ``token_type_ids`` (default: zeros): CPU tensors, their
    shapes fixed at build time); see ``EngineRunner``. The model must not be patched (unpatch it first)."""
    from bsbert.packed_export import packed_bert, refuse_patched

    why = why_unavailable(name)
    if why:
        raise EngineUnavailable(why)
    refuse_patched(model)  # before copying it
    if inputs.get("input_ids") is None:
        raise ValueError(f"{name}: inputs must hold input_ids (and may hold attention_mask, token_type_ids), "
                         f"got {sorted(inputs)}")
    ids = inputs["input_ids"]
    # (None, as transformers takes it, is the default too)
    am, tt = inputs.get("attention_mask"), inputs.get("token_type_ids")
    args = (ids, torch.ones_like(ids) if am is None else am, torch.zeros_like(ids) if tt is None else tt)
    spec, dtype = _ENGINES[name], next(model.parameters()).dtype
    if dtype not in spec.dtypes:
        raise EngineUnavailable(f"{name}: runs float32 or bfloat16 models, got {dtype}")
    if spec.dtypes[dtype]:  # before the model is copied and exported
        raise EngineUnavailable(spec.dtypes[dtype])
    param_device = next(model.parameters()).device
    if param_device.type != "cpu":
        raise EngineUnavailable(f"{name}: runs on the CPU; the model is on {param_device}")
    off_cpu = [t.device for t in args if t.device.type != "cpu"]
    if off_cpu:
        raise EngineUnavailable(f"{name}: runs on the CPU; the inputs are on {off_cpu[0]}")
    packed = packed_bert(_fp32_copy(model))
    alone, beside, info = spec.build(packed, args, dtype, threads)
    names = ("start_logits", "end_logits") if packed.qa_outputs is not None else ("last_hidden_state",)

    def tensors(run_arrays):
        return lambda: {n: torch.from_numpy(a.copy()) for n, a in zip(names, run_arrays())}

    return EngineRunner(tensors(alone), tensors(beside),
                        {"engine": name, **info, "model": "packed (plain torch ops, fp32 weights)"})
