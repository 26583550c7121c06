"""patch(select='plan') (re-patch from a plan's recorded backends) and patch(check_model=...) (the whole
forward with the per-linear choices vs dense linears, keep the faster; bsbert.model_check)."""
import copy
import warnings

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
    t = mc["times_ms"]
    assert set(t) in ({"chosen", "sdpa", "dense"}, {"chosen", "sdpa", "dense+sdpa"}) and all(v > 0 for v in t.values())
    assert mc["chosen_ms"] == t["chosen"] and mc["dense_ms"] == t.get("dense", t.get("dense+sdpa"))
    # the kept variant is the margin rule applied in order over the final times: sdpa against the choices, then
    # dense against the best. (Which dense variant was timed followed the best at that moment; a re-timing of
    # the choices may since have lowered their time, so it is read from the times, not re-derived.)
    dense = "dense+sdpa" if "dense+sdpa" in t else "dense"
    best = "chosen"
    for name in ("sdpa", dense):
        if t[name] < (1 - model_check.MARGIN) * t[best]:
            best = name
    assert mc["kept"] == best
    assert "the measured choices" in model.bsbert_plan.table(32)
    assert rel_err(ref, _run(model, inp)) <= TOL_FP32


def _check_with_times(model, times, **kw):
    """patch with check_model=True, the check's timer returning ``times`` in order (chosen, sdpa, dense)."""
    it = iter(times)
    mp = pytest.MonkeyPatch()
    mp.setattr(model_check, "_time", lambda *a: next(it))
    try:
        bsbert.patch(model, select="heuristic", check_model=True, progress=False, tokens=32, **kw)
    finally:
        mp.undo()
    assert next(it, None) is None, "the check timed fewer forwards than expected"


# times in the order the check takes them (the choices, SDPA attention, dense linears with the attention
# kept so far, and the choices once more when a variant won) -> the variant kept
OUTCOMES = {
    "chosen": ([5.0, 10.0, 10.0], "chosen"),
    "dense": ([10.0, 10.0, 5.0, 10.0], "dense"),
    "sdpa": ([10.0, 5.0, 10.0, 10.0], "sdpa"),
    "dense+sdpa": ([10.0, 5.0, 2.0, 10.0], "dense+sdpa"),
    "within the margin": ([10.0, 9.8, 9.8], "chosen"),
    # the choices' first timing was a slow moment: timed again, they win
    "chosen again": ([10.0, 10.0, 8.0, 7.9], "chosen"),
    # timed again, the choices are faster than at first but SDPA still beats them by the margin
    "sdpa confirmed": ([10.0, 6.5, 6.5, 7.1], "sdpa"),
}


@pytest.mark.parametrize("case", sorted(OUTCOMES))
def test_check_model_outcomes(case):
    """The timer is replaced so that one variant clearly wins: the model ends with that variant's
    backends, its plan says why, and its outputs still match the masked dense model."""
    times, kept = OUTCOMES[case]
    model = _seed_like()
    inp = inputs(batch=2, seq=23, pad_from=9)
    ref = _run(model, inp)
    bsbert.patch(model, select="heuristic", progress=False, tokens=32)  # what the choices are
    chosen = copy.deepcopy(model.bsbert_plan)
    assert any(lp.kept_heads and lp.attention_backend != "torch-sdpa" for lp in chosen.layers)
    bsbert.unpatch(model)
    if kept == "chosen":
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            _check_with_times(model, times)
    else:
        with pytest.warns(RuntimeWarning, match="slower than " + model_check.VARIANTS[kept]):
            _check_with_times(model, times)
    plan = model.bsbert_plan
    assert plan.model_check["kept"] == kept
    dense_name = "dense+sdpa" if times[1] < (1 - model_check.MARGIN) * times[0] else "dense"
    expect = dict(zip(["chosen", "sdpa", dense_name], times))
    if len(times) == 4:
        expect["chosen"] = min(times[0], times[3])
    assert plan.model_check["times_ms"] == expect
    assert plan.model_check["chosen_ms"] == expect["chosen"]
    for lp, lc in zip(plan.layers, chosen.layers):
        if "sdpa" in kept and lc.kept_heads:
            assert lp.attention_backend == "torch-sdpa" and lp.attention_reason.startswith("model check:")
        else:
            assert lp.attention_backend == lc.attention_backend and lp.attention_reason == lc.attention_reason
        for name, lin in lp.linears.items():
            was = lc.linears[name]
            if kept.startswith("dense") and was.format == "bsr":
                assert lin.format == "dense" and lin.backend in ("onednn-dense", "torch-dense")
                assert lin.reason.startswith("model check:")
            else:
                assert (lin.backend, lin.block, lin.reason) == (was.backend, was.block, was.reason)
    assert rel_err(ref, _run(model, inp)) <= TOL_FP32
    bsbert.unpatch(model)  # and the originals are still there
    assert rel_err(ref, _run(model, inp)) == 0


def test_check_model_with_forced_attention_times_linears_only():
    model = _seed_like()
    with pytest.warns(RuntimeWarning, match="slower than dense linears"):
        _check_with_times(model, [10.0, 5.0, 10.0], attention="cpu")
    plan = model.bsbert_plan
    assert plan.model_check["times_ms"] == {"chosen": 10.0, "dense": 5.0}  # (the choices timed twice)
    assert all(lp.attention_backend == "cpu" for lp in plan.layers if lp.kept_heads)


@pytest.mark.parametrize("failing", [2, 3])
def test_check_model_failing_variant_restores_the_choices(monkeypatch, failing):
    """A variant whose re-patch or forward fails (the 2nd timing: SDPA attention, the 3rd: dense linears)
    puts the measured choices back and says which variant failed."""
    model = _seed_like()
    calls = []

    def fake_time(*a):
        calls.append(1)
        if len(calls) == failing:
            raise RuntimeError("boom")
        return 1.0

    monkeypatch.setattr(model_check, "_time", fake_time)
    bsbert.patch(model, select="heuristic", check_model=True, progress=False, tokens=32)
    plan = model.bsbert_plan
    assert bsbert.is_patched(model) and plan.model_check["checked"] is False
    what = "torch SDPA attention" if failing == 2 else "dense linears"
    assert f"the {what} variant failed (boom)" in plan.model_check["reason"]
    assert any(lin.format == "bsr" for lp in plan.layers for lin in lp.linears.values())
    assert all(lp.attention_backend != "torch-sdpa" for lp in plan.layers if lp.kept_heads)
    assert not any(lin.reason.startswith("plan: ") for lp in plan.layers for lin in lp.linears.values())
    assert not any((lp.attention_reason or "").startswith("plan: ") for lp in plan.layers)


@pytest.mark.parametrize("attention", ["torch-sdpa", "cpu"])
def test_model_check_not_needed_when_nothing_could_change(attention):
    """Dense linears everywhere and SDPA (or a forced attention): nothing to compare, no forward timed."""
    model = _seed_like()
    bsbert.patch(model, format="dense", attention=attention, progress=False, tokens=32)

    def no_repatch(plan):
        raise AssertionError("the check re-patched a model with nothing to change")

    model_check.run(model, no_repatch, 32, None, attention_forced=attention != "torch-sdpa")
    why = "forced" if attention != "torch-sdpa" else "torch SDPA"
    assert model.bsbert_plan.model_check == {
        "checked": False,
        "reason": f"not needed: no linear is block-sparse and every attention with kept heads is {why}"}
    # the same plan with its attention not forced has a variant to time: SDPA
    if attention == "cpu":
        assert model_check.sdpa_plan(model.bsbert_plan) is not None
    assert model_check.dense_plan(model.bsbert_plan, "cpu", torch.float32) is None


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
        assert mc["shape"] == [4, 64] and mc["kept"] in model_check.VARIANTS
    assert rel_err(ref, _run(model, inp)) <= 2e-2


def test_forward_inputs_fit_a_roberta_position_table():
    # the cap took max_position_embeddings (66) while the table embeds 64 positions after RoBERTa's padding
    # index: example_inputs then cut the rows to 64 but the batch had been sized for 66 (fewer tokens timed)
    import transformers as tf

    cfg = tf.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=66, pad_token_id=1)
    inp = model_check.forward_inputs(tf.RobertaModel(cfg), tokens=256, seq=128)
    assert tuple(inp["input_ids"].shape) == (4, 64)
