"""Benchmarks: `pytest benchmarks --benchmark-only`.

BSBERT_BENCH_SMALL=1 shrinks everything (2-layer models, seq 128) for a CI smoke run; the default is
the real thing (24-layer BERT-large, seq 384 and 128, batch 1). Models are built once per session.
Each group compares dense vs packed vs patched in the same run; the end-to-end model groups' ratios
(test_model.py) are printed after pytest-benchmark's tables and added to its JSON (--benchmark-json,
--benchmark-save, --benchmark-autosave) under ``bsbert_model_ratios``.
"""
import os

import pytest
import torch

SMALL = os.environ.get("BSBERT_BENCH_SMALL", "0") == "1"

# The statistic every model ratio is made of: the median of a variant's rounds (as `bsbert bench`, whose
# ratios are of medians too), so one slow round of a shared machine does not move it.
RATIO_STAT = "median"

_MODEL_RUNS = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def model_overrides():
    return {"num_hidden_layers": 2} if SMALL else {}


@pytest.fixture(scope="session")
def get_model(model_overrides):
    """(kind, dtype) -> the model, built on first use and kept for the session: "dense" is dense BERT-large,
    "seed" the seed-like pruned model. Lazy so that a -k selecting one dtype builds that dtype's models only."""
    from bsbert import models

    built = {}

    def get(kind, dtype=torch.float32):
        if (kind, dtype) not in built:
            make = {"dense": models.dense_bert_large, "seed": models.seed_like_model}[kind]
            built[kind, dtype] = make(dtype=dtype, **model_overrides)
        return built[kind, dtype]

    return get


@pytest.fixture(scope="session")
def dense_model(get_model):
    return get_model("dense")


@pytest.fixture(scope="session")
def seed_model(get_model):
    return get_model("seed")


def bench_inputs(seq, batch=1, vocab=30522):
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture
def record_model_run(request, benchmark):
    """Call it at the end of a model benchmark (seq, dtype, variant in its extra_info): the run then counts
    in the ratios. A test that failed or was skipped before that call, or a deselected one, leaves nothing,
    so no ratio is ever made of a variant that did not run to the end."""
    def record():
        if benchmark.stats:  # None / empty under --benchmark-disable: nothing was timed
            request.config.stash.setdefault(_MODEL_RUNS, []).append(benchmark.stats)

    return record


def model_ratio_rows(runs) -> list[dict]:
    """One row per (seq, dtype) group of model runs (pytest-benchmark Metadata) with a patched run: each
    variant's time and the ratios whose both sides ran in this session. patched / bound: the patched time
    over its remaining FLOPs at the dense GEMM rate probed in this session (in the patched run's extra_info)."""
    groups = {}
    for r in runs:
        info = r.extra_info
        groups.setdefault((info["seq"], info["dtype"]), {})[info["variant"]] = r
    rows = []
    for (seq, dtype), by in sorted(groups.items()):
        ms = {v: getattr(r.stats, RATIO_STAT) * 1e3 for v, r in by.items()}
        if "patched" not in ms:  # every ratio is of the patched run: a group without it has none
            continue
        row = {"seq": seq, "dtype": dtype, "statistic": RATIO_STAT, **{f"{v}_ms": t for v, t in ms.items()}}
        for other in ("dense", "packed"):
            if other in ms:
                row[f"patched_speedup_vs_{other}"] = ms[other] / ms["patched"]
        row.update(_bound(by["patched"].extra_info, ms["patched"]))
        rows.append(row)
    return rows


def _bound(info: dict, patched_ms: float) -> dict:
    rate = info.get("dense_gemm_gflops")
    if not rate:
        return {}
    bound_ms = info["remaining_flops"] / (rate * 1e9) * 1e3
    return {"bound_ms": bound_ms, "patched_over_bound": patched_ms / bound_ms, "dense_gemm_gflops": rate,
            "dense_gemm": info.get("dense_gemm_label")}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    rows = model_ratio_rows(config.stash.get(_MODEL_RUNS, []))
    if rows:
        output_json["bsbert_model_ratios"] = rows


# the ratio table's columns: (header, row key, format)
_COLUMNS = [("seq", "seq", "{}"), ("dtype", "dtype", "{}"), ("dense ms", "dense_ms", "{:.2f}"),
            ("packed ms", "packed_ms", "{:.2f}"), ("patched ms", "patched_ms", "{:.2f}"),
            ("patched vs dense", "patched_speedup_vs_dense", "{:.2f}x"),
            ("patched vs packed", "patched_speedup_vs_packed", "{:.2f}x"),
            ("bound ms", "bound_ms", "{:.2f}"), ("patched/bound", "patched_over_bound", "{:.2f}")]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = model_ratio_rows(config.stash.get(_MODEL_RUNS, []))
    if not rows:
        return
    tr = terminalreporter
    tr.write_sep("-", f"bsbert model ratios (of {RATIO_STAT}s, measured in this run; '-': a side did not run)")
    table = [[h for h, _, _ in _COLUMNS]] + [[fmt.format(row[k]) if k in row else "-" for _, k, fmt in _COLUMNS]
                                             for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    for line in table:
        tr.write_line("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    rates = sorted({(r["dtype"], r["dense_gemm"], f"{r['dense_gemm_gflops']:.1f}") for r in rows if "bound_ms" in r})
    for dtype, label, gflops in rates:
        tr.write_line(f"bound ({dtype}): the remaining FLOPs at {label} {gflops} GFLOP/s, the best dense GEMM "
                      "probed in this run")
