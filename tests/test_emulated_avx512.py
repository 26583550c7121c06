"""The emulated AVX-512 test build (setup.py BSBERT_EMULATE_AVX512=1, scripts/test_emulated_avx512.sh).

The AVX-512 kernels are what a Zen 4/5 or Xeon user runs, and CI's CPU has no AVX-512. The script builds a
second copy of the extension whose AVX-512 code goes through SIMDe (csrc/cpu/avx512_intrinsics.h) and runs
the CPU kernel tests against it. These tests check that such a run really is one: the emulated extension
is the one loaded, it offers the AVX-512 levels to the ISA-parametrised tests, and it holds no AVX-512
instruction (else it would crash on the CPU it is meant for). In a normal build they check the opposite:
the extension never claims to be emulated.
"""
import os
import shutil
import subprocess

import pytest

from bsbert import _ext
from tests.helpers import cpu_isa_levels

EXPECT_EMULATED = os.environ.get("BSBERT_EXPECT_EMULATED_AVX512") == "1"
_C = _ext.load(warn=False)
needs_ext = pytest.mark.skipif(_C is None, reason="extension not built")


@needs_ext
def test_a_normal_build_is_not_emulated():
    if EXPECT_EMULATED:
        pytest.skip("this is the emulated run")
    assert not _ext.isa_emulated() and not _C.cpu_isa_emulated()


emulated_only = pytest.mark.skipif(not EXPECT_EMULATED, reason="only in scripts/test_emulated_avx512.sh's run")


@needs_ext
@emulated_only
def test_the_emulated_extension_is_the_one_loaded():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.dirname(os.path.abspath(_C.__file__)) == os.path.join(here, "bsbert"), _C.__file__
    assert _ext.isa_emulated() and _C.cpu_isa() == "avx512_bf16"
    # the ISA-parametrised kernel tests then cover both AVX-512 levels
    assert {"avx512", "avx512_bf16"} <= set(cpu_isa_levels(bf16_level=True))


@needs_ext
@emulated_only
def test_the_emulated_extension_has_no_avx512_instruction():
    if shutil.which("objdump") is None:
        pytest.skip("no objdump")
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True,
                         check=True).stdout
    # zmm registers, opmask registers and the bf16 dot product appear only in AVX-512 code
    found = [line.strip() for line in asm.splitlines() if "zmm" in line or "%k" in line or "vdpbf16ps" in line]
    assert not found, found[:10]


@needs_ext
@emulated_only
def test_info_says_emulated():
    from bsbert.info import collect

    assert "EMULATED by SIMDe" in collect()["extension"]
