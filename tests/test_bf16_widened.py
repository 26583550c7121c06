"""bf16 on a CPU without a bf16 dot product (AVX2, AVX-512 without BF16; here: BSBERT_CPU_ISA caps).

bsbert's kernels then widen bf16 to fp32 FMAs, oneDNN has no bf16 GEMM (AVX2) and torch's bf16 F.linear is
an emulation ~4x slower than fp32. What the measurements must do there: the FLOP bound's dense rate may be
the fp32 GEMM (probed as fp32, labelled so), the instruction peak is the fp32 FMA's, the kernel report
compares with oneDNN in fp32, and `bsbert bench` / `bsbert info` say that bf16 runs widened.
"""
import json

import pytest
import torch

from bsbert import _ext
from bsbert import timing

_C = _ext.load(warn=False)
ISA = _C.cpu_isa() if _C is not None and hasattr(_C, "cpu_isa") else "portable"
# the emulated AVX-512 test build reports avx512_bf16 on a CPU without it: no native bf16 to measure there
NATIVE_BF16 = ISA == "avx512_bf16" and not _ext.isa_emulated()
needs_simd = pytest.mark.skipif(ISA not in ("avx2", "avx512", "avx512_bf16"), reason="no AVX2/AVX-512 here")


@needs_simd
@pytest.mark.parametrize("cap, widened", [("avx2", True), ("avx512", True), ("avx512_bf16", False)])
def test_widened_follows_the_cpu_level(monkeypatch, cap, widened):
    if cap == "avx512_bf16" and ISA != "avx512_bf16" or cap == "avx512" and ISA == "avx2":
        pytest.skip(f"this CPU cannot run at {cap}")
    monkeypatch.setenv("BSBERT_CPU_ISA", cap)
    assert _ext.bf16_widened_on_cpu() is widened


def test_portable_level_is_not_called_widened(monkeypatch):
    monkeypatch.setenv("BSBERT_CPU_ISA", "portable")
    assert not _ext.bf16_widened_on_cpu()  # no SIMD at all: nothing to say about bf16 specifically


@needs_simd
def test_bound_candidates_include_fp32_only_for_widened_bf16(monkeypatch):
    monkeypatch.setenv("BSBERT_CPU_ISA", "avx2")
    r = timing.dense_gemm_gflops("cpu", torch.bfloat16, m=8, k=32, n=32, rounds=1)
    fp32 = [lb for lb in r["all_gflops"] if lb.endswith("(float32)")]
    assert fp32, r["all_gflops"]  # the fp32 GEMMs were candidates
    assert r["widened"] == (r["probe_dtype"] == "float32") and r["dtype"] == "torch.bfloat16"
    assert r["gflops"] == r["all_gflops"][r["label"]] == max(r["all_gflops"].values())
    # fp32 work, or bf16 on a CPU with a bf16 dot product: the requested dtype only
    r32 = timing.dense_gemm_gflops("cpu", torch.float32, m=8, k=32, n=32, rounds=1)
    assert not r32["widened"] and all("(" not in lb for lb in r32["all_gflops"])
    if ISA == "avx512_bf16":
        monkeypatch.setenv("BSBERT_CPU_ISA", "avx512_bf16")
        r = timing.dense_gemm_gflops("cpu", torch.bfloat16, m=8, k=32, n=32, rounds=1)
        assert not r["widened"] and all("(" not in lb for lb in r["all_gflops"])


@needs_simd
def test_widened_winner_is_labelled_and_probed_in_fp32(monkeypatch):
    monkeypatch.setenv("BSBERT_CPU_ISA", "avx2")
    calls = []

    def fake(fns, rounds=5, target_s=0.01, device="cpu"):
        calls.append(len(fns))
        return [1.0 if i < len(fns) // 2 else 0.5 for i in range(len(fns))]  # the fp32 half is faster

    monkeypatch.setattr(timing, "best_of_interleaved", fake)
    r = timing.dense_gemm_gflops("cpu", torch.bfloat16, m=8, k=32, n=32, rounds=1)
    assert r["widened"] and r["probe_dtype"] == "float32" and r["label"] == f"{r['backend']} (float32)"
    assert calls == [len(r["all_gflops"])]  # every candidate, both dtypes, timed in one interleaved call
    # the probe the bench re-times between its blocks is that fp32 GEMM, at the M asked for
    probe, flops = timing.bound_probe(r, "cpu", m=4)
    assert flops == 2.0 * 4 * 32 * 32
    out = probe()
    assert out.dtype == torch.float32 and out.shape == (4, 32)
    probe_b, _ = timing.bound_probe(dict(r, probe_dtype="bfloat16", backend="torch-dense"), "cpu")
    assert probe_b().dtype == torch.bfloat16 and probe_b().shape == (8, 32)


@needs_simd
def test_kernel_report_compares_widened_bf16_with_fp32_onednn(monkeypatch):
    if not _ext.has_op("bsr_linear"):
        pytest.skip("extension not built")
    from bsbert.ops import cpu_kernel_report as r

    monkeypatch.setenv("BSBERT_CPU_ISA", "avx2")
    rows = r.run_kernel_report(shapes=((64, 64),), densities=(0.5,), ms=(8,), rounds=1, dtypes=(torch.bfloat16,))
    row = rows[0]
    if row["onednn_gflops"] is None:
        pytest.skip("torch without oneDNN")
    assert row["dtype"] == "bfloat16" and row["onednn_dtype"] == "float32"
    assert "(float32)" in r.format_row(row)
    assert row["isa_peak_gflops"] is not None and "% of " in r.format_row(row)  # the fp32 FMA peak
    monkeypatch.delenv("BSBERT_CPU_ISA")
    if NATIVE_BF16:  # native bf16: oneDNN's bf16 GEMM, unlabelled
        row = r.run_kernel_report(shapes=((64, 64),), densities=(0.5,), ms=(8,), rounds=1,
                                  dtypes=(torch.bfloat16,))[0]
        assert row["onednn_dtype"] == "bfloat16" and "(float32)" not in r.format_row(row)


@needs_simd
def test_info_says_bf16_is_widened(monkeypatch):
    from bsbert.info import _cpu_peak

    monkeypatch.setenv("BSBERT_CPU_ISA", "avx2")
    line = _cpu_peak()
    assert "bf16 widened to fp32" in line and "fp32 " in line and "vfmadd*ps ymm" in line
    if ISA == "avx512_bf16":
        monkeypatch.delenv("BSBERT_CPU_ISA")
        if NATIVE_BF16:
            assert "widened" not in _cpu_peak() and "vdpbf16ps zmm" in _cpu_peak()
        else:
            assert "emulated AVX-512 test build" in _cpu_peak()


@needs_simd
@pytest.mark.filterwarnings("ignore:this CPU has no bf16 dot-product")  # patch's own (tested below)
def test_bench_with_a_widened_bound_probes_fp32_and_says_so(monkeypatch, tmp_path, capsys):
    """The bench on a bf16 model where the fp32 GEMM set the bound: the probes between the patched blocks
    re-time that fp32 GEMM, the JSON records it, and the table's caption and the log say bf16 is widened."""
    from bsbert import bench
    from bsbert.cli import main

    monkeypatch.setenv("BSBERT_CPU_ISA", "avx2")
    monkeypatch.setenv("COLUMNS", "500")  # rich wraps its log and caption at the terminal width
    real = timing.dense_gemm_gflops
    probed = []

    def widened_winner(device="cpu", dtype=torch.float32, **kw):
        r = real(device, dtype, **kw)
        lb = next(lb for lb in r["all_gflops"] if lb.endswith("(float32)"))
        probed.append(lb)
        return dict(r, backend=lb.split(" ")[0], label=lb, gflops=r["all_gflops"][lb], probe_dtype="float32",
                    widened=True)

    monkeypatch.setattr(bench, "dense_gemm_gflops", widened_winner)
    dtypes = []
    real_probe = timing.bound_probe

    def spy(peak, device="cpu", m=None):
        fn, flops = real_probe(peak, device, m)
        dtypes.append(fn().dtype)
        return fn, flops

    monkeypatch.setattr(bench, "bound_probe", spy)
    assert main(["bench", "--small", "--seq", "8", "--repeats", "1", "--trials", "2", "--select", "heuristic",
                 "--dtype", "bfloat16", "--out", str(tmp_path)]) == 0
    res = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert res["dense_gemm"]["widened"] and res["dense_gemm"]["probe_dtype"] == "float32"
    assert dtypes and set(dtypes) == {torch.float32}  # every bound probe of the run was the fp32 GEMM
    assert res["isa_peak"]["widened"] and res["isa_peak"]["kind"] == "fp32"
    run = res["runs"][0]
    assert run["max_rel_diff_patched"] < 0.1 and run["patched_over_bound"] > 0
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())
    assert "bf16 runs widened to fp32" in text and "float32 model may run faster" in text


@needs_simd
def test_patch_of_a_bf16_model_says_fp32_may_be_faster_where_bf16_is_widened(monkeypatch):
    """patch cannot change the model's dtype, so it says so once; not on CPUs with a bf16 dot product, and
    not for float32 models."""
    import warnings

    import bsbert
    from tests.helpers import tiny_pruned

    def patch_warnings(model):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            bsbert.patch(model, select="heuristic", progress=False)
        bsbert.unpatch(model)
        return [str(x.message) for x in w if "bf16 dot-product" in str(x.message)]

    monkeypatch.setenv("BSBERT_CPU_ISA", "avx2")
    model = tiny_pruned().eval().to(torch.bfloat16)
    said = patch_warnings(model)
    assert len(said) == 1 and "float32 copy of the model may run faster" in said[0]
    assert patch_warnings(tiny_pruned().eval()) == []  # float32: nothing to say
    if ISA == "avx512_bf16":
        monkeypatch.delenv("BSBERT_CPU_ISA")
        assert patch_warnings(model) == []


def test_dense_rate_is_the_best_over_the_shapes():
    # The bound's rate: every backend at every (K, N) given, the fastest counts, and its shape is what
    # bound_probe times again between the patched blocks.
    shapes = timing.bert_dense_shapes(32, 64)
    assert shapes == [(32, 32), (32, 96), (32, 64), (64, 32)]
    r = timing.dense_gemm_gflops("cpu", torch.float32, m=8, rounds=1, shapes=shapes)
    assert r["gflops"] == max(r["all_gflops"].values()) and r["shapes"] == [list(s) for s in shapes]
    assert tuple(r["shape"][1:]) in shapes and r["shape"][0] == 8
    assert f"{r['shape'][1]}x{r['shape'][2]}" in r["label"]
    assert {lb.split(" ")[1] for lb in r["all_gflops"]} == {f"{k}x{n}" for k, n in shapes}
    fn, flops = timing.bound_probe(r, "cpu")
    assert fn().shape == (8, r["shape"][2]) and flops == 2.0 * 8 * r["shape"][1] * r["shape"][2]


def test_onednn_refusal_keeps_whole_words(monkeypatch):
    # the backend's reason quotes oneDNN's first line; cut at 80 characters it ended mid-word ("...propagatio)")
    from bsbert.ops import linear_backends

    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    line = ("could not create a primitive descriptor for the inner product forward propagation primitive. Run "
            "workload with environment variable ONEDNN_VERBOSE=all to get additional diagnostic information.")

    def refuse(*args, **kwargs):
        raise RuntimeError(line + "\nsecond line")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", refuse)
    linear_backends._onednn_probe.cache_clear()
    try:
        why = linear_backends._onednn_probe(torch.float32)
    finally:
        linear_backends._onednn_probe.cache_clear()  # the real answer for the tests after this one
    assert why.startswith("oneDNN has no torch.float32 inner-product primitive here (could not create")
    quoted = why[why.index("(") + 1:-1]
    assert "forward propagation primitive." in quoted and "second line" not in quoted
    words = set(line.split())
    assert all(w in words or w == "[...]" for w in quoted.split()), quoted  # no word cut in half
