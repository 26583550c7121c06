"""`python -m bsbert.info` says why a feature is off: huge pages without the block-sparse CPU kernel, the
instruction peak under a BSBERT_CPU_ISA cap."""
import os
import subprocess
import sys

import pytest

from bsbert import _ext, info
from bsbert.timing import cpu_peak_gflops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_without_the_extension_no_huge_pages_and_no_peak():
    """Huge pages hold only the block-sparse CPU kernel's packed weights: without the extension there are
    none, which info once answered with "yes". A child process: this one has bsbert._C loaded."""
    code = ("import sys; sys.modules['bsbert._C'] = None  # import raises ImportError\n"
            "from bsbert import info\nprint(info._huge_pages())\nprint(info._cpu_peak())\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    huge, peak = r.stdout.strip().splitlines()[-2:]
    assert huge.startswith("no: the block-sparse CPU kernel is unavailable (C++ extension unavailable: "), huge
    assert peak == "not measurable here (no extension)", peak


@pytest.mark.skipif(not _ext.has_op("bsr_linear"), reason=f"no block-sparse CPU kernel: {_ext.reason_unavailable()}")
def test_huge_pages_switched_off(monkeypatch):
    monkeypatch.setenv("BSBERT_HUGEPAGES", "Off")
    assert info._huge_pages() == "no: BSBERT_HUGEPAGES=Off"


def _own_isa():
    """The CPU level the kernels run at with no cap (None: no extension with the peak probe, or a cap set)."""
    mod = _ext.load(warn=False)
    if mod is None or not hasattr(mod, "cpu_peak_gflops") or "BSBERT_CPU_ISA" in os.environ:
        return None
    return mod.cpu_isa()


OWN_ISA = _own_isa()


@pytest.mark.skipif(OWN_ISA in (None, "portable"),
                    reason="needs the extension, AVX2 or AVX-512, and BSBERT_CPU_ISA unset")
def test_the_peak_line_names_the_isa_cap(monkeypatch):
    """Under BSBERT_CPU_ISA=portable on a CPU with AVX2 the peak is not measurable because of the cap,
    not for want of an extension or of AVX2 (what the line once said)."""
    monkeypatch.setenv("BSBERT_CPU_ISA", "portable")
    assert cpu_peak_gflops(seconds=0.01) is None  # the kernels read the cap per call
    line = info._cpu_peak()
    assert line == (f"not measurable here (capped by BSBERT_CPU_ISA=portable: no SIMD multiply-add to time below "
                    f"AVX2; this CPU has {OWN_ISA})"), line
    assert os.environ["BSBERT_CPU_ISA"] == "portable"  # put back after asking for the CPU's own level


@pytest.mark.skipif(not _ext.has_op("bsr_linear"), reason=f"no block-sparse CPU kernel: {_ext.reason_unavailable()}")
def test_info_says_which_kernel_serves_a_few_rows(monkeypatch):
    """One to three rows: the GEMV kernel where it is on (by default at avx2/portable, where it was measured),
    the register tiles where it is off, and why (the switch, or a level where it was not timed)."""
    mod = _ext.load(warn=False)
    monkeypatch.delenv("BSBERT_BSR_GEMV", raising=False)
    line = info._cpu_few_rows(mod)
    if mod.cpu_isa().startswith("avx512"):
        assert "off at this level (not timed here yet; BSBERT_BSR_GEMV=1 turns it on)" in line, line
    else:
        assert line == f"M <= 3 rows on the GEMV kernel at {mod.cpu_isa()} (BSBERT_BSR_GEMV=0: the register tiles)"
    monkeypatch.setenv("BSBERT_BSR_GEMV", "1")
    assert info._cpu_few_rows(mod).startswith("M <= 3 rows on the GEMV kernel at "), info._cpu_few_rows(mod)
    monkeypatch.setenv("BSBERT_BSR_GEMV", "off")
    assert info._cpu_few_rows(mod).endswith("the GEMV kernel is switched off (BSBERT_BSR_GEMV=off)")
    assert info._cpu_few_rows(None) == "no extension"
