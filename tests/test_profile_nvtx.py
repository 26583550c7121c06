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


def test_profile_syncs_the_profiled_gpu_around_the_capture(monkeypatch):
    """`bsbert profile --device cuda:1` synchronised the current GPU (cuda:0) around cudaProfilerStart/Stop:
    cuda:1's queued warm-up could land inside the capture. Mocked CUDA (no GPU needed)."""
    import argparse
    import types

    import bsbert
    from bsbert import bench, models
    from bsbert import profile as prof

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(vocab_size=100)
            self.lin = torch.nn.Linear(2, 2)

        def to(self, *a, **k):
            return self

        def forward(self, **kw):
            return None

    log = []
    cudart = types.SimpleNamespace(cudaProfilerStart=lambda: log.append("start"),
                                   cudaProfilerStop=lambda: log.append("stop"))
    monkeypatch.setattr(models, "seed_like_model", lambda **k: Tiny())
    monkeypatch.setattr(models, "check_seq_len", lambda *a, **k: None)
    monkeypatch.setattr(models, "max_seq_len", lambda m: 512)
    monkeypatch.setattr(bsbert, "patch", lambda *a, **k: None)
    monkeypatch.setattr(bench, "_inputs", lambda b, s, v, d: {"input_ids": torch.zeros(b, s, dtype=torch.long)})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(f"sync {device}"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: log.append(f"set {device}"))
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda s: None)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: None)
    args = argparse.Namespace(device="cuda:1", dtype="float16", seq=8, batch=1, steps=1, warmup=1, model=None,
                              small=True, trace="x")
    prof._run(args)
    assert log[:4] == ["set cuda:1", "sync cuda:1", "start", "sync cuda:1"] and log[4] == "stop", log
