"""bsbert without its compiled extension: import warns (never fails), `patch` falls back to pure-torch
backends with the masked dense model's outputs, and `python -m bsbert.info` says why the C++ backends are
off. Each case runs in a child process, because this process has already loaded bsbert._C (the
extension's ops stay registered for the life of a process)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what stands in for a missing or mismatched extension, run before bsbert is imported
MISSING = "import sys; sys.modules['bsbert._C'] = None  # import raises ImportError\n"
MISMATCHED = ("import torch; torch.__version__ = '0.0.1'  # the extension was built for another torch\n")


def _run(prelude: str, body: str) -> subprocess.CompletedProcess:
    code = prelude + textwrap.dedent(body)
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # the import warning is printed, not filtered
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


PATCH_AND_COMPARE = """
import copy, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import bsbert
    from bsbert import _ext
    _ext.load()
assert any(issubclass(w.category, RuntimeWarning) and "pure-torch fallbacks" in str(w.message) for w in caught), \\
    [str(w.message) for w in caught]
assert not _ext.available() and _ext.reason_unavailable()
from tests.helpers import inputs, rel_err, tiny_pruned
model = tiny_pruned()
ref_model = copy.deepcopy(model)
inp = inputs(pad_from=20)  # padding in the last sequence
bsbert.patch(model, progress=False)
with torch.inference_mode():
    err = rel_err(ref_model(**inp), model(**inp))
assert err < 1e-5, err
print("PLAN", model.bsbert_plan.table(37))
print("OK", err)
"""


def test_missing_extension_warns_and_patch_falls_back_with_the_same_outputs():
    r = _run(MISSING, PATCH_AND_COMPARE)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout
    plan = r.stdout.split("PLAN", 1)[1]
    assert "cpu-bsr" not in plan, plan  # no layer was given a backend that needs the extension


def test_extension_for_another_torch_is_refused_with_the_reason():
    r = _run(MISMATCHED, """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from bsbert import _ext
            assert _ext.load() is None
        print(_ext.reason_unavailable())
        assert any("pure-torch fallbacks" in str(w.message) for w in caught)
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "built against torch" in r.stdout and "0.0.1" in r.stdout and "rebuild" in r.stdout


def test_info_says_which_backends_work_without_the_extension():
    r = _run(MISSING, """
        import runpy
        runpy.run_module("bsbert.info", run_name="__main__")
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    ext = next(line for line in lines if line.strip().startswith("extension:"))
    assert "unavailable" in ext and "bsbert._C could not be imported" in ext
    cpu_bsr = next(line for line in lines if line.strip().startswith("cpu/float32/cpu-bsr"))
    assert "no: C++ extension unavailable" in cpu_bsr
    assert any(line.strip().startswith("cpu/float32/torch-dense") and line.rstrip().endswith("yes")
               for line in lines)
