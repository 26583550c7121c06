"""patch's last step (``check_model``): the whole forward with the measured choices against the same
model on what packing alone gives (dense linears, torch SDPA attention), keeping the faster.

Each linear's and each layer's attention backend is chosen from timings of that call alone, called back
to back on one input. A forward is not always the sum of those: on a GPU the host launches the calls
one after another, so kernels that each win alone (their launch hidden behind their own previous call)
can leave the whole forward host-bound, and caches hold other data between calls in a model. An H100
run (stop 16, batch 32) measured a patched forward 1.8x slower than packing only, cause not diagnosed:
linears or attention. So the check asks both questions of the whole forward, one after the other:
1. attention: the measured choices vs torch SDPA in every layer with kept heads (skipped when every
   layer already runs SDPA or ``attention=`` forced a backend);
2. linears: every block-sparse linear moved to its fastest dense backend, with the attention step 1 kept.
A variant replaces the best so far only when at least ``MARGIN`` faster; when one did, the choices are
timed once more (their best time counts), so that a slow moment during their first timing cannot decide
alone. Four forwards at most. ``patch`` then does not end measurably slower than its own all-dense,
SDPA form, which is what packing alone gives.
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
    from bsbert.models import max_seq_len
    from bsbert.verify import example_inputs

    cfg = getattr(model, "config", None)
    if not getattr(cfg, "vocab_size", None):
        return "the model's config has no vocab_size to generate inputs from"
    batch, s = measure_shape(tokens, seq)
    limit = max_seq_len(model)  # what the position table embeds (RoBERTa's offset included): keep the tokens
    if limit and s > limit:
        batch, s = max(1, batch * s // limit), limit
    return example_inputs(model, batch, s, padded=False)


def _time(model, inputs: dict, device) -> float:
    from bsbert.timing import best_of_interleaved

    return 1e3 * best_of_interleaved([lambda: model(**inputs)], rounds=ROUNDS, device=device)[0]


SDPA = "torch-sdpa"


def sdpa_plan(plan: Plan) -> Plan | None:
    """A copy of ``plan`` with torch SDPA as the attention of every layer with kept heads; None if every
    such layer already has it."""
    out, changed = copy.deepcopy(plan), False
    for lp in out.layers:
        if lp.kept_heads and lp.attention_backend != SDPA:
            lp.attention_reason = (f"model check: torch SDPA ran the forward faster than the measured choice "
                                   f"({lp.attention_backend})")
            lp.attention_backend = SDPA
            changed = True
    return out if changed else None


def run(model, repatch, tokens: int, seq: int | None, attention_forced: bool = False) -> None:
    """``repatch(plan)`` unpatches ``model`` and patches it again from a copy of ``plan``'s recorded
    backends, returning the model's new plan. Times the forward with the choices, then (see the module's
    docstring) with SDPA attention and with dense linears; leaves the fastest variant in place (a variant
    must beat the best so far by ``MARGIN``) and its plan's ``model_check`` filled in."""
    plan: Plan = model.bsbert_plan
    param = next(model.parameters())
    sdpa = None if attention_forced else sdpa_plan(plan)
    if sdpa is None and dense_plan(plan, param.device, param.dtype) is None:
        plan.model_check = {"checked": False, "reason": "not needed: no linear is block-sparse and every attention with kept heads is "
                            + ("forced" if attention_forced else "torch SDPA")}
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
    times = {"chosen": chosen_ms}
    plans = {"chosen": plan}
    in_place = "chosen"
    # repatch works on copies: `plan` (the choices, with their own reasons) and the variants stay as they are
    for name in ("sdpa", "dense", "again"):
        best = kept(times)
        if name == "sdpa":
            cand = sdpa
        elif name == "dense":
            cand = dense_plan(plans[best], param.device, param.dtype)
            name = "dense+sdpa" if best == "sdpa" else "dense"
        else:  # "again": the choices once more, only if a variant beat them
            cand = plan if best != "chosen" else None
        if cand is None:
            continue
        try:
            repatch(cand)
            in_place = "chosen" if name == "again" else name
            ms = _time(model, inputs, param.device)
        except Exception as exc:  # a variant failed: the choices go back in, the plan says why
            _restore_reasons(repatch(plan), plan)
            model.bsbert_plan.model_check = {"checked": False, "reason": f"not run: the {VARIANTS[name]} variant "
                                             f"failed ({exc})", "times_ms": times, "shape": shape}
            return
        if name == "again":
            times["chosen"] = min(times["chosen"], ms)
        else:
            times[name], plans[name] = ms, cand
    best = kept(times)
    best_plan = plans[best]
    final = model.bsbert_plan if in_place == best else repatch(best_plan)
    _restore_reasons(final, best_plan)
    timed = ", ".join(f"{VARIANTS[k]} {v:.2f} ms" for k, v in times.items())
    what = f"forward at B={shape[0]} S={shape[1]}: {timed} -> kept {VARIANTS[best]}"
    final.model_check = {"checked": True, "reason": what, "times_ms": times, "kept": best, "shape": shape,
                         "chosen_ms": times["chosen"], "dense_ms": times.get("dense", times.get("dense+sdpa"))}
    if best != "chosen":
        warnings.warn(f"bsbert.patch: the measured backend choices made the whole forward slower than "
                      f"{VARIANTS[best]} ({what}); see model.bsbert_plan.model_check", RuntimeWarning, stacklevel=3)


# what each variant the check times is, as the plan's reason says it
VARIANTS = {"chosen": "the measured choices", "sdpa": "torch SDPA attention", "dense": "dense linears",
            "dense+sdpa": "dense linears with torch SDPA attention", "again": "the measured choices (again)"}


def kept(times: dict) -> str:
    """The variant to keep from ``times`` (ms, in the order timed, "chosen" first): each later variant
    replaces the best so far only when at least ``MARGIN`` faster than it."""
    best = "chosen"
    for name, ms in times.items():
        if ms < (1 - MARGIN) * times[best]:
            best = name
    return best


def _restore_reasons(final: Plan, chosen: Plan) -> None:
    """Re-patching from a plan marks each reason 'plan: ...'; the check re-patched from plans it made
    itself, so their own reasons (what was measured, or the check's) stand."""
    for lp, src in zip(final.layers, chosen.layers):
        lp.attention_reason = src.attention_reason
        for name, lin in lp.linears.items():
            lin.reason = src.linears[name].reason
