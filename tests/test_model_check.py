"""patch(select='plan') (re-patch from a plan's recorded backends) and patch(check_model=...) (the whole
forward with the per-linear choices vs dense linears, keep the faster; bsbert.model_check)."""
import copy

import pytest
import torch

import bsbert
from bsbert import model_check, models
from tests.helpers import inputs, rel_err

TOL_FP32 = 1e-4


def _seed_like():
    # hidden 1024 with the seed's in-head zero blocks: select="heuristic" puts the projections on cpu-bsr
    return models.seed_like_model(seed=3, num_hidden_layers=2).eval()


def _run(model, inp):
    with torch.inference_mode():
        return model(**inp)


def _backends(plan):
    return [(lp.index, n, lin.backend, lin.block) for lp in plan.layers for n, lin in lp.linears.items()]


def test_plan_select_reuses_the_recorded_backends():
    model = _seed_like()
    inp = inputs(batch=2, seq=29, pad_from=11)
    ref = _run(model, inp)
    bsbert.patch(model, select="heuristic", progress=False, tokens=64)
    first = _run(model, inp)
    plan = copy.deepcopy(model.bsbert_plan)
    assert any(lin.format == "bsr" for lp in plan.layers for lin in lp.linears.values())
    bsbert.unpatch(model)
    bsbert.patch(model, plan=plan, select="plan", progress=False)
    assert _backends(model.bsbert_plan) == _backends(plan)
    assert all(lin.reason.startswith("plan: ") for lp in model.bsbert_plan.layers for lin in lp.linears.values()
               if lin.backend != "bias-only")
    assert [lp.attention_backend for lp in model.bsbert_plan.layers] == [lp.attention_backend for lp in plan.layers]
    assert model.bsbert_plan is not plan  # the given plan (often another model's own) is left as it was
    assert not any(lin.reason.startswith("plan: ") for lp in plan.layers for lin in lp.linears.values())
    out = _run(model, inp)
    assert torch.equal(out.start_logits, first.start_logits)  # same kernels, same packed weights
    assert rel_err(ref, out) <= TOL_FP32


def test_plan_select_errors_leave_the_model_unchanged():
    model = _seed_like()
    with pytest.raises(ValueError, match="pass plan="):
        bsbert.patch(model, select="plan", progress=False)
    with pytest.raises(ValueError, match="every backend chosen.*layer 0 qkv"):
        bsbert.patch(model, plan=bsbert.analyze(model), select="plan", progress=False)
    assert not bsbert.is_patched(model)
    bsbert.patch(model, select="heuristic", progress=False, tokens=32)
    plan = copy.deepcopy(model.bsbert_plan)
    bsbert.unpatch(model)
    plan.layers[1].linears["ffn_in"].backend = "cuda-bsr"  # recorded on another device
    originals = [type(m).__name__ for m in model.modules()]
    with pytest.raises(ValueError, match="no linear backend fits device=cpu"):
        bsbert.patch(model, plan=plan, select="plan", progress=False)
    assert not bsbert.is_patched(model)
    assert [type(m).__name__ for m in model.modules()] == originals


def test_check_model_argument_errors_and_defaults():
    model = _seed_like()
    with pytest.raises(ValueError, match="check_model must be"):
        bsbert.patch(model, check_model="yes", progress=False)
    with pytest.raises(ValueError, match="backend= is forced"):
        bsbert.patch(model, check_model=True, backend="cpu-bsr", progress=False)
    with pytest.raises(ValueError, match="format= is forced"):
        bsbert.patch(model, check_model=True, format="dense", progress=False)
    assert not bsbert.is_patched(model)
    bsbert.patch(model, select="heuristic", progress=False, tokens=32)  # default on CPU: off, and says so
    mc = model.bsbert_plan.model_check
    assert mc["checked"] is False and "off by default on CPU" in mc["reason"]
    assert "model check: not run" in model.bsbert_plan.table(32)
    bsbert.unpatch(model)
    bsbert.patch(model, format="dense", progress=False, tokens=32)
    assert "format= is forced" in model.bsbert_plan.model_check["reason"]


def test_check_model_runs_and_keeps_the_faster_forward():
    model = _seed_like()
    inp = inputs(batch=1, seq=40)
    ref = _run(model, inp)
    bsbert.patch(model, select="heuristic", check_model=True, progress=False, tokens=64, seq=32)
    mc = model.bsbert_plan.model_check
    assert mc["checked"] and mc["shape"] == [2, 32]
    assert mc["chosen_ms"] > 0 and mc["dense_ms"] > 0
    assert (mc["kept"] == "dense") == (mc["dense_ms"] < (1 - model_check.MARGIN) * mc["chosen_ms"])
    assert "per-linear choices" in model.bsbert_plan.table(32)
    assert rel_err(ref, _run(model, inp)) <= TOL_FP32


@pytest.mark.parametrize("dense_wins", [True, False])
def test_check_model_outcomes(monkeypatch, dense_wins):
    """The timer is replaced so that one variant clearly wins: the model ends with that variant's
    backends, its plan says why, and its outputs still match the masked dense model."""
    model = _seed_like()
    inp = inputs(batch=2, seq=23, pad_from=9)
    ref = _run(model, inp)
    times = iter([10.0, 5.0] if dense_wins else [5.0, 10.0])  # chosen first, then dense
    monkeypatch.setattr(model_check, "_time", lambda *a: next(times))
    bsbert.patch(model, select="heuristic", progress=False, tokens=32)  # what the choices are
    chosen = copy.deepcopy(model.bsbert_plan)
    bsbert.unpatch(model)
    if dense_wins:
        with pytest.warns(RuntimeWarning, match="slower than dense linears"):
            bsbert.patch(model, select="heuristic", check_model=True, progress=False, tokens=32)
    else:
        bsbert.patch(model, select="heuristic", check_model=True, progress=False, tokens=32)
    plan = model.bsbert_plan
    assert plan.model_check["kept"] == ("dense" if dense_wins else "chosen")
    for lp, lc in zip(plan.layers, chosen.layers):
        assert lp.attention_backend == lc.attention_backend and lp.attention_reason == lc.attention_reason
        for name, lin in lp.linears.items():
            was = lc.linears[name]
            if dense_wins and was.format == "bsr":
                assert lin.format == "dense" and lin.backend in ("onednn-dense", "torch-dense")
                assert lin.reason.startswith("model check:")
            else:
                assert (lin.backend, lin.block, lin.reason) == (was.backend, was.block, was.reason)
    assert rel_err(ref, _run(model, inp)) <= TOL_FP32
    bsbert.unpatch(model)  # and the originals are still there
    assert rel_err(ref, _run(model, inp)) == 0


def test_check_model_failing_dense_variant_restores_the_choices(monkeypatch):
    model = _seed_like()
    calls = []

    def fake_time(*a):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return 1.0

    monkeypatch.setattr(model_check, "_time", fake_time)
    bsbert.patch(model, select="heuristic", check_model=True, progress=False, tokens=32)
    plan = model.bsbert_plan
    assert bsbert.is_patched(model) and plan.model_check["checked"] is False
    assert "dense variant failed (boom)" in plan.model_check["reason"]
    assert any(lin.format == "bsr" for lp in plan.layers for lin in lp.linears.values())
    assert not any(lin.reason.startswith("plan: ") for lp in plan.layers for lin in lp.linears.values())


def test_model_check_on_an_all_dense_choice_is_not_needed():
    from tests.helpers import tiny_pruned

    model = tiny_pruned()
    bsbert.patch(model, select="heuristic", check_model=True, progress=False, tokens=32)
    plan = model.bsbert_plan
    if any(lin.format == "bsr" for lp in plan.layers for lin in lp.linears.values()):
        assert plan.model_check["checked"]
    else:
        assert plan.model_check == {"checked": False, "reason": "not needed: no linear is block-sparse"}


def test_plan_round_trips_model_check_and_timings():
    from bsbert.plan import Plan

    model = _seed_like()
    bsbert.patch(model, progress=False, tokens=32, check_model=True)
    d = model.bsbert_plan.to_dict()
    back = Plan.from_dict(d)
    assert back.model_check == model.bsbert_plan.model_check
    lin = back.layers[0].linears["qkv"]
    assert lin.timings_ms and lin.timings_ms == model.bsbert_plan.layers[0].linears["qkv"].timings_ms


def test_load_with_the_saved_plans_backends(tmp_path):
    """bsbert.load(select='plan'): the backends of the saved plan, no measuring; a saved plan without
    backends is refused with the reason."""
    import json

    model = _seed_like()
    inp = inputs(batch=1, seq=19)
    bsbert.patch(model, select="heuristic", progress=False, tokens=32)
    out1 = _run(model, inp)
    bsbert.save(model, str(tmp_path))
    loaded = bsbert.load(str(tmp_path), select="plan")
    assert _backends(loaded.bsbert_plan) == _backends(model.bsbert_plan)
    assert torch.equal(_run(loaded, inp).start_logits, out1.start_logits)
    meta_path = tmp_path / "bsbert.json"
    meta = json.loads(meta_path.read_text())
    meta["plan"]["layers"][1]["linears"]["attn_out"]["backend"] = None
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="layer 1 attn_out"):
        bsbert.load(str(tmp_path), select="plan")


@pytest.mark.cuda
def test_check_model_on_by_default_on_cuda():
    """On a CUDA model with select='measure' the check runs by default (or says why it is not needed),
    and whatever it keeps still matches the masked dense model."""
    model = _seed_like().cuda().half()
    inp = {k: v.cuda() for k, v in inputs(batch=2, seq=64, pad_from=40).items()}
    ref = _run(model, inp)
    bsbert.patch(model, tokens=256, seq=64, progress=False)
    mc = model.bsbert_plan.model_check
    assert mc["checked"] or mc["reason"] == "not needed: no linear is block-sparse", mc
    if mc["checked"]:
        assert mc["shape"] == [4, 64] and mc["kept"] in ("dense", "chosen")
    assert rel_err(ref, _run(model, inp)) <= 2e-2
