"""verify(): the patched model against its masked dense original, output by output."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# max |patched - original| / max |original| allowed per dtype. fp32: rounding only. bf16/fp16: both
# models round differently at every layer; these bounds sit well above the observed differences
# (tests check the stricter "within 2x of the dense model's own error vs float64").
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclass
class VerifyReport:
    dtype: str
    tolerance: float
    outputs: dict = field(default_factory=dict)  # name -> {"max_abs": .., "max_rel": ..}

    @property
    def passed(self) -> bool:
        return all(v["max_rel"] <= self.tolerance for v in self.outputs.values())

    def __str__(self) -> str:
        lines = [f"bsbert verify ({self.dtype}, tolerance max_rel <= {self.tolerance:g}): "
                 f"{'PASS' if self.passed else 'FAIL'}"]
        for k, v in self.outputs.items():
            if v.get("problem"):
                lines.append(f"  {k:<20} {v['problem']}  <-- FAIL")
                continue
            lines.append(f"  {k:<20} max_abs {v['max_abs']:.3e}  max_rel {v['max_rel']:.3e}"
                         f"{'' if v['max_rel'] <= self.tolerance else '  <-- exceeds tolerance'}")
        return "\n".join(lines)


def example_inputs(model, batch: int = 2, seq: int = 48, seed: int = 0, padded: bool = True) -> dict:
    """Random token ids; ``padded``: with a padded last row (so masking is exercised). At most as long as the
    position table can embed (``models.max_seq_len``: RoBERTa-style positions start after the padding index):
    verify's 48 tokens overran a model with a 32-row table."""
    from bsbert.models import max_seq_len

    cfg = model.config
    limit = max_seq_len(model)
    if limit is not None:
        seq = max(1, min(seq, limit))
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=g)
    am = torch.ones_like(ids)
    if padded and batch > 1:
        am[-1, seq // 2:] = 0
    return {"input_ids": ids.to(dev), "attention_mask": am.to(dev)}


def _tensors(out, prefix: str = "") -> dict:
    """name -> floating-point tensor, nested outputs flattened: ``hidden_states.3``, ``attentions.0`` (with
    output_hidden_states / output_attentions those are tuples inside the model output; only the top level
    was compared before)."""
    if isinstance(out, torch.Tensor):
        return {prefix or "0": out} if out.is_floating_point() else {}
    if hasattr(out, "items"):
        items = list(out.items())
    elif isinstance(out, (tuple, list)):
        items = list(enumerate(out))
    else:
        return {}
    found = {}
    for k, v in items:
        found.update(_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return found


def compare_outputs(original, patched, attention_mask=None) -> dict:
    """name -> {"max_abs", "max_rel"} for every floating-point output (model outputs or dicts of
    tensors, nested tuples included). max_rel = max |patched - original| / max |original|; inf where
    NaN/Inf appear in one only, and where the patched model's output is missing or of another shape
    (then "problem" says which)."""
    original, patched = _tensors(original), _tensors(patched)
    am = attention_mask
    result = {}
    for k, ref in original.items():
        if k not in patched or tuple(patched[k].shape) != tuple(ref.shape):
            problem = ("missing from the patched model's output" if k not in patched else
                       f"shape {tuple(patched[k].shape)} instead of {tuple(ref.shape)}")
            result[k] = {"max_abs": float("inf"), "max_rel": float("inf"), "problem": problem}
            continue
        out = patched[k].double()
        ref = ref.double()
        finite = torch.isfinite(ref)
        considered = torch.ones_like(finite)
        if am is not None and ref.dim() >= 2 and tuple(ref.shape[:2]) == tuple(am.shape):
            # per-token outputs: padded positions carry no meaning (nothing attends to them, and the
            # padding-free forward leaves them zero); compare real tokens only
            considered = am.bool().reshape(*am.shape, *([1] * (ref.dim() - 2))).expand_as(ref)
        mask = finite & considered
        diff = (out - ref).abs()
        max_abs = float(diff[mask].max()) if mask.any() else 0.0
        scale = float(ref[mask].abs().max()) if mask.any() else 1.0
        nan_mismatch = bool(((torch.isfinite(out) != finite) & considered).any())
        result[k] = {"max_abs": max_abs, "max_rel": float("inf") if nan_mismatch else max_abs / max(scale, 1e-30)}
    return result


@torch.inference_mode()
def verify(model, inputs: dict | None = None, tolerance: float | None = None) -> VerifyReport:
    """Run ``model`` (patched by bsbert) and its masked dense original on ``inputs`` (generated when
    None) and report max abs/rel error per output. The model is left as it was, but while verify runs it holds
    its original modules: do not call it on a model other threads are running (their forwards would fail)."""
    from bsbert.errors import NotPatchedError
    from bsbert.patching import is_patched, swap_modules

    if not is_patched(model):
        raise NotPatchedError("verify needs a model patched by bsbert.patch")
    inputs = inputs if inputs is not None else example_inputs(model)
    dtype = next(model.parameters()).dtype
    tol = tolerance if tolerance is not None else TOLERANCE.get(dtype, 1e-2)
    patched = model(**inputs)
    swap_modules(model, "original")
    try:
        original = model(**inputs)
    finally:
        swap_modules(model, "patched")
    report = VerifyReport(str(dtype).replace("torch.", ""), tol)
    report.outputs = compare_outputs(original, patched, inputs.get("attention_mask"))
    return report
