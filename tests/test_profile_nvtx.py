import torch

import bsbert
from bsbert import nvtx
from tests.helpers import inputs, tiny_pruned


def test_ranges_named_per_layer_and_removed_after():
    model = tiny_pruned()
    bsbert.patch(model, select="heuristic", progress=False)
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), nvtx.ranges(model, use_nvtx=False), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**inputs())
    names = {e.key for e in prof.key_averages()}
    # (an output projection on cpu-bsr runs inside its +add_norm range as one fused op: no range of its own)
    for expected in ("bsbert/layer0/PrunedSelfAttention", "bsbert/layer0/qkv", "bsbert/layer0/attn_out+add_norm",
                     "bsbert/layer0/intermediate", "bsbert/layer0/ffn_out+add_norm"):
        assert expected in names, sorted(n for n in names if n.startswith("bsbert"))
    # zero cost when off: no hooks remain
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_profile_cli_cpu_trace(tmp_path):
    from bsbert.profile import main

    trace = tmp_path / "t.json"
    assert main(["--small", "--seq", "16", "--steps", "1", "--warmup", "1", "--device", "cpu",
                 "--trace", str(trace)]) == 0
    assert trace.exists() and "bsbert/layer1" in trace.read_text()


def test_model_deep_copies_after_cpu_ranges():
    # the pre-hook's torch.profiler.record_function stayed on each module after the forward: deepcopy then
    # failed ("Tried to deepcopy object ... _RecordFunction")
    import copy

    model = tiny_pruned()
    bsbert.patch(model, select="heuristic", progress=False)
    with torch.inference_mode(), nvtx.ranges(model, use_nvtx=False):
        model(**inputs())
    assert not any("_bsbert_rf" in vars(m) for m in model.modules())
    copy.deepcopy(model)


def test_env_ranges_plan_does_not_claim_the_one_op_encoder(monkeypatch):
    # BSBERT_NVTX=1's permanent hooks send every call down the per-layer path; the plan said the one-op
    # encoder ran
    monkeypatch.setenv("BSBERT_NVTX", "1")
    model = tiny_pruned(heads=(2, 3, 4), ffn=(100, 37, 64))
    bsbert.patch(model, select="heuristic", progress=False, attention="cpu")
    plan = model.bsbert_plan
    assert not plan.fused_encoder and "BSBERT_NVTX=1" in plan.fused_encoder_reason
    assert "one C++ op" not in plan.table()
