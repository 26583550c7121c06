"""End to end: dense BERT-large (torch eager) vs the seed-like model packed-only vs fully patched.

Per (seq, dtype) group, benchmarks/conftest.py prints the ratios measured in this run (patched vs dense,
patched vs packed, patched over its FLOP bound) and adds them to the saved JSON. The bound's denominator
is the best dense GEMM rate at a BERT layer's shapes, probed once per dtype in this session (as
`bsbert bench` does; fewer probe rounds in the SMALL run to keep CI short). Each run's extra_info says the
model depth and threads it ran with (and the ratio table shows them). Before timing, each patched / packed /
other-engine case checks its outputs, untimed, against the unpatched model's (bsbert verify's tolerance); the
dense model is torch eager itself, and is only checked to give finite outputs.
"""
import inspect

import pytest
import torch

import bsbert
from benchmarks.conftest import SMALL, bench_inputs, check_outputs, run_info
from bsbert.bench import run_bench
from bsbert.timing import bert_dense_shapes, dense_gemm_gflops, time_fn

SEQS = [128] if SMALL else [128, 384]
# bf16 is the other CPU dtype bsbert supports; SMALL keeps it on the 2-layer model, where it costs seconds
DTYPES = ["float32", "bfloat16"]
# the other engines stay fp32-only in SMALL: their bf16 runs added ~10 s to CI on the shared 2-core VM
ENGINE_DTYPES = ["float32"] if SMALL else DTYPES
ROUNDS = 2 if SMALL else 3
# The first forwards after `bsbert.patch` run slower than the steady state (scripts/after_patch_transient.py):
# every variant is first run for at least as long as `bsbert bench` warms up by default.
WARMUP_S = inspect.signature(run_bench).parameters["warmup_s"].default
# dense_gemm_gflops' default 30 interleaved rounds take ~12 s per dtype on 2 cores; 8 took ~3.5 s and
# found the same shape's rate within a few % there, enough for a smoke run
PROBE_ROUNDS = 8 if SMALL else inspect.signature(dense_gemm_gflops).parameters["rounds"].default

params_seq = pytest.mark.parametrize("seq", SEQS)
params_dtype = pytest.mark.parametrize("dtype", DTYPES)


@pytest.fixture(scope="session")
def dense_gemm_rate():
    """(dtype name, model config) -> dense_gemm_gflops at that model's layer shapes, probed on first use (so
    only for the dtypes whose patched runs were selected) and kept for the session."""
    rates = {}

    def get(dtype, config):
        shapes = bert_dense_shapes(config.hidden_size, config.intermediate_size)
        key = (dtype, tuple(shapes))
        if key not in rates:
            rates[key] = dense_gemm_gflops("cpu", getattr(torch, dtype), shapes=shapes, rounds=PROBE_ROUNDS)
        return rates[key]

    return get


def _bench(benchmark, fn, seq, dtype, variant, model, **info):
    benchmark.group = f"model seq={seq} {dtype}"
    benchmark.extra_info.update(seq=seq, dtype=dtype, variant=variant, warmup_s=WARMUP_S,
                                num_hidden_layers=model.config.num_hidden_layers, **run_info(), **info)
    if not benchmark.disabled:  # --benchmark-disable: one call as a test, nothing to warm up for
        time_fn(fn, repeats=1, warmup=1, warmup_s=WARMUP_S)  # the warm-up `bsbert bench` does; its timing unused
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=0)


@params_seq
@params_dtype
def test_dense_bert_large(benchmark, get_model, record_model_run, seq, dtype):
    model = get_model("dense", getattr(torch, dtype))
    inp = bench_inputs(seq)
    with torch.inference_mode():  # torch eager is the reference itself: nothing to compare it with
        out = model(**inp)
    assert all(torch.isfinite(v).all() for v in out.values() if v.is_floating_point()), "dense model: NaN/Inf"
    _bench(benchmark, lambda: model(**inp), seq, dtype, "dense", model, description="dense torch eager")
    record_model_run()


@params_seq
@params_dtype
@pytest.mark.parametrize("variant", ["packed", "patched"])
def test_seed_like(benchmark, get_model, record_model_run, dense_gemm_rate, seq, dtype, variant):
    model = get_model("seed", getattr(torch, dtype))
    # the bound's rate, probed before patching (not beside it); nothing to bound when nothing is timed
    rate = dense_gemm_rate(dtype, model.config) if variant == "patched" and not benchmark.disabled else None
    which = "remaining" if variant == "patched" else "packed"
    inp = bench_inputs(seq)
    with torch.inference_mode():
        ref = model(**inp)  # the unpatched model: what the packed / patched forward must compute
    bsbert.patch(model, tokens=seq, progress=False, **({"format": "dense"} if variant == "packed" else {}))
    try:
        plan = model.bsbert_plan
        with torch.inference_mode():
            err = check_outputs(ref, model(**inp), inp["attention_mask"], getattr(torch, dtype), variant)
        info = {"gflop": plan.flops(seq, which) / 1e9, "flop_bound_speedup": plan.speedup_bound(seq, which),
                "max_rel_err": err}
        if rate:
            info.update(remaining_flops=plan.flops(seq, "remaining"), dense_gemm_gflops=rate["gflops"],
                        dense_gemm_label=rate["label"], dense_gemm_probe_rounds=PROBE_ROUNDS)
        _bench(benchmark, lambda: model(**inp), seq, dtype, variant, model, **info)
    finally:
        bsbert.unpatch(model)
    record_model_run()


@params_seq
@pytest.mark.parametrize("dtype", ENGINE_DTYPES)
@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_engine_packed(benchmark, get_model, seq, dtype, engine):
    """Another CPU engine on the packing-only model: what bsbert's patched forward is up against
    (`bsbert bench --engines` reports the ratios measured in one run)."""
    from bsbert import engines

    model = get_model("seed", getattr(torch, dtype))
    inp = bench_inputs(seq)
    inp["token_type_ids"] = torch.zeros_like(inp["input_ids"])
    try:
        runner = engines.engine_runner(engine, model, inp, torch.get_num_threads())
    except engines.EngineUnavailable as exc:  # not installed, or not this dtype (onnxruntime has no bf16 GEMM)
        pytest.skip(str(exc))
    with torch.inference_mode():
        ref = model(**inp)
    err = check_outputs(ref, runner.run(), inp["attention_mask"], getattr(torch, dtype), engine)
    _bench(benchmark, runner.run, seq, dtype, f"{engine} packed", model, precision=runner.info["precision"],
           gflop=bsbert.analyze(model).flops(seq, "packed") / 1e9, max_rel_err=err)
