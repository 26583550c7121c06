"""The submodules the README calls as attributes (`bsbert.nvtx.ranges(model)`,
`bsbert.packed_export.packed_bert(model)`, `bsbert.models.load_local(...)`) work after a plain
`import bsbert`, without `import bsbert` importing them up front."""
import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess:
    # a fresh interpreter: in the test process other tests have already imported these submodules
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_submodules_reachable_after_plain_import():
    r = _run("import sys, bsbert\n"
             "lazy = ('nvtx', 'packed_export', 'models', 'hugepages', 'timing')\n"
             "assert not [m for m in lazy if 'bsbert.' + m in sys.modules], 'imported eagerly'\n"
             "assert all(m in dir(bsbert) for m in lazy)\n"
             "bsbert.nvtx.ranges; bsbert.packed_export.packed_bert; bsbert.models.load_local\n"
             "bsbert.hugepages; bsbert.timing.cpu_peak_gflops\n"
             "assert bsbert.nvtx is sys.modules['bsbert.nvtx']\n"
             "print('ok')")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


def test_unknown_attribute_still_raises():
    import bsbert

    assert not hasattr(bsbert, "no_such_thing")
    try:
        bsbert.no_such_thing
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
