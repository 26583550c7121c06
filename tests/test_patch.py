"""patch(): patched vs masked dense model, exact within fp32 rounding; structure handling; bad input."""
import copy

import pytest
import torch

import bsbert
from bsbert import models
from tests.helpers import inputs, rel_err, skip_unless_backend_fits, tiny_pruned

TOL_FP32 = 1e-4


def _run(model, inp):
    with torch.inference_mode():
        return model(**inp)


@pytest.mark.parametrize("select", ["measure", "heuristic"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_patch_matches_masked_dense(select, attn):
    model = tiny_pruned(attn=attn)
    inp = inputs(batch=3, seq=41, pad_from=17)
    ref = _run(model, inp)
    bsbert.patch(model, select=select, progress=False)
    assert rel_err(ref, _run(model, inp)) <= TOL_FP32


@pytest.mark.parametrize("seq", [1, 2, 63, 128, 512])
def test_patch_sequence_lengths(seq):
    model = tiny_pruned(seed=seq)
    inps = [inputs(batch=2, seq=seq, seed=seq)]
    if seq > 2:
        inps.append(inputs(batch=2, seq=seq, pad_from=seq // 2, seed=seq))
    refs = [_run(model, i) for i in inps]
    bsbert.patch(model, select="heuristic", progress=False)
    for i, r in zip(inps, refs):
        assert rel_err(r, _run(model, i)) <= TOL_FP32


@pytest.mark.parametrize("backend", ["torch-dense", "onednn-dense", "cpu-bsr"])
def test_forced_backends(backend):
    skip_unless_backend_fits(backend)
    model = tiny_pruned()
    inp = inputs(pad_from=20)
    ref = _run(model, inp)
    bsbert.patch(model, backend=backend, progress=False)
    assert rel_err(ref, _run(model, inp)) <= TOL_FP32
    for lp in model.bsbert_plan.layers:
        for lin in lp.linears.values():
            assert lin.backend in (backend, "bias-only")


def test_folding_is_needed_and_done():
    """Dead heads with live output columns and dead neurons with live output columns add constants
    that must be folded: dropping them without folding would be visibly wrong."""
    model = tiny_pruned(dead_bias_units=True)
    plan = bsbert.analyze(model)
    assert any(lp.folded_heads for lp in plan.layers)
    assert any(lp.folded_neurons for lp in plan.layers)
    inp = inputs()
    ref = _run(model, inp)
    bsbert.patch(model, select="heuristic", progress=False)
    assert rel_err(ref, _run(model, inp)) <= TOL_FP32

def test_without_folding_result_is_wrong(monkeypatch):
    """Guards the test above: with folding switched off the same comparison fails."""
    import bsbert.patching as P

    model = tiny_pruned(dead_bias_units=True)
    inp = inputs()
    ref = _run(model, inp)
    monkeypatch.setattr(P, "fold_dead_heads", lambda lins, lp: P._bias(lins["attn_out"]).double())
    monkeypatch.setattr(P, "fold_dead_neurons", lambda lins, act: P._bias(lins["ffn_out"]).double())
    bsbert.patch(model, select="heuristic", progress=False)
    assert rel_err(ref, _run(model, inp)) > 1e-3


def test_every_head_and_every_neuron_removed():
    model = tiny_pruned(heads=(0, 0), ffn=(0, 0))
    inp = inputs(pad_from=5)
    ref = _run(model, inp)
    bsbert.patch(model, progress=False)
    assert rel_err(ref, _run(model, inp)) <= TOL_FP32
    assert all(lin.backend == "bias-only" for lp in model.bsbert_plan.layers for lin in lp.linears.values())


@pytest.mark.parametrize("task", ["cls", "base"])
def test_other_heads(task):
    model = tiny_pruned(task=task)
    inp = inputs(pad_from=9)
    ref = _run(model, inp)
    bsbert.patch(model, progress=False)
    assert rel_err(ref, _run(model, inp)) <= TOL_FP32


def test_unpatch_restores_and_print_shows_swaps():
    model = tiny_pruned()
    before = repr(model)
    inp = inputs()
    ref = _run(model, inp)
    bsbert.patch(model, progress=False)
    text = repr(model)
    assert "PrunedSelfAttention" in text and "SparseLinear" in text and "backend=" in text
    bsbert.unpatch(model)
    assert repr(model) == before
    assert torch.equal(bsbert_logits := _run(model, inp)["start_logits"], ref["start_logits"])
    assert bsbert_logits is not None


def test_no_pruning_is_patched_and_exact():
    model = models.build_model(tiny_pruned.__globals__["tiny_config"](layers=2), seed=3)
    plan = bsbert.analyze(model)
    assert plan.summary()["linear_density"] > 0.99
    inp = inputs()
    ref = _run(model, inp)
    bsbert.patch(model, progress=False)
    assert rel_err(ref, _run(model, inp)) <= TOL_FP32


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_within_2x_dense_error(dtype):
    model = tiny_pruned()
    inp = inputs(pad_from=20)
    ref64 = _run(copy.deepcopy(model).double(), inp)
    low = model.to(dtype)
    dense_low = _run(low, inp)
    bsbert.patch(low, progress=False)
    patched_low = _run(low, inp)
    err_dense = rel_err(ref64, dense_low)
    err_patched = rel_err(ref64, patched_low)
    assert err_patched <= 2 * err_dense + 1e-3, (err_patched, err_dense)


# ---- bad input: clear errors, model untouched ------------------------------------------------------

def test_not_bert():
    with pytest.raises(bsbert.UnsupportedModelError, match="not supported"):
        bsbert.patch(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(bsbert.UnsupportedModelError, match="torch.nn.Module"):
        bsbert.analyze("bert")


def test_already_patched_and_not_patched():
    model = tiny_pruned()
    with pytest.raises(bsbert.NotPatchedError):
        bsbert.unpatch(model)
    bsbert.patch(model, progress=False)
    with pytest.raises(bsbert.AlreadyPatchedError, match="already patched"):
        bsbert.patch(model)


def test_nan_weights_leave_model_untouched():
    model = tiny_pruned()
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.weight[3, 3] = float("nan")
    before = repr(model)
    with pytest.raises(bsbert.UnsupportedModelError, match="NaN"):
        bsbert.patch(model)
    assert repr(model) == before and not bsbert.is_patched(model)


def test_meta_weights():
    with torch.device("meta"):
        model = models.build_model(tiny_pruned.__globals__["tiny_config"](layers=1), random_biases=False)
    with pytest.raises(bsbert.UnsupportedModelError, match="meta"):
        bsbert.patch(model)


def test_failure_midway_leaves_model_unpatched(monkeypatch):
    """A backend failing on the last layer must not leave earlier layers swapped."""
    import bsbert.patching as P

    model = tiny_pruned()
    before = repr(model)
    real = P._build_layer
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kernel failure")
        return real(*a, **k)

    monkeypatch.setattr(P, "_build_layer", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        bsbert.patch(model, progress=False)
    assert repr(model) == before and not bsbert.is_patched(model)


def test_decoder_config_refused():
    model = models.build_model(tiny_pruned.__globals__["tiny_config"](layers=1), task="base")
    model.config.is_decoder = True
    with pytest.raises(bsbert.UnsupportedModelError, match="decoder"):
        bsbert.patch(model)


def test_unknown_backend_and_impossible_backend():
    model = tiny_pruned()
    with pytest.raises(ValueError, match="unknown backend"):
        bsbert.patch(model, backend="nope", progress=False)
    with pytest.raises(ValueError, match="no linear backend fits"):
        bsbert.patch(model, backend="cuda-bsr", progress=False)
    assert not bsbert.is_patched(model)


def test_select_modes_are_checked_before_anything_changes():
    """An unknown select, and 'measure-gpu' (CUDA graphs) on a CPU model, are clear errors; the model is
    left as it was."""
    model = tiny_pruned()
    for select, match in (("fast", "select must be one of"), ("measure-gpu", "needs a CUDA model")):
        with pytest.raises(ValueError, match=match):
            bsbert.patch(model, select=select, progress=False)
        assert not bsbert.is_patched(model)


def test_attention_is_measured_at_the_sequence_shape():
    """tokens = batch x seq rows: the attention candidates are timed as tokens // seq sequences of seq (its cost
    is quadratic in the sequence, so 4096 rows as one sequence would rank kernels for a shape no forward
    has); without seq, one sequence of min(tokens, 512). A bad seq is an error before anything changes."""
    from bsbert.ops.attention_backends import measure_shape

    assert measure_shape(4096, 128) == (32, 128)
    assert measure_shape(384, None) == (1, 384)
    assert measure_shape(4096, None) == (8, 512)
    model = tiny_pruned()
    with pytest.raises(ValueError, match="seq must be >= 1"):
        bsbert.patch(model, seq=0, progress=False)
    for tokens in (0, -5, 2.5):  # (0 divided by zero, -5 reached torch as a negative size, or passed)
        for select in ("measure", "heuristic"):
            with pytest.raises(ValueError, match="tokens must be an int >= 1"):
                bsbert.patch(model, tokens=tokens, select=select, progress=False)
    assert not bsbert.is_patched(model)
    bsbert.patch(model, tokens=96, seq=32, progress=False)
    measured = [lp.attention_reason for lp in model.bsbert_plan.layers if "measured" in lp.attention_reason]
    assert measured and all("B=3 S=32" in r for r in measured), measured


@pytest.mark.cuda
def test_measure_gpu_ranks_by_cuda_graph_time():
    """select='measure-gpu' on CUDA: every choice was timed from CUDA-graph replays (the reason says so) and
    the patched model still matches the masked dense one."""
    model = tiny_pruned().cuda().half()
    inp = {k: v.cuda() for k, v in inputs(batch=2, seq=64, pad_from=40).items()}
    ref = _run(model, inp)
    bsbert.patch(model, select="measure-gpu", tokens=128, progress=False)
    reasons = [lin.reason for lp in model.bsbert_plan.layers for lin in lp.linears.values() if lin.backend != "bias-only"]
    assert reasons and all("GPU time (CUDA graphs)" in r or "only eligible" in r for r in reasons), reasons
    assert rel_err(ref, _run(model, inp)) <= 2e-2


def test_triton_attention_in_patched_model_interpreter():
    """The Triton attention kernel inside the patched model (CPU, through the interpreter)."""
    import os

    from bsbert.ops.attention_backends import ATTENTION_BACKENDS

    reasons = ATTENTION_BACKENDS["triton"].not_supported_reasons(torch.device("cpu"), torch.float32, 32)
    if reasons or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(f"triton attention not usable here: {reasons}")
    model = tiny_pruned(heads=(2, 4), ffn=(30, 20))
    inp = inputs(batch=2, seq=21, pad_from=9)
    ref = _run(model, inp)
    bsbert.patch(model, attention="triton", select="heuristic", progress=False)
    assert all(lp.attention_backend == "triton" for lp in model.bsbert_plan.layers)
    assert "attention=triton" in repr(model)
    assert rel_err(ref, _run(model, inp)) <= TOL_FP32


def test_interpreted_triton_attention_only_when_forced(monkeypatch):
    """On cpu the interpreter (TRITON_INTERPRET=1) runs Triton attention only when forced: an unforced
    patch neither picks nor times it (timing it cost minutes per patch) and says why in its reason."""
    import bsbert.ops.dispatch as dispatch
    from bsbert.ops.attention_backends import ATTENTION_BACKENDS, choose_attention

    if ATTENTION_BACKENDS["triton"].not_supported_reasons(torch.device("cpu"), torch.float32, 32):
        pytest.skip("triton attention not usable on cpu here")
    timed = []
    real = dispatch.rank_by_time

    def spy(fns, *args, **kwargs):
        timed.append(sorted(fns))
        return real(fns, *args, **kwargs)

    monkeypatch.setattr(dispatch, "rank_by_time", spy)
    be, _ = choose_attention("cpu", torch.float32, 2, 32, tokens=16)
    assert be.name != "triton" and timed and all("triton" not in names for names in timed), timed
    be, reason = choose_attention("cpu", torch.float32, 2, 32, tokens=16, select="heuristic")
    assert be.name != "triton" and "triton: on cpu Triton runs in its interpreter" in reason, reason
    be, reason = choose_attention("cpu", torch.float32, 2, 32, tokens=16, backend="triton")
    assert be.name == "triton" and reason == "forced"


def test_key_padding_mask_refuses_non_padding_masks():
    from bsbert.ops.attention_backends import key_padding_mask

    m = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    assert key_padding_mask(m, 2, 4) is None
    m[1, 0, :, 3] = False
    assert key_padding_mask(m, 2, 4).tolist() == [[True] * 4, [True, True, True, False]]
    m[0, 0, 1, 2] = False  # a per-query mask
    with pytest.raises(ValueError, match="not a padding mask"):
        key_padding_mask(m, 2, 4)
    additive = torch.zeros(1, 1, 1, 3)
    additive[..., 2] = torch.finfo(torch.float32).min
    assert key_padding_mask(additive, 1, 3).tolist() == [[True, True, False]]
    additive[..., 1] = -1e4  # BERT's classic masking value: masks as finfo.min does
    assert key_padding_mask(additive, 1, 3).tolist() == [[True, False, False]]
    for soft in (-2.0, -9999.0, 0.5, float("nan")):  # a bias, not padding: refused, never ignored
        additive[..., 1] = soft
        with pytest.raises(ValueError, match="not a padding mask"):
            key_padding_mask(additive, 1, 3)


@pytest.mark.parametrize("attention", ["cpu", "torch-sdpa"])
def test_classic_additive_mask_masks(attention):
    # A 4-D additive mask with -10000 at the padded keys (BERT's classic value) gives the masked model's
    # output, not the unmasked one (the kernels once read only finfo.min as masked).
    model = tiny_pruned(heads=(2, 4), ffn=(30, 20))
    inp = inputs(batch=2, seq=19, pad_from=11)
    ref = _run(model, inp)
    keep = inp["attention_mask"].bool()
    additive = torch.zeros(2, 1, 1, 19).masked_fill(~keep[:, None, None, :], -1e4)
    bsbert.patch(model, attention=attention, select="heuristic", progress=False)
    got = _run(model, {"input_ids": inp["input_ids"], "attention_mask": additive})
    assert rel_err(ref, got) <= TOL_FP32
    unmasked = _run(model, {"input_ids": inp["input_ids"]})
    assert rel_err(unmasked, got) > 10 * TOL_FP32  # (the padding does change the outputs here)


@pytest.mark.parametrize("unpad", [False, True])
def test_output_attentions_refused(unpad):
    # transformers records attention maps from its own attention classes: on a patched model it would
    # return none, silently. The patched attention says why instead.
    model = tiny_pruned(heads=(2, 4), ffn=(30, 20))
    inp = inputs(batch=2, seq=9, pad_from=5)
    bsbert.patch(model, select="heuristic", progress=False, unpad=unpad)
    with pytest.raises(bsbert.BsbertError, match="output_attentions"):
        _run(model, {**inp, "output_attentions": True})
    assert _run(model, inp).start_logits.shape == (2, 9)  # and plain calls still run


def test_backward_through_patched_model_raises():
    # bsbert's ops have no derivatives: a backward pass that reaches one raises (torch only warned and
    # left every encoder weight without a gradient before the ops had an Autograd kernel), and says the model is
    # inference-only (torch's "derivative for bsbert::... is not implemented" named an internal op)
    model = tiny_pruned(heads=(2, 4), ffn=(30, 20))
    inp = inputs(batch=2, seq=9)
    bsbert.patch(model, select="heuristic", progress=False)
    out = model(**inp)  # grad mode on: the forward itself runs
    with pytest.raises(bsbert.BsbertError, match=r"bsbert::\w+ has no backward: .*inference-only"):
        out.start_logits.sum().backward()


@pytest.mark.parametrize("select", ["plan", "heuristic"])
@pytest.mark.parametrize("other", ["other structure", "same counts, other seed"])
def test_a_plan_for_another_model_is_refused(select, other):
    """A plan lends its backends; the kept heads and neurons must be the model's own (another model's plan
    packed the wrong rows: rel err 2e-2, verify FAILed)."""
    donor = tiny_pruned(heads=(2, 3, 4), ffn=(100, 37, 60))
    bsbert.patch(donor, select="heuristic", progress=False)
    model = (tiny_pruned(heads=(4, 1, 2), ffn=(10, 37, 60)) if other == "other structure"
             else tiny_pruned(heads=(2, 3, 4), ffn=(100, 37, 60), seed=5))
    before = repr(model)
    with pytest.raises(bsbert.BsbertError, match=r"plan passed to patch does not describe this model: layer 0 "
                                                 r"kept_heads is \[.*\] in the plan but \[.*\] in the model"):
        bsbert.patch(model, select=select, plan=donor.bsbert_plan, progress=False)
    assert not bsbert.is_patched(model) and repr(model) == before


def test_a_plan_is_compared_field_by_field():
    model = tiny_pruned(heads=(2, 3, 4), ffn=(100, 37, 60))
    bsbert.patch(model, select="heuristic", progress=False)
    own = copy.deepcopy(model.bsbert_plan)
    bsbert.unpatch(model)
    edits = {"layer 1 kept_neurons": lambda p: p.layers[1].kept_neurons.pop(),
             "layer 2 folded_heads": lambda p: p.layers[2].folded_heads.append(3),
             "layer 0 ffn_in packed_shape": lambda p: setattr(p.layers[0].linears["ffn_in"], "packed_shape", (99, 128)),
             "the number of layers": lambda p: p.layers.pop()}
    for where, edit in edits.items():
        plan = copy.deepcopy(own)
        edit(plan)
        with pytest.raises(bsbert.BsbertError, match=f"does not describe this model: {where}"):
            bsbert.patch(model, select="plan", plan=plan, progress=False)
        assert not bsbert.is_patched(model)
    # the model's own plan (also as JSON) is taken; the given plan is left as it was
    from bsbert.plan import Plan

    plan = Plan.from_dict(own.to_dict())
    bsbert.patch(model, select="plan", plan=plan, progress=False)
    assert model.bsbert_plan is not plan and model.bsbert_plan.layers[0].kept_heads == own.layers[0].kept_heads
    assert not any((lin.reason or "").startswith("plan: ") for lp in plan.layers for lin in lp.linears.values())


def test_failed_verify_without_originals_leaves_the_model_as_it_was():
    model = tiny_pruned(heads=(2, 3, 4), ffn=(100, 37, 60))
    bsbert.patch(model, select="heuristic", progress=False, keep_original=False, unpad=True)
    inp = inputs(pad_from=20)
    out = _run(model, inp)
    with pytest.raises(bsbert.NotPatchedError, match="verify needs the original modules.*bsbert.load"):
        bsbert.verify(model)
    assert model.bert.encoder._bsbert_unpadded  # not left with the padded encoder forward
    assert torch.equal(_run(model, inp)["start_logits"], out["start_logits"])


def test_heuristic_reason_says_when_the_rules_format_had_no_backend(monkeypatch):
    # with cpu-bsr unusable (no extension) the dense pick's reason read "rule: block density 0.50 < 0.9",
    # as if block-sparse had been chosen, and the ineligible list was dropped
    from bsbert.ops import dispatch, linear_backends

    monkeypatch.setattr(linear_backends.CpuBsr, "not_supported_reasons",
                        lambda self, device, dtype, block: ["C++ extension unavailable: test"])
    w = torch.randn(64, 64)
    choice = dispatch.choose_linear(w, None, False, select="heuristic", block_density=0.5)
    assert choice.format == "dense"
    assert "no bsr backend eligible" in choice.reason and "cpu-bsr@32: C++ extension unavailable" in choice.reason
    choice = dispatch.choose_linear(w, None, False, select="heuristic", block_density=0.95)
    assert choice.format == "dense" and "no dense backend eligible" not in choice.reason
