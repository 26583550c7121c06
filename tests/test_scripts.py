"""The scripts under scripts/: their pure logic (GPU parts mocked), their argument checks (a usage error,
exit code 2, before any model is built) and the shell scripts' plumbing. Tiny models only."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import runpy
import shutil
import subprocess
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

import bsbert
from bsbert import _ext, models

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load(name: str):
    """scripts/<name>.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_script(name: str, args, capsys) -> tuple[int, str]:
    """Run scripts/<name>.py as __main__ in this process (fast: torch is imported once); its exit code, stderr."""
    with mock.patch.object(sys, "argv", [f"{name}.py", *args]):
        try:
            runpy.run_path(str(SCRIPTS / f"{name}.py"), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


class _Built(Exception):
    """Raised by the stand-in model builder: the script got past its argument checks."""


# --- bench_triton: the --tiles choice reaches every row -------------------------------------------------------

def test_bench_triton_every_row_gets_the_tiles_choice():
    """Each row's measured tile dict overwrote `tiles` (the --tiles choice), so later rows were asked for the
    previous row's tiles: block-16 rows got block-32 tile names and failed."""
    bench_triton = load("bench_triton")
    from bsbert.triton import _bench

    calls = []

    def fake_bench_linear(m, n, k, d, block=32, tiles=None):
        calls.append((block, m, tiles))
        names = tiles or (f"t{block}a", f"t{block}b")
        return {"real_density": d, "bsbert_ms": 1.0, "cublas_ms": 1.0, "torch_bsr_ms": None,
                "triton_graph_ms": 1.0, "cublas_graph_ms": 1.0, "cuda_graph_ms": 1.0,
                "cuda_tiles_graph_ms": {t: 1.0 for t in names},
                **({"cuda_error": "boom"} if block == 16 and m == 768 else {})}

    props = types.SimpleNamespace(name="FakeGPU")
    argv = ["--blocks", "32,16", "--ms", "384,768", "--nk", "1024x1024", "--densities", "0.5", "--no-attention"]
    for extra, want in (([], None), (["--tiles", "128x4"], ("128x4",))):
        calls.clear()
        out = io.StringIO()
        with mock.patch.object(torch.cuda, "is_available", lambda: True), \
                mock.patch.object(torch.cuda, "get_device_properties", lambda i: props), \
                mock.patch.dict(sys.modules, {"triton": types.SimpleNamespace(__version__="x")}), \
                mock.patch.object(_bench, "bench_linear", fake_bench_linear), contextlib.redirect_stdout(out):
            rc = bench_triton.main(argv + extra)
        assert [c[:2] for c in calls] == [(32, 384), (32, 768), (16, 384), (16, 768)]
        assert all(c[2] == want for c in calls), calls
        assert rc == 1  # the one error row; its text names the block
        assert "- linear block=16 M=768 N=1024 K=1024 d=0.5 cuda_error: boom" in out.getvalue()


# --- model_ab: each switch's arms differ -------------------------------------------------------------------------

@pytest.mark.skipif(not _ext.has_op("bsr_linear_add_layer_norm"), reason="needs the extension's fused tail")
def test_model_ab_fused_tail_arms_run_different_ops():
    """With the fused encoder (patch's default) both fused-tail arms ran the encoder op: an A/B of nothing.
    model_ab now patches fused-tail without it, and refuses a model that has it."""
    from tests.helpers import OpCounter, inputs, tiny_pruned

    model_ab = load("model_ab")
    m = tiny_pruned(heads=(2, 4), ffn=(100, 37)).eval()
    bsbert.patch(m, tokens=16, progress=False, backend="cpu-bsr", attention="cpu", check_model=False)
    with pytest.raises(SystemExit, match="fused encoder is installed"):
        model_ab.toggles(m, "fused-tail")
    bsbert.unpatch(m)
    bsbert.patch(m, tokens=16, progress=False, backend="cpu-bsr", attention="cpu", check_model=False,
                 **model_ab.PATCH_KWARGS["fused-tail"])
    set_on, count = model_ab.toggles(m, "fused-tail")
    assert count == 4  # two output projections per layer
    inp = inputs(1, 16)
    ops, out = {}, {}
    for on in (False, True):
        set_on(on)
        c = OpCounter()
        with torch.inference_mode(), c:
            out[on] = m(**inp).start_logits
        ops[on] = c.calls
    assert ops[True]["bsbert::bsr_linear_add_layer_norm"] == 4 and ops[True]["bsbert::add_layer_norm"] == 0
    assert ops[False]["bsbert::bsr_linear_add_layer_norm"] == 0 and ops[False]["bsbert::add_layer_norm"] == 4
    assert torch.equal(out[False], out[True])  # what main asserts before timing


# --- op_breakdown: aten GEMMs and SDPA are timed and counted -----------------------------------------------------

def test_op_breakdown_counts_torch_dense_and_sdpa():
    """Linears on torch-dense and torch-sdpa attention were neither timed nor counted: forward/bound inflated."""
    op_breakdown = load("op_breakdown")
    x, w, b = torch.randn(1, 16, 64), torch.randn(96, 64), torch.randn(96)
    q = torch.randn(2, 3, 16, 8)
    t = op_breakdown.OpTimer()
    with torch.inference_mode(), t:
        torch.nn.functional.linear(x, w, b)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    flops = {name: f for name, (_, f, _) in t.acc.items()}
    assert sum(f for name, f in flops.items() if name in op_breakdown.GEMMS) == 2 * 16 * 64 * 96
    assert sum(f for name, f in flops.items() if name in op_breakdown.SDPAS) == 4 * 2 * 3 * 16 * 16 * 8


# --- argument checks ---------------------------------------------------------------------------------------------

BAD_ARGS = [
    ("after_patch_transient", ["128", "bf16"]),
    ("after_patch_transient", ["-5"]),
    ("phase_log", ["--seconds", "0"]),
    ("thread_scaling", ["--rounds", "0", "--threads", "2"]),
    ("bench_cpu_attention", ["--heads", "0"]),
    ("bench_cpu_attention", ["--seq", "0"]),
    ("bench_cpu_attention", ["--rounds", "0"]),
    ("bench_cpu_attention", ["--threads", "0"]),
    ("cpu_attention_fp32_errors", ["--trials", "0"]),
    ("weights_once_vs_per_thread", ["128", "1.5"]),
    ("weights_once_vs_per_thread", ["128", "0"]),
    ("op_breakdown", ["0"]),
    ("op_breakdown", ["128", "10", "bf16"]),
    ("contention", ["--repeats", "0"]),
    ("linears_hot_vs_model", ["0"]),
    ("profile_compare", ["--steps", "0"]),
]


@pytest.mark.parametrize("name,args", BAD_ARGS, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_arguments_are_usage_errors(name, args, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was built before the arguments were checked")
    monkeypatch.setattr(models, "seed_like_model", no_model)
    code, err = run_script(name, args, capsys)
    assert code == 2, err
    assert "error:" in err and "Traceback" not in err


def test_bad_argument_in_a_subprocess():
    """The same as a user sees it: exit code 2, a usage line, no traceback."""
    r = subprocess.run([sys.executable, str(SCRIPTS / "weights_once_vs_per_thread.py"), "8", "1.5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "usage:" in r.stderr and "Traceback" not in r.stderr
    assert "block density in (0, 1]" in r.stderr


def test_op_breakdown_shapes_alone_parses(capsys, monkeypatch):
    """`op_breakdown.py --shapes` alone failed with int('--shapes'): it gets to building the model now."""
    def built(*a, **k):
        raise _Built
    monkeypatch.setattr(models, "seed_like_model", built)
    with pytest.raises(_Built):
        run_script("op_breakdown", ["--shapes"], capsys)


# --- a --seq longer than the position table: refused before patching ---------------------------------------------

def _tiny_seed_like(seed=0, dtype=torch.float32, task="qa", **over):
    cfg = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, vocab_size=100,
               max_position_embeddings=64)
    cfg.update(over)
    return models.build_model(models.bert_large_config(**cfg), task=task, seed=seed).to(dtype)


SEQ_65 = [
    ("contention", ["--seq", "65", "--busy", "0", "--threads", "1", "--repeats", "1"]),
    ("model_ab", ["fused-tail", "--seq", "65"]),
    ("after_patch_transient", ["65", "float32"]),
    ("op_breakdown", ["65"]),
    ("linears_hot_vs_model", ["65"]),
    ("phase_log", ["--seq", "65", "--seconds", "1"]),
    ("thread_scaling", ["--seq", "65", "--threads", "2"]),
    ("profile_compare", ["--seq", "65", "--small"]),
]


@pytest.mark.parametrize("name,args", SEQ_65, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_seq_longer_than_positions_is_refused(name, args, capsys, monkeypatch):
    """A --seq past the position table failed in the first forward after the (long) patch, or was silently
    capped (contention.py); now a usage error naming the limit, before patching."""
    def no_patch(*a, **k):
        raise AssertionError("patched before the sequence length was checked")
    monkeypatch.setattr(models, "seed_like_model", _tiny_seed_like)
    monkeypatch.setattr(bsbert, "patch", no_patch)
    code, err = run_script(name, args, capsys)
    assert code == 2, err
    assert "at most 64 tokens" in err and "Traceback" not in err


# --- cpu_attention_bf16_errors: one column per path the CPU runs -------------------------------------------------

@pytest.mark.skipif(not _ext.has_op("pruned_attention"), reason="needs the extension's attention kernel")
def test_cpu_attention_bf16_errors_columns_are_paths_the_cpu_runs(capsys, monkeypatch):
    """BSBERT_CPU_ISA only lowers the level: on an AVX2 CPU the "widen" (avx512) and "dot" (avx512_bf16)
    columns both ran the AVX2 path. Each column is now a level this CPU has, and each says which path ran."""
    from tests.helpers import cpu_isa_levels

    script = load("cpu_attention_bf16_errors")
    monkeypatch.setattr(script, "SHAPES", [(9, 2, 32, 1.0)])
    monkeypatch.delenv("BSBERT_CPU_ISA", raising=False)
    script.main()
    out = capsys.readouterr().out
    levels = cpu_isa_levels(bf16_level=True)
    ran = dict(line[len("- BSBERT_CPU_ISA="):].split(": kernel path ") for line in out.splitlines()
               if line.startswith("- BSBERT_CPU_ISA="))
    assert {k: v.split()[0] for k, v in ran.items()} == {isa: isa for isa in levels}
    header = next(line for line in out.splitlines() if line.startswith("| S |"))
    for isa in ("avx2", "avx512", "avx512_bf16"):
        assert (f"| {isa} " in header) == (isa in levels), header
    assert "BSBERT_CPU_ISA" not in os.environ


# --- shell scripts -----------------------------------------------------------------------------------------------

def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True,
                   capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_other_torch_clone_has_binary_changes_and_untracked_files(tmp_path):
    """`git diff HEAD | git apply` failed on a changed binary file and left untracked files behind."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPTS / "test_other_torch.sh", repo / "scripts")
    (repo / "a.txt").write_text("a\n")
    (repo / "blob.bin").write_bytes(b"\x00\x01\x02")
    (repo / ".gitignore").write_text("build/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "init")
    (repo / "blob.bin").write_bytes(b"\x00\x09\x02\x07")
    (repo / "a.txt").write_text("a\nb\n")
    (repo / "pkg").mkdir()
    (repo / "pkg" / "new_module.py").write_text("x = 1\n")
    (repo / "build").mkdir()
    (repo / "build" / "junk").write_text("ignored\n")
    env = {**os.environ, "CLONE_ONLY": "1", "KEEP": "1", "TMPDIR": str(tmp_path)}
    r = subprocess.run(["bash", "scripts/test_other_torch.sh", "torch"], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    src = Path(next(line for line in r.stdout.splitlines() if line.startswith("clone only: "))[12:])
    assert (src / "blob.bin").read_bytes() == b"\x00\x09\x02\x07"
    assert (src / "a.txt").read_text() == "a\nb\n"
    assert (src / "pkg" / "new_module.py").read_text() == "x = 1\n"
    assert not (src / "build").exists()  # ignored files stay behind


def test_cpu_results_names_the_failed_step(tmp_path):
    """Under set -e a failed step stopped the script silently (its output goes to files)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\nexit 3\n")
    (fake / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", str(SCRIPTS / "cpu_results.sh")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert "in step: machine" in r.stderr, r.stderr
