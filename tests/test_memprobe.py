"""The CPU peak-memory probe measures what a forward really allocates."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def test_probe_mechanism_sees_a_known_peak():
    code = ("import torch\nfrom bsbert.memprobe import measure_in_process\n"
            "def f():\n    a = torch.ones(100 * 2**20 // 4)\n    b = torch.ones(50 * 2**20 // 4)\n    del a, b\n"
            "print(measure_in_process(f))\n")
    from bsbert.memprobe import ENV

    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **ENV}, capture_output=True,
                         text=True, check=True).stdout
    mb = float(out.strip().splitlines()[-1])
    assert 145 <= mb <= 170, mb  # 150 MB live at the peak


def test_probe_small_models_patched_uses_less():
    from bsbert.memprobe import probe

    dense = probe("dense", 2, 64, "float32", small=True)
    patched = probe("patched", 2, 64, "float32", small=True)
    assert dense is not None and patched is not None and 0 < patched < dense


def test_a_failed_child_says_why():
    """A child that fails (here: argparse refusing --which; in a sandbox: PermissionError on
    /proc/self/clear_refs) gives None and its return code and last stderr line, not a bare None."""
    from bsbert.memprobe import probe_with_reason

    mb, why = probe_with_reason("nosuch", 1, 8, "float32", small=True)
    assert mb is None and "exited with code 2" in why and "invalid choice: 'nosuch'" in why, why


def test_a_timeout_is_a_reason_not_an_exception():
    """subprocess.TimeoutExpired once ended a whole sweep; now it is said like any other failure."""
    from bsbert import memprobe

    assert memprobe.probe("dense", 1, 8, "float32", small=True, timeout=0.01) is None
    assert memprobe.probe_with_reason("dense", 1, 8, "float32", small=True, timeout=0.01) == (
        None, "the child process ran past 0.01 s")


def test_the_child_runs_the_callers_bsbert_not_one_in_the_cwd(tmp_path, monkeypatch):
    """`python -m` puts the cwd first on the child's path: a ./bsbert there (a checkout root, after a
    non-editable install) once answered for the bsbert the caller runs."""
    from bsbert.memprobe import probe

    (tmp_path / "bsbert").mkdir()
    (tmp_path / "bsbert" / "__init__.py").write_text("")
    (tmp_path / "bsbert" / "memprobe.py").write_text('print(\'{"peak_activation_mb": -1}\')\n')
    monkeypatch.chdir(tmp_path)
    # the real child refuses --which nosuch (None); the impostor would answer -1
    assert probe("nosuch", 1, 8, "float32", small=True) is None


def test_sweep_says_why_a_probe_gave_nothing(tmp_path, monkeypatch):
    """run_sweep(memory=True) keeps a failed probe's reason: in the JSON row and in a note under the table."""
    import io
    import json

    from rich.console import Console

    from bsbert import memprobe, models, sweep
    from tests.helpers import tiny_config, tiny_pruned

    why = "the child process exited with code 1: PermissionError: [Errno 13] Permission denied"
    monkeypatch.setattr(memprobe, "probe_with_reason",
                        lambda which, *a, **k: (None, why) if which == "dense" else (12.0, ""))
    # tiny models: the sweep's bookkeeping is under test, not BERT-large's speed
    monkeypatch.setattr(models, "dense_bert_large", lambda dtype, **kw: models.build_model(
        tiny_config(), task="qa", seed=0).to(dtype))
    monkeypatch.setattr(models, "seed_like_model", lambda dtype, **kw: tiny_pruned().to(dtype))
    res = sweep.run_sweep(batches=(1,), seqs=(8,), dtypes=["float32"], repeats=1, warmup_s=0, memory=True,
                          out_dir=str(tmp_path), console=Console(file=io.StringIO()))
    row = json.loads(open(res["json"]).read())["rows"][0]
    assert row["dense_peak_act_mb"] is None and row["dense_peak_act_reason"] == why
    assert row["patched_peak_act_mb"] == 12.0 and row["patched_peak_act_reason"] == ""
    out = io.StringIO()
    Console(file=out, width=400).print(sweep.sweep_table(res))
    text = " ".join(out.getvalue().split())  # (rich wraps the note at the table's width)
    assert f"peak act MB not measured for dense float32 b1 s8: {why}" in text, text



def test_the_child_runs_the_callers_threads_and_plan(tmp_path, monkeypatch):
    """The child once patched with the block-density heuristic on torch's default threads whatever the
    sweep had timed: now it takes the caller's thread count and plan (and says what it ran)."""
    import json

    import bsbert
    from bsbert import memprobe, models

    parent = bsbert.patch(models.seed_like_model(num_hidden_layers=2), backend="torch-dense", select="heuristic",
                          progress=False, keep_original=False)
    n = sum(len(layer.linears) for layer in parent.bsbert_plan.layers)
    seen = {}

    def fake_run_child(cmd, timeout):
        seen["cmd"] = list(cmd)
        with open(cmd[cmd.index("--plan") + 1]) as f:  # the file exists while the child runs
            seen["plan"] = json.load(f)
        return 1.0, ""

    monkeypatch.setattr(memprobe, "_run_child", fake_run_child)
    assert memprobe.probe_with_reason("patched", 1, 8, "float32", small=True, threads=1,
                                      plan=parent.bsbert_plan) == (1.0, "")
    cmd = seen["cmd"]
    assert cmd[cmd.index("--threads") + 1] == "1"
    assert not os.path.exists(cmd[cmd.index("--plan") + 1])  # removed after the child
    # the real child, given that plan and one thread: it ran both, and says so
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(seen["plan"]))
    cmd[cmd.index("--plan") + 1] = str(plan_file)
    out = subprocess.run(cmd, env={**os.environ, **memprobe.ENV}, capture_output=True, text=True,
                         check=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res["threads"] == 1 and res["linear_backends"] == {"torch-dense": n}, res
