"""patch's last step (``check_model``): the whole forward with the per-linear choices against the same
model with every linear on its fastest dense backend (what packing alone gives), keeping the faster.

Each linear's backend is chosen from timings of that linear alone, called back to back on one input.
A forward is not always the sum of those: on a GPU the host launches the calls one after another, so
kernels that each win alone (their launch hidden behind their own previous call) can leave the whole
forward host-bound, and caches hold other data between calls in a model. An H100 run (stop 16,
batch 32) measured a patched forward 1.8x slower than packing only. This check makes that visible
in the plan and keeps such a model on dense linears, so ``patch`` does not end slower than packing.
The attention backends are the same in both forwards; only the linears differ.
"""
from __future__ import annotations

import copy
import warnings

import torch

from bsbert.ops.attention_backends import measure_shape
from bsbert.ops.dispatch import candidates
from bsbert.ops.linear_backends import BACKENDS
from bsbert.plan import Plan

MARGIN = 0.03  # dense linears replace the measured choices only when at least this much faster
ROUNDS = 5     # timing rounds per forward (best round counts, see bsbert.timing.best_of_interleaved)


def why_not(check, select: str, backend, fmt, device) -> str | None:
    """None if the check is to run, else why not; a check that was asked for and cannot mean anything
    is an error (raised before patch changes anything)."""
    if check not in (None, True, False):
        raise ValueError(f"check_model must be None (auto), True or False, got {check!r}")
    if check is False:
        return "check_model=False"
    fixed = ("backend= is forced" if backend else "format= is forced" if fmt else
             f"select={select!r} reuses the plan's backends" if select == "plan" else
             f"select={select!r} ranks CUDA-graph replays, the check times eager forwards"
             if select == "measure-gpu" else None)
    if check is True:
        if fixed:
            raise ValueError(f"check_model=True compares the per-linear choices with dense linears, but "
                             f"{fixed}: there is no choice to check")
        return None
    if fixed:
        return fixed
    if torch.device(device).type != "cuda":
        return "off by default on CPU, where per-linear timings have matched the model's; check_model=True runs it"
    if select != "measure":
        return f"select={select!r} (on by default with 'measure')"
    return None


def dense_plan(plan: Plan, device, dtype) -> Plan | None:
    """A copy of ``plan`` with every block-sparse linear moved to its fastest dense backend (from the
    timings patch recorded, else the first dense backend that fits); None if none is block-sparse."""
    fits, _ = candidates(device, dtype, fmt="dense")
    if not fits:
        return None
    out, changed = copy.deepcopy(plan), False
    for lp in out.layers:
        for lin in lp.linears.values():
            if lin.format != "bsr":
                continue
            measured = {k: v for k, v in lin.timings_ms.items() if k in BACKENDS and BACKENDS[k].format == "dense"}
            name = min(measured, key=measured.get) if measured else fits[0][0]
            lin.reason = f"model check: dense linears ran the forward faster than the per-linear choice ({lin.backend})"
            lin.format, lin.block, lin.backend = "dense", None, name
            changed = True
    return out if changed else None


def forward_inputs(model, tokens: int, seq: int | None) -> dict | str:
    """Generated ``input_ids`` / ``attention_mask`` (no padding) of ``measure_shape(tokens, seq)`` (the
    sequence length capped at the model's position table), or why there are none."""
    from bsbert.verify import example_inputs

    cfg = getattr(model, "config", None)
    if not getattr(cfg, "vocab_size", None):
        return "the model's config has no vocab_size to generate inputs from"
    batch, s = measure_shape(tokens, seq)
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos and s > max_pos:
        batch, s = max(1, batch * s // max_pos), max_pos
    return example_inputs(model, batch, s, padded=False)


def _time(model, inputs: dict, device) -> float:
    from bsbert.timing import best_of_interleaved

    return 1e3 * best_of_interleaved([lambda: model(**inputs)], rounds=ROUNDS, device=device)[0]


def run(model, repatch, tokens: int, seq: int | None) -> None:
    """``repatch(plan)`` unpatches ``model`` and patches it again from a copy of ``plan``'s recorded
    backends, returning the model's new plan. Leaves the faster variant in place and its plan's ``model_check``
    filled in."""
    plan: Plan = model.bsbert_plan
    param = next(model.parameters())
    dense = dense_plan(plan, param.device, param.dtype)
    if dense is None:
        plan.model_check = {"checked": False, "reason": "not needed: no linear is block-sparse"}
        return
    inputs = forward_inputs(model, tokens, seq)
    if isinstance(inputs, str):
        plan.model_check = {"checked": False, "reason": f"not run: {inputs}"}
        return
    shape = list(inputs["input_ids"].shape)
    try:
        chosen_ms = _time(model, inputs, param.device)
    except Exception as exc:  # a model whose forward wants other inputs: keep the choices, say why
        plan.model_check = {"checked": False,
                            "reason": f"not run: the forward on generated inputs {shape} failed ({exc})"}
        return
    # repatch works on copies: `plan` (the choices, with their own reasons) and `dense` stay as they are
    try:
        repatch(dense)
        dense_ms = _time(model, inputs, param.device)
    except Exception as exc:  # the dense variant failed: the choices go back in, the plan says why
        _restore_reasons(repatch(plan), plan)
        model.bsbert_plan.model_check = {"checked": False, "reason": f"not run: the dense variant failed ({exc})"}
        return
    keep_dense = dense_ms < (1 - MARGIN) * chosen_ms
    final = model.bsbert_plan if keep_dense else repatch(plan)
    _restore_reasons(final, dense if keep_dense else plan)
    what = (f"forward at B={shape[0]} S={shape[1]}: per-linear choices {chosen_ms:.2f} ms, dense linears "
            f"{dense_ms:.2f} ms -> kept {'dense linears' if keep_dense else 'the per-linear choices'}")
    final.model_check = {"checked": True, "reason": what, "chosen_ms": chosen_ms, "dense_ms": dense_ms,
                         "kept": "dense" if keep_dense else "chosen", "shape": shape}
    if keep_dense:
        warnings.warn(f"bsbert.patch: the per-linear backend choices made the whole forward slower than dense "
                      f"linears ({what}); see model.bsbert_plan.model_check", RuntimeWarning, stacklevel=3)


def _restore_reasons(final: Plan, chosen: Plan) -> None:
    """Re-patching from a plan marks each reason 'plan: ...'; the check re-patched from plans it made
    itself, so their own reasons (what was measured, or the check's) stand."""
    for lp, src in zip(final.layers, chosen.layers):
        lp.attention_reason = src.attention_reason
        for name, lin in lp.linears.items():
            lin.reason = src.linears[name].reason
