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
