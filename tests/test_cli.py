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


def test_info(capsys):
    from bsbert.info import main as info_main

    info_main()
    out = capsys.readouterr().out
    assert "cpu/float32/torch-dense" in out and "extension" in out
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
    from bsbert.bench import _apply_isa_peak, table

    def results(isa_start, isa_end, dense_start, dense_end):
        run = {"seq": 8, "remaining_flops": 2e9, "patched_ms": 5.0}
        return {"runs": [run], "dense_gemm_start": {"gflops": dense_start}, "dense_gemm_end": {"gflops": dense_end}}

    said = []
    peak = {"gflops": 1000.0, "instruction": "vdpbf16ps zmm", "threads": 2}
    r = results(None, None, 900.0, 880.0)
    _apply_isa_peak(r, peak, dict(peak, gflops=980.0), said.append)
    assert r["steady"] and not said and r["isa_peak"]["gflops"] == 1000.0
    assert r["runs"][0]["isa_peak_bound_ms"] == 2.0 and r["runs"][0]["patched_over_isa_peak_bound"] == 2.5
    r = results(None, None, 900.0, 880.0)
    _apply_isa_peak(r, dict(peak, gflops=926.0), dict(peak, gflops=1019.0), said.append)  # slow start
    assert not r["steady"] and "not steady" in said[-1] and r["isa_peak"]["gflops"] == 1019.0
    r = results(None, None, 899.0, 755.0)  # the dense probe fell within the run
    _apply_isa_peak(r, peak, peak, said.append)
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
