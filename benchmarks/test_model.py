"""End to end: dense BERT-large (torch eager) vs the seed-like model packed-only vs fully patched."""
import pytest
import torch

import bsbert
from benchmarks.conftest import SMALL, bench_inputs

SEQS = [128] if SMALL else [128, 384]
ROUNDS = 2 if SMALL else 3


def _bench(benchmark, model, inp, **info):
    benchmark.extra_info.update(info)
    with torch.inference_mode():
        benchmark.pedantic(lambda: model(**inp), rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("seq", SEQS)
def test_dense_bert_large(benchmark, dense_model, seq):
    benchmark.group = f"model seq={seq}"
    _bench(benchmark, dense_model, bench_inputs(seq), variant="dense torch eager")


@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("variant", ["packed", "patched"])
def test_seed_like(benchmark, seed_model, seq, variant):
    benchmark.group = f"model seq={seq}"
    kwargs = {"format": "dense"} if variant == "packed" else {}
    bsbert.patch(seed_model, tokens=seq, progress=False, **kwargs)
    try:
        plan = seed_model.bsbert_plan
        _bench(benchmark, seed_model, bench_inputs(seq), variant=variant,
               gflop=plan.flops(seq, "remaining" if variant == "patched" else "packed") / 1e9,
               flop_bound_speedup=plan.speedup_bound(seq, "remaining" if variant == "patched" else "packed"))
    finally:
        bsbert.unpatch(seed_model)


@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_engine_packed(benchmark, seed_model, seq, engine):
    """Another CPU engine on the packing-only model: what bsbert's patched forward is up against
    (`bsbert bench --engines` reports the ratios measured in one run)."""
    from bsbert import engines

    if engines.why_unavailable(engine):
        pytest.skip(engines.why_unavailable(engine))
    benchmark.group = f"model seq={seq}"
    inp = bench_inputs(seq)
    inp["token_type_ids"] = torch.zeros_like(inp["input_ids"])
    runner = engines.engine_runner(engine, seed_model, inp, torch.get_num_threads())
    benchmark.extra_info.update(variant=f"{engine} packed", precision=runner.info["precision"],
                                gflop=bsbert.analyze(seed_model).flops(seq, "packed") / 1e9)
    benchmark.pedantic(runner.run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
