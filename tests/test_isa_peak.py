"""The CPU instruction-peak probe (csrc/cpu/isa_peak.cpp, bsbert.timing.cpu_peak_gflops).

No rate is asserted (timing belongs to benchmarks); what is checked is what the figure stands on: every
thread reports, the instruction named is the one this CPU level runs, bad arguments are clear errors,
and the compiled loops are what the FLOP count assumes (register-only multiply-adds, a whole number of
chains per step), read from the extension's own disassembly.
"""
import math
import re
import shutil
import subprocess

import pytest
import torch

from bsbert import _ext
from bsbert.timing import cpu_peak_gflops

_C = _ext.load(warn=False)
pytestmark = [pytest.mark.skipif(_C is None or not hasattr(_C, "cpu_peak_gflops"), reason="bsbert._C not built"),
              # (tests/test_bf16_widened.py checks what info says there instead)
              pytest.mark.skipif(_ext.isa_emulated(), reason="emulated AVX-512 test build: no native loop to time")]

ISA = _C.cpu_isa() if _C is not None else "portable"
SIMD = ISA in ("avx2", "avx512", "avx512_bf16")


@pytest.mark.skipif(not SIMD, reason="no AVX2/AVX-512 here")
def test_every_thread_reports_a_rate():
    r = cpu_peak_gflops(torch.float32, seconds=0.02)
    assert r is not None and r["kind"] == "fp32"
    assert r["threads"] == torch.get_num_threads() == len(r["per_thread"])
    assert all(math.isfinite(x) and x > 0 for x in r["per_thread"]), r
    assert r["gflops"] == pytest.approx(sum(r["per_thread"]))
    assert r["instruction"] == ("vfmadd*ps ymm" if ISA == "avx2" else "vfmadd*ps zmm")


def test_bf16_times_vdpbf16ps_only_where_the_cpu_has_it():
    r = cpu_peak_gflops(torch.bfloat16, seconds=0.02)
    if ISA == "avx512_bf16":
        assert r is not None and r["instruction"] == "vdpbf16ps zmm" and r["kind"] == "bf16" and not r["widened"]
    elif SIMD:  # bf16 runs widened to fp32 FMAs there: that is its ceiling
        assert r is not None and r["kind"] == "fp32" and r["widened"] and r["instruction"].startswith("vfmadd")
    else:
        assert r is None


def test_isa_cap_selects_the_avx2_loop(monkeypatch):
    if ISA not in ("avx512", "avx512_bf16"):
        pytest.skip("needs AVX-512 to cap it")
    monkeypatch.setenv("BSBERT_CPU_ISA", "avx2")
    assert cpu_peak_gflops(torch.float32, seconds=0.02)["instruction"] == "vfmadd*ps ymm"
    # no vdpbf16ps below avx512_bf16: bf16 is widened, and its peak is the fp32 FMA's
    r = cpu_peak_gflops(torch.bfloat16, seconds=0.02)
    assert r["instruction"] == "vfmadd*ps ymm" and r["kind"] == "fp32" and r["widened"]
    with pytest.raises(RuntimeError, match="needs avx512_bf16.*avx2"):
        _C.cpu_peak_gflops("bf16", 0.01)
    monkeypatch.setenv("BSBERT_CPU_ISA", "avx512")
    r = cpu_peak_gflops(torch.bfloat16, seconds=0.02)
    assert r["instruction"] == "vfmadd*ps zmm" and r["widened"]


def test_nothing_to_time_is_none_not_an_error(monkeypatch):
    assert cpu_peak_gflops(torch.float16) is None
    monkeypatch.setenv("BSBERT_CPU_ISA", "portable")
    assert cpu_peak_gflops(torch.float32, seconds=0.01) is None
    assert cpu_peak_gflops(torch.bfloat16, seconds=0.01) is None
    with pytest.raises(RuntimeError, match="no SIMD multiply-add to time"):
        _C.cpu_peak_gflops("fp32", 0.01)


@pytest.mark.parametrize("kind, seconds, match", [("fp16", 0.01, "kind must be 'fp32' or 'bf16', got 'fp16'"),
                                                  ("fp32", 0.0, "seconds must be in"),
                                                  ("fp32", -1.0, "seconds must be in"),
                                                  ("fp32", 120.0, "seconds must be in")])
def test_bad_arguments_are_named(kind, seconds, match):
    with pytest.raises(RuntimeError, match=match):
        _C.cpu_peak_gflops(kind, seconds)


# The loops' FLOP count is steps x chains x FLOPs per instruction: the compiled loop must issue only
# register-to-register multiply-adds, a whole number of chains of them per step.
LOOPS = [("dot_bf16_batch", "vdpbf16ps", 24), ("fma_zmm_batch", "vfmadd", 24), ("fma_ymm_batch", "vfmadd", 12)]


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not found")
@pytest.mark.parametrize("func, mnemonic, chains", LOOPS)
def test_compiled_loop_is_register_only_multiply_adds(func, mnemonic, chains):
    so = _C.__file__
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", so], capture_output=True, text=True,
                          check=True).stdout
    m = re.search(rf"<bsbert::cpu::\(anonymous namespace\)::{func}\(long\)>:\n(.*?)\n\n", text, re.S)
    assert m, f"{func} not found in {so}"
    lines = []  # (address, instruction)
    for ln in m.group(1).splitlines():
        addr, _, op = ln.strip().partition(":\t")
        if op:
            lines.append((int(addr, 16), op.strip()))
    madds = [op for _, op in lines if op.startswith(mnemonic)]
    assert not [op for op in madds if "(" in op], "a multiply-add reads memory: the probe would time loads too"
    if mnemonic != "vdpbf16ps":  # compiled beside the bf16 loop, it must still run on CPUs without bf16
        assert not [op for _, op in lines if "bf16" in op], f"{func} uses a bf16 instruction"
    # the timed loop: from a backward branch's target to the branch, chains multiply-adds per step
    loops = []
    for addr, op in lines:
        jm = re.match(r"j\w+\s+([0-9a-f]+) <", op)
        if jm and int(jm.group(1), 16) < addr:
            loops.append([o for a, o in lines if int(jm.group(1), 16) <= a <= addr and o.startswith(mnemonic)])
    body = max(loops, key=len, default=[])
    assert body and len(body) % chains == 0, (func, [len(lp) for lp in loops])
