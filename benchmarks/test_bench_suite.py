"""Checks of the benchmark suite itself (not benchmarks: --benchmark-only skips them, as they use no
``benchmark`` fixture). Run: ``pytest benchmarks/test_bench_suite.py``.

The benchmark functions are called directly with ``Untimed``, which stands in for pytest-benchmark's fixture
as ``--benchmark-disable`` runs it (each timed call once, ``stats`` None), on tiny models, so that a wrong
kernel can be shown to fail its benchmark in seconds."""
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import bsbert
from benchmarks import conftest
from bsbert import _ext, models

ROOT = Path(__file__).resolve().parent.parent
needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"no bsbert extension: {_ext.reason_unavailable()}")


class Untimed:
    """pytest-benchmark's fixture as --benchmark-disable runs it: each call once, nothing timed (stats None).
    ``results`` keeps what the timed calls returned."""
    disabled, stats = True, None

    def __init__(self):
        self.extra_info, self.group, self.results = {}, None, []

    def __call__(self, fn, *args, **kwargs):
        self.results.append(fn(*args, **kwargs))
        return self.results[-1]

    def pedantic(self, fn, args=(), kwargs=None, **_):
        return self(fn, *args, **(kwargs or {}))


def tiny_seed_model(dtype=torch.float32):
    """A 2-layer pruned BERT of hidden 128 with BERT's vocabulary (the benches' inputs draw ids up to 30522)."""
    cfg = models.bert_large_config(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
    return models.prune_like_seed(models.build_model(cfg, task="qa"), (2, 4), (100, 37)).to(dtype)


def _halved(real):
    return lambda *args: real(*args) * 0.5  # a wrong answer, as fast as the right one


# --- the environment flags (defect: SMALL=true ran the full suite, FULL and SMALL parsed differently) ---

@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("YES", True), ("0", False), ("no", False),
                                       ("false", False), ("", False), (None, False)])
def test_env_flag_reads_on_and_off_alike(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("BSBERT_BENCH_SMALL", raising=False)
    else:
        monkeypatch.setenv("BSBERT_BENCH_SMALL", value)
    assert conftest.env_flag("BSBERT_BENCH_SMALL") is on


def test_env_flag_rejects_anything_else(monkeypatch):
    monkeypatch.setenv("BSBERT_BENCH_FULL", "maybe")
    with pytest.raises(pytest.UsageError, match="BSBERT_BENCH_FULL='maybe' is not understood"):
        conftest.env_flag("BSBERT_BENCH_FULL")


def _collect(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_model.py", "--collect-only", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


def test_small_true_is_the_small_run_and_a_bad_value_stops_it():
    small = _collect({"BSBERT_BENCH_SMALL": "true"})
    assert small.returncode == 0, small.stdout + small.stderr
    assert "-128]" in small.stdout and "-384]" not in small.stdout, small.stdout  # seq 128 only: the SMALL grid
    bad = _collect({"BSBERT_BENCH_SMALL": "ture"})
    assert bad.returncode == pytest.ExitCode.USAGE_ERROR, bad.stdout + bad.stderr
    assert "BSBERT_BENCH_SMALL='ture' is not understood" in bad.stderr


# --- CPU kernels: each case checks its result; --benchmark-disable; bf16 oneDNN on a widening CPU ---

@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("test", ["test_bsr_linear", "test_dense_flinear", "test_dense_onednn"])
def test_kernel_cases_run_untimed_and_pass_their_check(test, dtype):
    from benchmarks import test_kernels_cpu as K

    b = Untimed()
    try:
        getattr(K, test)(b, (70, 100), 0.25, 16, dtype)
    except pytest.skip.Exception as exc:  # oneDNN without this dtype, and bsbert not widening it
        assert test == "test_dense_onednn" and "oneDNN" in str(exc)
        return
    assert b.extra_info["max_rel_err"] <= 1e-4 if dtype == torch.float32 else 5e-2
    assert "gflops" not in b.extra_info  # nothing was timed: no rate
    assert b.extra_info["threads"] == torch.get_num_threads() and b.extra_info["cpu_isa"] == _ext.load().cpu_isa()
    if test == "test_dense_onednn" and dtype == torch.bfloat16 and _ext.bf16_widened_on_cpu():
        assert b.extra_info["onednn_dtype"] == "float32"  # what bf16 work runs as here


@needs_ext
def test_a_wrong_bsr_linear_fails_its_benchmark(monkeypatch):
    from benchmarks import test_kernels_cpu as K

    monkeypatch.setattr(torch.ops.bsbert, "bsr_linear", _halved(torch.ops.bsbert.bsr_linear))
    with pytest.raises(AssertionError, match="bsr_linear: max rel error"):
        K.test_bsr_linear(Untimed(), (1024, 1024), 0.25, 16, torch.float32)


def test_onednn_without_the_dtype_is_skipped_with_its_reason(monkeypatch):
    from benchmarks import test_kernels_cpu as K

    monkeypatch.setattr(K._ext, "bf16_widened_on_cpu", lambda: False)
    monkeypatch.setattr(K.linear_backends, "_onednn_probe", lambda dtype: f"oneDNN has no {dtype} primitive here")
    with pytest.raises(pytest.skip.Exception, match="oneDNN has no torch.bfloat16 primitive here"):
        K.test_dense_onednn(Untimed(), (70, 100), 0.25, 16, torch.bfloat16)


# --- the fused ops ---

@needs_ext
@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_add_layer_norm_checks_what_it_times(monkeypatch, impl):
    from benchmarks import test_add_layer_norm as A

    A.test_add_layer_norm(Untimed(), (1, 16, 1024), torch.float32, impl)
    if impl == "fused":
        monkeypatch.setattr(torch.ops.bsbert, "add_layer_norm", _halved(torch.ops.bsbert.add_layer_norm))
        with pytest.raises(AssertionError, match="fused: max rel error"):
            A.test_add_layer_norm(Untimed(), (1, 16, 1024), torch.float32, impl)


@needs_ext
@pytest.mark.parametrize("impl", ["fused", "bsr+aln", "onednn+aln"])
def test_output_block_checks_what_it_times(monkeypatch, impl):
    from benchmarks import test_gemm_add_layer_norm as G

    G.test_output_block(Untimed(), (16, 576, 0.64), impl)
    op = {"fused": "bsr_linear_add_layer_norm", "bsr+aln": "bsr_linear", "onednn+aln": "add_layer_norm"}[impl]
    monkeypatch.setattr(torch.ops.bsbert, op, _halved(getattr(torch.ops.bsbert, op)))
    with pytest.raises(AssertionError, match=re.escape(f"{impl}: max rel error")):
        G.test_output_block(Untimed(), (16, 576, 0.64), impl)


# --- per-layer linears ---

@pytest.fixture(scope="module")
def tiny_linears():
    """test_layer_linears' fixture on the tiny model: (0, name) -> (original, patched module)."""
    model = tiny_seed_model()
    layer = model.bert.encoder.layer[0]
    orig = {"ffn_in": layer.intermediate.dense, "ffn_out": layer.output.dense,
            "attn_out": layer.attention.output.dense}
    bsbert.patch(model, tokens=64, progress=False, select="heuristic")
    new = {"ffn_in": layer.intermediate.dense, "ffn_out": layer.output.dense,
           "attn_out": layer.attention.output.dense}
    yield {(0, k): (orig[k], new[k]) for k in orig}
    bsbert.unpatch(model)


@pytest.mark.parametrize("variant", ["dense", "onednn", "patched"])
@pytest.mark.parametrize("name", ["attn_out", "ffn_in", "ffn_out"])
def test_layer_linear_candidates_do_the_same_work(tiny_linears, name, variant):
    from benchmarks import test_layer_linears as L

    b = Untimed()
    try:
        L.test_linear(b, tiny_linears, 0, name, variant)
    except pytest.skip.Exception:
        assert variant == "onednn"
        return
    assert b.extra_info["max_rel_err"] <= 1e-4
    if name == "ffn_in" and tiny_linears[(0, name)][1].gelu:
        # the patched ffn_in fuses its GELU: every candidate's timed result is GELU'd (min GELU is -0.17)
        assert b.extra_info["gelu"] and b.results[-1].min() >= -0.171


def test_a_wrong_patched_linear_fails_its_benchmark(tiny_linears, monkeypatch):
    from benchmarks import test_layer_linears as L
    from bsbert.nn.linear import SparseLinear

    real = SparseLinear.forward
    monkeypatch.setattr(SparseLinear, "forward", lambda self, x: real(self, x) * 0.5)
    with pytest.raises(AssertionError, match="patched ffn_out: max rel error"):
        L.test_linear(Untimed(), tiny_linears, 0, "ffn_out", "patched")


# --- end to end and padding-free ---

def _seed_like(variant, dtype="float32", model=None):
    from benchmarks import test_model as T

    b = Untimed()
    model = model or tiny_seed_model(getattr(torch, dtype))
    T.test_seed_like(b, lambda kind, dt: model, lambda: None, None, 64, dtype, variant)
    return b


@pytest.mark.parametrize("variant", ["packed", "patched"])
def test_model_runs_check_the_unpatched_outputs_and_say_what_ran(variant):
    b = _seed_like(variant)
    info = b.extra_info
    assert info["max_rel_err"] <= 1e-4
    assert info["num_hidden_layers"] == 2 and info["threads"] == torch.get_num_threads()
    assert info["small"] is conftest.SMALL and "cpu_isa" in info


def test_a_wrong_patched_model_fails_its_benchmark(monkeypatch):
    real = bsbert.patch

    def wrong_patch(model, *args, **kwargs):  # patch, then spoil the logits of every forward
        real(model, *args, **kwargs)
        model.qa_outputs.register_forward_hook(lambda mod, inp, out: out * 0.5)
    monkeypatch.setattr(bsbert, "patch", wrong_patch)
    with pytest.raises(AssertionError, match="patched: max rel error"):
        _seed_like("patched")


def test_the_ratio_rows_and_table_name_the_layers_and_threads():
    def run(variant, ms):
        info = {"seq": 128, "dtype": "float32", "variant": variant, "num_hidden_layers": 2, "threads": 1}
        return SimpleNamespace(extra_info=info, stats=SimpleNamespace(median=ms / 1e3))

    (row,) = conftest.model_ratio_rows([run("dense", 4.0), run("patched", 2.0)])
    assert row["layers"] == 2 and row["threads"] == 1 and row["patched_speedup_vs_dense"] == 2.0
    assert {"layers", "threads"} <= {h for h, _, _ in conftest._COLUMNS}


@pytest.mark.parametrize("unpad", [False, True])
def test_length_mix_plans_for_the_tokens_of_its_whole_batch(monkeypatch, unpad):
    from benchmarks import test_unpad as U

    planned, real = [], bsbert.patch

    def recording_patch(model, *args, **kwargs):
        planned.append(kwargs["tokens"])
        return real(model, *args, select="heuristic", **kwargs)
    monkeypatch.setattr(bsbert, "patch", recording_patch)
    b = Untimed()
    U.test_length_mix(b, tiny_seed_model(), unpad)
    _, lengths = U.length_mix()
    # padding-free: the batch's real tokens (its mean length x BATCH, not x 8); padded: every position
    assert planned == [int(lengths.float().mean()) * U.BATCH if unpad else U.BATCH * U.HI]
    assert b.extra_info["max_rel_err"] <= 1e-4
