"""The faces: bsbert bench (and --sweep) in small mode write JSON + PNG; info lists backends."""
import json

import pytest

from bsbert.cli import main


def test_bench_small(tmp_path, capsys):
    assert main(["bench", "--small", "--seq", "16", "--repeats", "1", "--select", "heuristic",
                 "--out", str(tmp_path)]) == 0
    js = list(tmp_path.glob("bench-*.json"))
    assert js and list(tmp_path.glob("bench-*.png"))
    res = json.loads(js[0].read_text())
    run = res["runs"][0]
    assert run["seq"] == 16 and run["max_rel_diff_patched"] <= 1e-4 and run["flop_bound_speedup"] > 1
    assert res["outputs_ok"] is True and res["outputs_limit"] == 1e-4 and "outputs_off" not in res
    # every seq's plan table, keyed by seq ("plan_table": the last seq's, for readers of older JSON)
    assert res["plan_tables"] == {"16": res["plan_table"]} and "FLOPs at seq 16:" in res["plan_table"]
    # the bound's rate is the best over a BERT layer's four dense shapes; the winner's is probed between blocks
    assert res["dense_gemm"]["shapes"] == [[1024, 1024], [1024, 3072], [1024, 4096], [4096, 1024]]
    assert res["dense_gemm"]["shape"][1:] in res["dense_gemm"]["shapes"]
    # the paired ratio against a probe at the run's own M (16 rows here; the strict one probes M=384)
    assert run["patched_paired_over_bound_at_m"]["m"] == 16 and run["patched_paired_over_bound_at_m"]["median"] > 0
    # the patched forward in blocks (default 5 on CPU), the same dense GEMM probed before each and after the last
    t = run["timings"]["patched"]
    assert res["trials"] == 5 and len(t["trials"]) == 5 and len(t["probe_gflops"]) == 6 and t["repeats"] == 5
    assert t["median_ms"] == run["patched_ms"] and len(run["patched_trials_over_bound"]) == 5
    # the bound's dense rate is the fastest of the probes before the runs, between the blocks and after
    start, end = res["dense_gemm_start"]["gflops"], res["dense_gemm_end"]["gflops"]
    fastest = max(start, end, *t["probe_gflops"])
    assert res["dense_gemm"]["gflops"] == fastest == run["dense_gemm"]["gflops"]
    assert res["dense_gemm_between"]["between_gflops"] == t["probe_gflops"]
    bound = run["remaining_flops"] / (fastest * 1e9) * 1e3
    assert run["patched_trials_over_bound"] == [b["median_ms"] / bound for b in t["trials"]]
    assert abs(run["remaining_bound_ms"] - bound) < 1e-9 * bound
    assert abs(run["patched_over_bound"] - run["patched_ms"] / bound) < 1e-9
    # the instruction peak (where the CPU has a SIMD multiply-add): the floor under the bound
    peak = res["isa_peak"]
    if peak is not None:
        assert peak["kind"] == "fp32" and len(peak["per_thread"]) == res["threads"]
        floor = run["remaining_flops"] / (peak["gflops"] * 1e9) * 1e3
        assert abs(run["isa_peak_bound_ms"] - floor) < 1e-9 * floor
        assert abs(run["patched_over_isa_peak_bound"] - run["patched_ms"] / floor) < 1e-9
        assert peak["gflops"] == max(p["gflops"] for p in (res["isa_peak_start"], res["isa_peak_end"]) if p)
        # steady: neither probe moved more than 5%, the dense one counted at the start, between the blocks and at the end
        dense = [start, *t["probe_gflops"], end]
        ends = [p["gflops"] for p in (res["isa_peak_start"], res["isa_peak_end"]) if p]
        assert res["steady"] == (min(dense) >= 0.95 * max(dense) and min(ends) >= 0.95 * max(ends))
    out = capsys.readouterr().out
    assert "speedup" in out
    assert (peak is None) or "of the instruction peak" in out


def test_sweep_small(tmp_path):
    assert main(["bench", "--sweep", "--small", "--batches", "1", "2", "--seq", "8", "--dtypes", "float32",
                 "--repeats", "1", "--out", str(tmp_path)]) == 0
    res = json.loads(next(tmp_path.glob("sweep-*.json")).read_text())
    assert [(r["batch"], r["seq"]) for r in res["rows"]] == [(1, 8), (2, 8)]
    r = res["rows"][0]
    assert r["patched_weights_mb"] < r["dense_weights_mb"]
    # each row checks the patched outputs against the masked dense model (the sweep checked nothing)
    assert res["outputs_ok"] and all(row["outputs_ok"] and row["max_rel_diff"] < 1e-4 for row in res["rows"])


def test_bench_exits_1_when_the_outputs_differ(capsys):
    # bench printed "OUTPUTS DIFFER" and exited 0, so CI's bench smoke run could not fail on a wrong kernel
    from rich.table import Table

    from bsbert.cli import _print_result

    assert _print_result(Table(), {"json": "r.json", "outputs_ok": True}) == 0
    assert _print_result(Table(), {"json": "r.json", "outputs_ok": False}) == 1
    assert "outputs differ" in capsys.readouterr().out


def test_info(capsys):
    from bsbert.info import main as info_main

    info_main()
    out = capsys.readouterr().out
    assert "cpu/float32/torch-dense" in out and "extension" in out
    # the attention kernels too, each usable or why not, and whether packed weights get huge pages
    attention = out[out.index("attention backends"):].splitlines()
    for name in ("cpu", "torch-sdpa", "triton", "cuda"):
        row = next(x for x in attention if x.split()[0] == f"cpu/float32/{name}")
        assert row.split()[1] in ("yes", "no:", "only"), row
    assert next(x for x in attention if x.split()[0] == "cpu/float32/torch-sdpa").split()[1] == "yes"
    # under the interpreter Triton runs on cpu, but patch takes it only when forced, and info says so
    triton = next(x for x in attention if x.split()[0] == "cpu/float32/triton")
    assert triton.split()[1] == "no:" or "only when forced: on cpu Triton runs in its interpreter" in triton, triton
    from bsbert import hugepages

    line = next(x for x in out.splitlines() if "huge_pages:" in x)
    assert ("yes (" in line) == (hugepages.unavailable_reason() is None), line
    assert "cpu_peak:" in out  # the instruction peak, or why it is not measurable
    from bsbert.engines import why_unavailable

    engines = next(x for x in out.splitlines() if "engines:" in x)  # another engine for bench --engines, or why not
    assert ("openvino: yes (" in engines) == (why_unavailable("openvino") is None), engines
    from bsbert import _ext

    if _ext.has_op("bert_encoder"):  # the ops line names the kernels this build has per device
        line = next(x for x in out.splitlines() if "cpu_ops:" in x)
        assert "bsr_linear" in line and "bert_encoder" in line
    mod = _ext.load(warn=False)
    if mod is not None:  # the extension line says whether the CUDA kernels, and the Hopper ones, are built
        line = next(x for x in out.splitlines() if "extension:" in x)
        expect = ("CUDA kernels no" if not mod.with_cuda() else
                  "with the Hopper wgmma kernels (sm_90a)" if mod.with_sm90a() else "without sm_90a")
        assert expect in line, line


def test_bench_kernels_table(capsys):
    import pytest

    from bsbert import _ext

    if not _ext.has_op("bsr_linear"):
        pytest.skip("extension not built")
    from bsbert.ops import cpu_kernel_report as r

    rows = r.run_kernel_report(shapes=((64, 64),), densities=(1.0, 0.5), ms=(8,), rounds=1)
    assert len(rows) == 2 and all(row["ours_gflops"] > 0 for row in rows)
    assert "density" in r.format_table(rows)
    for row in rows:  # the fraction of the instruction peak, where the CPU has one to time
        if row["isa_peak_gflops"] is not None:
            assert abs(row["ours_of_isa_peak"] - row["ours_gflops"] / row["isa_peak_gflops"]) < 1e-12
            assert "% of " in r.format_row(row)


def test_bench_small_compiled(tmp_path):
    """--compile times torch.compile of each variant; the outputs still match (checked eagerly)."""
    assert main(["bench", "--small", "--seq", "8", "--repeats", "1", "--select", "heuristic",
                 "--compile", "default", "--out", str(tmp_path)]) == 0
    res = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert res["compile"] == "default"
    run = res["runs"][0]
    assert run["patched_ms"] > 0 and run["max_rel_diff_patched"] <= 1e-4


def test_bench_ranks_by_gpu_time_only_under_cuda_graphs():
    """`bsbert bench --compile reduce-overhead` on CUDA patches with select='measure-gpu' (the forward replays
    CUDA graphs, so wall-clock timings of single calls would rank host overhead); everything else by wall
    clock, unless --select says otherwise."""
    from bsbert.bench import default_select

    assert default_select("cuda", "reduce-overhead") == "measure-gpu"
    assert default_select("cuda", None) == default_select("cuda", "default") == "measure"
    assert default_select("cpu", "reduce-overhead") == "measure"


def test_bench_flags_a_run_whose_probes_moved():
    from bsbert.bench import _apply_isa_peak, _apply_steady, table

    def results(dense_start, dense_end, isa_start=None, isa_end=None, between=None):
        run = {"seq": 8, "remaining_flops": 2e9, "patched_ms": 5.0}
        r = {"runs": [run], "dense_gemm_start": {"gflops": dense_start}, "dense_gemm_end": {"gflops": dense_end}}
        if between:
            r["dense_gemm_between"] = {"between_gflops": between}
        if isa_start:
            _apply_isa_peak(r, isa_start, isa_end)
        _apply_steady(r, said.append)
        return r

    said = []
    peak = {"gflops": 1000.0, "instruction": "vdpbf16ps zmm", "threads": 2}
    r = results(900.0, 880.0, peak, dict(peak, gflops=980.0))
    assert r["steady"] and not said and r["isa_peak"]["gflops"] == 1000.0
    assert r["runs"][0]["isa_peak_bound_ms"] == 2.0 and r["runs"][0]["patched_over_isa_peak_bound"] == 2.5
    r = results(900.0, 880.0, dict(peak, gflops=926.0), dict(peak, gflops=1019.0))  # slow start
    assert not r["steady"] and "not steady" in said[-1] and r["isa_peak"]["gflops"] == 1019.0
    # no instruction peak (no extension, BSBERT_CPU_ISA=portable): the dense probes still decide; the flag
    # used to be left out, and the caption took the run as steady
    said.clear()
    assert results(900.0, 880.0)["steady"] and not said
    assert not results(900.0, 880.0, between=[700.0])["steady"] and "(700-700 between" in said[-1]
    r = results(899.0, 755.0, peak, peak)  # the dense probe fell within the run
    assert not r["steady"]
    r.update(device="cpu", dtype="bfloat16", batch=1, threads=2, model="m", device_name="cpu",
             dense_gemm={"backend": "onednn-dense", "gflops": 899.0})
    r["runs"][0].update(dense_ms=1, packed_ms=1, speedup_vs_dense=1, packing_speedup_vs_dense=1,
                        speedup_vs_packing=1, flop_bound_speedup=1, remaining_bound_ms=1, patched_over_bound=1,
                        patched_best_over_bound=1, patched_paired_over_bound={"median": 1},
                        max_rel_diff_patched=0.0)
    assert "NOT STEADY" in table(r).caption
    # one thread is "1 thread" in the title and the caption (bench --threads 1)
    assert "2 threads" in table(r).title and "on 2 threads" in table(r).caption
    r["threads"] = 1
    r["isa_peak"]["threads"] = 1
    assert "1 thread)" in table(r).title and "on 1 thread)" in table(r).caption and "1 threads" not in table(r).caption


def test_bench_trials_must_be_positive(capsys):
    from bsbert.bench import run_bench

    with pytest.raises(ValueError, match="trials must be >= 1, got 0"):
        run_bench(trials=0)
    with pytest.raises(SystemExit):
        main(["bench", "--trials", "0"])
    assert "--trials: must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "--threads", "1", "--model", "x"], "--model: do not apply to --sweep"),
    (["--sweep", "--batch", "2", "--dtype", "bfloat16", "--select", "heuristic"],
     "--batch, --dtype, --select: do not apply to --sweep"),
    (["--sweep", "--compile", "default"], "--compile: do not apply to --sweep"),
    (["--sweep", "--trials", "2"], "--trials: do not apply to --sweep"),
    (["--sweep", "--engines", "openvino"], "--engines: do not apply to --sweep"),
    (["--kernels", "--repeats", "2"], "--repeats: do not apply to --kernels"),
    (["--kernels", "--small", "--out", "x"], "--out, --small: do not apply to --kernels"),
    (["--kernels", "--dtype", "float16"], "--dtype float16: --kernels has CPU kernels for float32 and bfloat16"),
    (["--kernels", "--device", "cuda:0"], "--device 'cuda:0': "),
    (["--kernels", "--sweep"], "--sweep and --kernels are two different modes"),
    (["--batches", "1", "2"], "--batches: only apply with --sweep"),
    (["--memory", "--dtypes", "float32"], "--dtypes, --memory: only apply with --sweep"),
    (["--device", "tpu"], "--device 'tpu': not a torch device"),
    (["--threads", "0"], "--threads: must be >= 1, got 0"),
])
def test_bench_rejects_flags_that_do_not_apply(argv, message, capsys):
    """A flag the chosen mode would ignore is an argparse error naming the flag and the mode."""
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_flags_given_in_other_spellings_count(capsys):
    """Given is given, whatever the spelling or value (the default value, `--flag=value`, an abbreviation)."""
    for argv, flag in ((["--sweep", "--batch", "1"], "--batch"), (["--sweep", "--batch=1"], "--batch"),
                       (["--sweep", "--sel", "measure"], "--select")):
        with pytest.raises(SystemExit):
            main(["bench", *argv])
        assert f"{flag}: do not apply to --sweep" in capsys.readouterr().err


def test_bench_threads_reach_sweep_and_kernels(monkeypatch):
    """--threads is honoured by --sweep and --kernels (they run on torch's threads), --seq by --kernels."""
    import torch

    import bsbert.cli as cli
    import bsbert.ops.cpu_kernel_report as ckr
    import bsbert.sweep as sweep

    seen = {}

    def fake_sweep(**kw):
        seen["sweep"] = (torch.get_num_threads(), kw["seqs"], kw["device"])
        return {"json": "x"}

    def fake_kernels(**kw):
        seen["kernels"] = (torch.get_num_threads(), kw["ms"], kw["dtypes"])
        return []

    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    monkeypatch.setattr(sweep, "sweep_table", lambda res: "table")
    monkeypatch.setattr(ckr, "run_kernel_report", fake_kernels)
    monkeypatch.setattr(ckr, "format_table", lambda rows: "table")
    monkeypatch.setattr(cli, "_print_result", lambda tbl, res: 0)
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    try:
        assert main(["bench", "--sweep", "--threads", str(want), "--device", "cpu"]) == 0
        assert seen["sweep"] == (want, (128, 384), "cpu")  # --seq not given: the sweep's own lengths
        torch.set_num_threads(before)
        assert main(["bench", "--kernels", "--threads", str(want), "--seq", "128", "384", "--batch", "2",
                     "--dtype", "bfloat16"]) == 0
        assert seen["kernels"] == (want, (256, 768), (torch.bfloat16,))
    finally:
        torch.set_num_threads(before)


def test_bench_device_defaults_to_cuda_when_available(monkeypatch):
    """Like `bsbert profile`: without --device, bench runs on the GPU when torch sees one, else on the CPU."""
    import torch

    import bsbert.bench as bench
    import bsbert.cli as cli

    seen = []
    monkeypatch.setattr(bench, "run_bench", lambda **kw: seen.append(kw["device"]) or {"json": "x"})
    monkeypatch.setattr(bench, "table", lambda res: "table")
    monkeypatch.setattr(cli, "_print_result", lambda tbl, res: 0)
    for available, want in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=available: a)
        assert main(["bench", "--small"]) == 0 and seen[-1] == want
    assert main(["bench", "--device", "cpu"]) == 0 and seen[-1] == "cpu"
    import bsbert.ops.cpu_kernel_report as ckr  # --kernels is CPU only: auto is the CPU there, GPU or not

    monkeypatch.setattr(ckr, "run_kernel_report", lambda **kw: [])
    monkeypatch.setattr(ckr, "format_table", lambda rows: "table")
    assert main(["bench", "--kernels", "--seq", "8"]) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cuda"])


def test_profile_prints_commands_that_profile_the_same_model(tmp_path, capsys):
    """The nsys / ncu commands `bsbert profile` prints carry every option that changes what is profiled."""
    import argparse

    from bsbert.profile import commands
    from bsbert.profile import main as profile_main

    args = argparse.Namespace(device="cuda", dtype="float16", seq=128, batch=8, steps=4, warmup=2,
                              model="/ckpts/my model", small=False, trace=None)
    cmds = commands(args)
    for cmd in cmds.values():
        for part in ("--device cuda", "--dtype float16", "--seq 128", "--batch 8", "--warmup 2",
                     "--model '/ckpts/my model'"):
            assert part in cmd, (part, cmd)
        assert "--small" not in cmd
    assert cmds["nsys"].endswith("--steps 4") and cmds["ncu"].endswith("--steps 1")
    # ncu waits for profile's cudaProfilerStart; its old filter --nvtx-include 'bsbert/' matched no range
    assert "--profile-from-start off" in cmds["ncu"] and "nvtx" not in cmds["ncu"]
    assert "--small" in commands(argparse.Namespace(**{**vars(args), "model": None, "small": True}))["ncu"]
    # the CPU run prints the GPU command for the same (small) model
    trace = tmp_path / "t.json"
    assert profile_main(["--device", "cpu", "--small", "--seq", "8", "--steps", "1", "--warmup", "1",
                         "--trace", str(trace)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("on a GPU: "))
    assert "--small" in line and "--seq 8" in line and "--device cuda" in line and trace.exists()
    with pytest.raises(SystemExit):
        profile_main(["--model", "x", "--small"])
    assert "--small applies to the seed-like model only" in capsys.readouterr().err


def test_nvtx_env_adds_ranges_at_patch_time(monkeypatch):
    """BSBERT_NVTX=1 when patch runs: the named ranges (bsbert/layerN/...) stay on the patched model,
    ranges() adds no second set, and unpatch takes them away with the patched modules."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import bsbert
    from bsbert import nvtx
    from tests.helpers import inputs, tiny_pruned

    def hooked(model):
        return [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]

    model = tiny_pruned()
    bsbert.patch(model, select="heuristic", progress=False)
    assert not hooked(model)  # off by default
    bsbert.unpatch(model)
    monkeypatch.setenv("BSBERT_NVTX", "1")
    bsbert.patch(model, select="heuristic", progress=False)
    n_hooked = len(hooked(model))
    assert n_hooked > 0
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**inputs())
    names = {e.key for e in prof.key_averages()}
    for expected in ("bsbert/layer0/PrunedSelfAttention", "bsbert/layer0/qkv", "bsbert/layer0/ffn_in",
                     "bsbert/layer0/intermediate", "bsbert/layer0/ffn_out+add_norm"):
        assert expected in names, sorted(n for n in names if n.startswith("bsbert"))
    with nvtx.ranges(model, use_nvtx=False):  # already there: no duplicates
        assert all(len(m._forward_pre_hooks) == 1 for m in hooked(model))
    assert len(hooked(model)) == n_hooked
    bsbert.unpatch(model)
    assert not hooked(model)


def test_bench_flags_outputs_that_differ():
    # a run whose packed or patched outputs are off the masked dense model beyond the dtype's limit is
    # flagged (log, JSON, caption): its times are no valid comparison
    from bsbert.bench import MAX_REL_DIFF_OK, _outputs_check, table

    said = []
    runs = [{"seq": 8, "max_rel_diff_packed": 1e-6, "max_rel_diff_patched": 2e-6},
            {"seq": 16, "max_rel_diff_packed": 1e-6, "max_rel_diff_patched": 3e-3}]
    r = {"dtype": "float32", "runs": runs}
    _outputs_check(r, said.append)
    assert r["outputs_ok"] is False and r["outputs_limit"] == MAX_REL_DIFF_OK["float32"]
    assert r["outputs_off"] == [{"seq": 16, "variant": "patched", "max_rel_diff": 3e-3}] and "DIFFER" in said[-1]
    nan = {"dtype": "bfloat16", "runs": [dict(runs[0], max_rel_diff_patched=float("nan"))]}
    _outputs_check(nan, said.append)
    assert nan["outputs_ok"] is False  # (a NaN is never within the limit)
    ok = {"dtype": "bfloat16", "runs": [dict(runs[1], max_rel_diff_patched=3.2e-2)]}
    _outputs_check(ok, said.append)
    assert ok["outputs_ok"] is True
    r.update(device="cpu", batch=1, threads=2, model="m", device_name="cpu", runs=[dict(runs[1], dense_ms=1,
             packed_ms=1, patched_ms=1, speedup_vs_dense=1, packing_speedup_vs_dense=1, speedup_vs_packing=1,
             flop_bound_speedup=1, remaining_bound_ms=1, patched_over_bound=1, patched_best_over_bound=1,
             patched_paired_over_bound={"median": 1})])
    assert "OUTPUTS DIFFER" in table(r).caption
    # dense / remaining FLOPs is a speedup bound, "bound ms" the time one
    headers = [c.header for c in table(r).columns]
    assert "speedup bound" in headers and "bound ms" in headers and "FLOP bound" not in headers


def test_bench_record_is_strict_json_and_says_where_it_ran(tmp_path):
    # a wrong run's max_rel_diff (inf) was written as Infinity, which JSON readers other than Python's refuse;
    # and every result file said only "AMD EPYC", with no commit, SIMD path or capping variables
    import os
    import subprocess

    import torch

    import bsbert
    from bsbert.bench import _finite, _provenance

    res = {"a": float("inf"), "b": [1.0, float("nan")], "c": {"d": -float("inf"), "e": 2}}
    text = json.dumps(_finite(res), allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None, "e": 2}}
    prov = _provenance(torch.device("cpu"))
    assert set(prov) >= {"commit", "cpu_isa", "cpu_id", "env"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(bsbert.__file__)))
    head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert prov["commit"].startswith(head.stdout.strip())
    from bsbert import _ext

    if _ext.available():
        assert prov["cpu_isa"] == _ext.load().cpu_isa()
