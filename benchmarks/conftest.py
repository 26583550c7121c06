"""Benchmarks: `pytest benchmarks --benchmark-only`.

BSBERT_BENCH_SMALL=1 (or true/yes) is the CI smoke run: it shrinks the model benchmarks (test_model,
test_layer_linears, test_unpad: 2-layer models, seq 128, a smaller length mix) and keeps one case of the
fused-op ones (test_add_layer_norm, test_gemm_add_layer_norm). It does not touch test_kernels_cpu, whose
default grid is already small (BSBERT_BENCH_FULL=1 widens it), nor test_kernels_triton (a fixed GPU grid,
skipped without CUDA). Without it: the real thing (24-layer BERT-large, seq 384 and 128, batch 1). Both
variables take 1/true/yes or 0/false/no (or unset); anything else stops the run with a usage error.
Models are built once per session. Each group times its candidates in the same run (dense vs packed vs
patched for the models); every case first checks, untimed, that what it times computes the right thing
(against float64 or the unpatched model, ``check_close``). The end-to-end model groups' ratios (test_model.py)
are printed after pytest-benchmark's tables and added to its JSON (--benchmark-json, --benchmark-save,
--benchmark-autosave) under ``bsbert_model_ratios``, with the layers and threads they ran with.

The tests here that use no ``benchmark`` fixture (test_bench_suite.py) check the suite itself; --benchmark-only
skips them: ``pytest benchmarks/test_bench_suite.py`` runs them.
"""
import os

import pytest
import torch

_TRUE, _FALSE = ("1", "true", "yes"), ("", "0", "false", "no")


def env_flag(name: str) -> bool:
    """The on/off environment variables of this suite (BSBERT_BENCH_SMALL, BSBERT_BENCH_FULL), parsed one way:
    a value that is neither on nor off raises pytest.UsageError (``SMALL=true`` once ran the full suite
    silently, since only "1" counted)."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise pytest.UsageError(f"{name}={raw!r} is not understood: use one of {', '.join(_TRUE)} (on) or "
                            f"{', '.join(v for v in _FALSE if v)} (off, as unset)")


def pytest_configure(config):
    # both flags checked before collection, so a bad value stops the run with one usage line whichever
    # files are selected (not one collection error per module that reads it)
    env_flag("BSBERT_BENCH_SMALL")
    env_flag("BSBERT_BENCH_FULL")


try:
    SMALL = env_flag("BSBERT_BENCH_SMALL")
except pytest.UsageError:  # reported by pytest_configure, with a clean message
    SMALL = False


def run_info() -> dict:
    """What a timing depends on besides the case: the SMALL run, the threads, the CPU level bsbert's kernels
    run at (``cpu_isa``; None without the extension). For every benchmark's extra_info."""
    from bsbert import _ext

    mod = _ext.load(warn=False)
    return {"small": SMALL, "threads": torch.get_num_threads(),
            "cpu_isa": mod.cpu_isa() if mod is not None and hasattr(mod, "cpu_isa") else None}


def check_close(out, ref, dtype, what: str = "output") -> float:
    """Untimed correctness check of a benchmarked call: ``max |out - ref| / max |ref|`` must stay within
    bsbert.verify.TOLERANCE of the benchmark's dtype (fp32 1e-4, bf16 5e-2), as bsbert verify's; NaN/Inf in
    ``out`` where ``ref`` has none fails. ``ref`` is float64 (or the unpatched model's output). Returns the
    error, for extra_info."""
    from bsbert.verify import TOLERANCE

    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    assert not (finite & ~torch.isfinite(out)).any(), f"{what}: NaN/Inf in the output where the reference has none"
    err = float((out - ref)[finite].abs().max() / ref[finite].abs().max().clamp(min=1e-30)) if finite.any() else 0.0
    tol = TOLERANCE[dtype]
    assert err <= tol, f"{what}: max rel error {err:.2e} > {tol:g} ({dtype}): the benchmarked call is wrong"
    return err

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
        info = by["patched"].extra_info
        # the model depth and threads the ratios were measured with: a SMALL run's 2 layers on 1 thread is
        # no BERT-large result, and the row must say so
        row = {"seq": seq, "dtype": dtype, "layers": info.get("num_hidden_layers"), "threads": info.get("threads"),
               "statistic": RATIO_STAT, **{f"{v}_ms": t for v, t in ms.items()}}
        for other in ("dense", "packed"):
            if other in ms:
                row[f"patched_speedup_vs_{other}"] = ms[other] / ms["patched"]
        row.update(_bound(info, ms["patched"]))
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
_COLUMNS = [("seq", "seq", "{}"), ("dtype", "dtype", "{}"), ("layers", "layers", "{}"), ("threads", "threads", "{}"),
            ("dense ms", "dense_ms", "{:.2f}"),
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
    table = [[h for h, _, _ in _COLUMNS]] + [[fmt.format(row[k]) if row.get(k) is not None else "-"
                                              for _, k, fmt in _COLUMNS]
                                             for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    for line in table:
        tr.write_line("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    rates = sorted({(r["dtype"], r["dense_gemm"], f"{r['dense_gemm_gflops']:.1f}") for r in rows if "bound_ms" in r})
    for dtype, label, gflops in rates:
        tr.write_line(f"bound ({dtype}): the remaining FLOPs at {label} {gflops} GFLOP/s, the best dense GEMM "
                      "probed in this run")


def check_outputs(ref, out, attention_mask, dtype, what: str = "model") -> float:
    """check_close for whole model outputs: ``out`` against the unpatched model's ``ref`` (both in ``dtype``) by
    bsbert.verify.compare_outputs (every floating output; per-token ones on real tokens only; NaN in one only:
    inf), within the tolerance bsbert verify applies. Returns the worst max_rel, for extra_info."""
    from bsbert.verify import TOLERANCE, compare_outputs

    errs = {k: v["max_rel"] for k, v in compare_outputs(ref, out, attention_mask).items()}
    assert errs, f"{what}: no floating-point outputs to compare"
    tol = TOLERANCE[dtype]
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= tol}
    assert not bad, f"{what}: max rel error {bad} > {tol:g} ({dtype}) against the unpatched model"
    return max(errs.values())
