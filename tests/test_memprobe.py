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
