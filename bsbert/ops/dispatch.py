"""Pick a linear backend for one weight: the fastest supported one (measured, or by a simple rule),
with a reason that says what was compared and what did not fit."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bsbert.generation import Bumps
from bsbert.ops.linear_backends import BACKENDS, PreparedLinear

BSR_DENSITY_RULE = 0.9  # heuristic mode: use a block-sparse kernel below this block density


@dataclass
class Choice(Bumps):  # a replaced choice must reach bsbert.fused_encoder's check
    prepared: PreparedLinear
    backend: str
    format: str
    block: int | None
    reason: str
    timings_ms: dict


SELECT_MODES = ("measure", "measure-gpu", "heuristic", "plan")


def check_select(select: str, device) -> None:
    """'measure' (wall clock, as an eager caller sees it), 'measure-gpu' (GPU time from CUDA-graph replays,
    as a model run under CUDA graphs sees it; CUDA only), 'heuristic' or 'plan' (the backends a plan
    already records; bsbert.patching checks the plan)."""
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {', '.join(map(repr, SELECT_MODES))}, got {select!r}")
    if select == "measure-gpu" and torch.device(device).type != "cuda":
        raise ValueError(f"select='measure-gpu' times CUDA graphs: it needs a CUDA model, this one is on "
                         f"{torch.device(device).type} (use 'measure')")


def rank_by_time(fns: dict, x: torch.Tensor, what: str, gpu: bool = False) -> tuple[list[str], dict, str]:
    """Time each ``fns[label](x)`` (interleaved rounds, best round); -> (labels fastest first, ms, reason).
    ``gpu``: GPU time of CUDA-graph replays instead of wall clock (see bsbert.timing)."""
    from bsbert.timing import best_of_interleaved, best_of_interleaved_graphs

    labels = list(fns)
    calls = [lambda f=fns[k]: f(x) for k in labels]
    secs = (best_of_interleaved_graphs(calls, device=x.device) if gpu
            else best_of_interleaved(calls, rounds=5, device=x.device))
    ms = {k: 1e3 * t for k, t in zip(labels, secs)}
    order = sorted(ms, key=ms.get)
    if ms[order[0]] == float("inf"):
        raise RuntimeError(f"no candidate could be captured in a CUDA graph at {what}: {', '.join(labels)}")
    kind = "GPU time (CUDA graphs)" if gpu else "wall clock"
    return order, ms, f"measured at {what}, {kind}: " + " < ".join(
        f"{k} {ms[k]:.2f}ms" if ms[k] != float("inf") else f"{k} (not capturable)" for k in order)


def candidates(device, dtype, *, backend: str | None = None, fmt: str | None = None,
               blocks=(32,)) -> tuple[list[tuple[str, int | None]], dict[str, list[str]]]:
    """(backend, block) pairs that fit, and the reasons for those that do not."""
    names = [backend] if backend else list(BACKENDS)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend {unknown[0]!r}; choose from {sorted(BACKENDS)}")
    fits, why_not = [], {}
    for name in names:
        be = BACKENDS[name]
        if fmt and be.format != fmt:
            why_not[name] = [f"format {be.format} but {fmt} was requested"]
            continue
        for blk in (blocks if be.format == "bsr" else (None,)):
            reasons = be.not_supported_reasons(torch.device(device), dtype, blk)
            if reasons:
                why_not[name if blk is None else f"{name}@{blk}"] = reasons
            else:
                fits.append((name, blk))
    return fits, why_not


def explain(why_not: dict[str, list[str]]) -> str:
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in why_not.items())


def _with_add_layer_norm(prepared, tokens: int, n: int, like: torch.Tensor):
    """x -> LayerNorm(prepared(x) + residual), as DenseAddLayerNorm will run it."""
    from bsbert.nn.norm import add_layer_norm

    residual = torch.randn(tokens, n, device=like.device).to(like.dtype)
    norm = torch.nn.LayerNorm(n, device=like.device, dtype=like.dtype)
    fused = getattr(prepared, "add_layer_norm", None)
    if fused is not None:
        return lambda x: fused(x, residual, norm.weight, norm.bias, norm.eps)
    return lambda x: add_layer_norm(prepared(x), residual, norm)


def choose_linear(weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool, *,
                  select: str = "measure", backend: str | None = None, fmt: str | None = None,
                  blocks=(32,), tokens: int = 384, block_density: float = 1.0,
                  add_layer_norm_tail: bool = False) -> Choice:
    """``add_layer_norm_tail``: the layer's output goes into a residual add + LayerNorm (BERT's
    attention-output and FFN-output projections); the measurement then times each candidate with
    that tail, fused into the GEMM where the backend can (cpu-bsr), so the choice sees what it runs."""
    check_select(select, weight.device)
    if select == "plan" and not backend:
        raise ValueError("select='plan' reuses a plan's backend: pass backend= (patch does this per linear)")
    fits, why_not = candidates(weight.device, weight.dtype, backend=backend, fmt=fmt, blocks=blocks)
    if not fits:
        raise ValueError(
            f"no linear backend fits device={weight.device.type} dtype={weight.dtype} "
            f"(backend={backend}, format={fmt}): {explain(why_not)}")
    skipped = f" (not eligible: {explain(why_not)})" if why_not and not backend else ""
    if len(fits) == 1:
        name, blk = fits[0]
        prepared = BACKENDS[name].prepare(weight, bias, gelu, blk)
        return Choice(prepared, name, BACKENDS[name].format, blk,
                      ("forced" if backend or fmt else "only eligible backend") + skipped, {})
    if select == "heuristic":
        ranked = sorted(fits, key=lambda nb: (
            0 if (BACKENDS[nb[0]].format == "bsr") == (block_density < BSR_DENSITY_RULE) else 1,
            list(BACKENDS).index(nb[0])))
        name, blk = ranked[0]
        prepared = BACKENDS[name].prepare(weight, bias, gelu, blk)
        wanted = "bsr" if block_density < BSR_DENSITY_RULE else "dense"
        # the rule's format had no eligible backend: say so, and why (the reason read "block density 0.50 < 0.9"
        # beside a dense choice)
        missing = (f"; no {wanted} backend eligible{skipped}" if BACKENDS[name].format != wanted else skipped)
        return Choice(prepared, name, BACKENDS[name].format, blk,
                      f"rule: block density {block_density:.2f} "
                      f"{'<' if block_density < BSR_DENSITY_RULE else '>='} {BSR_DENSITY_RULE}{missing}", {})
    x = torch.randn(tokens, weight.shape[1], device=weight.device).to(weight.dtype)
    prepared = {(name if blk is None else f"{name}@{blk}"): (BACKENDS[name].prepare(weight, bias, gelu, blk), name, blk)
                for name, blk in fits}
    fns = {k: v[0] for k, v in prepared.items()}
    what = f"M={tokens}"
    if add_layer_norm_tail:
        fns = {k: _with_add_layer_norm(p, tokens, weight.shape[0], weight) for k, p in fns.items()}
        what += " with the add+LayerNorm tail"
    order, ms, reason = rank_by_time(fns, x, what, gpu=select == "measure-gpu")
    best, name, blk = prepared[order[0]]
    return Choice(best, name, BACKENDS[name].format, blk, reason, ms)
