"""Static checks of the CUDA kernels, no GPU needed: compile csrc/cuda/*.cu to cubin for sm_80 and sm_90,
then check ptxas' resource report (no spills, no stack frame for the tensor-core kernels) and the SASS
(tensor-core HMMA/HGMMA, ldmatrix LDSM and cp.async LDGSTS present in every tensor-core kernel).

The .cu files are compiled with -DBSBERT_KERNELS_ONLY: kernels only, no torch headers and no host code, so
the four compiles take seconds. Skips when nvcc (or the CUDA headers) is missing; the SASS checks also skip
when no cuobjdump is found (toolkit, PATH, or the copy bundled with triton).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bsbert.ops.linear_backends import CudaBsr

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCHS = ("sm_80", "sm_90a")  # the default build's targets (setup.py: 8.0;9.0a)

# file -> (regex of the tensor-core kernels' names, how many of them, other kernels allowed)
KERNELS = {
    # fp16 + bf16 for every tile configuration the Python side can force (CudaBsr.TILES mirrors the .cu;
    # its "slab..." tiles are bsr_linear_slab_kernel instantiations,
    # and its "wgslab..." tiles bsr_linear_wgmma_kernel instantiations: wgmma on sm_90a, a trap elsewhere)
    "bsr_linear_cuda.cu": ("bsr_linear_(mma|slab|wgmma)_kernel", 2 * sum(len(t) for t in CudaBsr.TILES.values()),
                           ("bsr_linear_f32_kernel",)),
    "pruned_attention_cuda.cu": ("pruned_attention_fwd_kernel", 4, ()),
}


def _toolkit_dirs():
    dirs = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            dirs.append(Path(os.environ[env]))
    dirs.append(Path("/usr/local/cuda"))
    return dirs


def _find_nvcc():
    for d in _toolkit_dirs():
        if (d / "bin" / "nvcc").exists():
            return d / "bin" / "nvcc", d
    which = shutil.which("nvcc")
    if which:  # may be a wrapper; its toolkit is found relative to the real binary
        real = Path(os.path.realpath(which))
        return Path(which), real.parent.parent
    return None, None


def _find_cuobjdump(cuda_home):
    cands = [cuda_home / "bin" / "cuobjdump"] if cuda_home else []
    if shutil.which("cuobjdump"):
        cands.append(Path(shutil.which("cuobjdump")))
    try:
        import triton  # ships cuobjdump/nvdisasm with its NVIDIA backend

        cands.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except Exception:
        pass
    for c in cands:
        if c.exists() and os.access(c, os.X_OK):
            return c
    return None


NVCC, CUDA_HOME = _find_nvcc()
CUOBJDUMP = _find_cuobjdump(CUDA_HOME)


def _has_cuda_headers():
    if CUDA_HOME is None:
        return False
    return any((CUDA_HOME / sub / "cuda_bf16.h").exists()
               for sub in ("include", "targets/x86_64-linux/include", "targets/sbsa-linux/include"))


pytestmark = [
    pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)"),
    pytest.mark.skipif(NVCC is not None and not _has_cuda_headers(), reason="CUDA headers not found"),
]

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(text: str) -> dict:
    """{mangled kernel name: {registers, smem, stack, spill_stores, spill_loads}} from -Xptxas -v output."""
    out, cur = {}, None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = m.group(1)
            out[cur] = {}
            continue
        if cur is None:
            continue
        m = _STACK.search(line)
        if m:
            out[cur].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = _REGS.search(line)
        if m:
            out[cur].update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return out


def parse_sass(text: str) -> dict:
    """{mangled kernel name: SASS text} from cuobjdump -sass."""
    out, cur, buf = {}, None, []
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            if cur:
                out[cur] = "\n".join(buf)
            cur, buf = m.group(1), []
        elif cur:
            buf.append(line)
    if cur:
        out[cur] = "\n".join(buf)
    return out


def _compile(src: str, arch: str, tmp: Path):
    cubin = tmp / f"{Path(src).stem}.{arch}.cubin"
    # -gencode, not -arch: with -arch=sm_90a some nvcc versions also run a plain sm_90 pass
    num = arch.removeprefix("sm_")
    cmd = [str(NVCC), "-std=c++17", "-O3", "--use_fast_math", "-cubin",
           f"-gencode=arch=compute_{num},code={arch}", "-Xptxas", "-v",
           "-diag-suppress=177", "-DBSBERT_KERNELS_ONLY", "-I", str(CSRC), str(CSRC / "cuda" / src),
           "-o", str(cubin)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    return res, cubin, " ".join(cmd)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda_sass")
    jobs = [(src, arch) for src in KERNELS for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:
        results = list(ex.map(lambda j: _compile(j[0], j[1], tmp), jobs))
    return {job: res for job, res in zip(jobs, results)}


CASES = [(src, arch) for src in KERNELS for arch in ARCHS]


@pytest.mark.parametrize("src,arch", CASES)
def test_compiles_without_spills(builds, src, arch):
    res, cubin, cmd = builds[(src, arch)]
    assert res.returncode == 0, f"{cmd}\n{res.stderr[-4000:]}"
    report = parse_ptxas(res.stderr + res.stdout)
    frag, count, others = KERNELS[src]
    mma = {k: v for k, v in report.items() if re.search(frag, k)}
    assert len(mma) == count, f"expected {count} {frag} instantiations for {arch}, got {sorted(report)}"
    for name in report:
        assert re.search(frag, name) or any(o in name for o in others), f"unexpected kernel {name}"
    for name, r in report.items():
        assert r.get("spill_stores", -1) == 0 and r.get("spill_loads", -1) == 0, f"{arch} {name} spills: {r}"
        if re.search(frag, name):
            assert r.get("stack", -1) == 0, f"{arch} {name} uses a stack frame: {r}"
            assert 0 < r.get("registers", 0) <= 255, f"{arch} {name}: {r}"
    # resource summary in the test log (pytest -s / -rA)
    for name, r in sorted(report.items()):
        print(f"{arch} {name[-90:]}: {r}")


@pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not found")
@pytest.mark.parametrize("src,arch", CASES)
def test_sass_uses_tensor_cores(builds, src, arch):
    res, cubin, cmd = builds[(src, arch)]
    assert res.returncode == 0, f"{cmd}\n{res.stderr[-4000:]}"
    dump = subprocess.run([str(CUOBJDUMP), "-sass", str(cubin)], capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0, dump.stderr
    funcs = parse_sass(dump.stdout)
    frag, count, _ = KERNELS[src]
    mma = {k: v for k, v in funcs.items() if re.search(frag, k)}
    assert len(mma) == count, f"expected {count} {frag} kernels in the SASS, got {sorted(funcs)}"
    for name, sass in mma.items():
        if "wgmma_kernel" in name:
            if arch != "sm_90a":  # no wgmma outside sm_90a: the kernel must be the trap, never a silent no-op
                assert re.search(r"\bBPT\.TRAP", sass) and not re.search(r"\bHGMMA", sass), f"{arch} {name}"
                continue
            # warpgroup MMAs reading both operands from shared memory: no ldmatrix needed
            # (W blocks by the copy engine: UTMALDG; the x slab by cp.async: LDGSTS)
            tc, need = r"\bHGMMA\.64x32x16\.F32", (r"\bUTMALDG\.2D", r"\bLDGSTS\.")
        else:
            tc = r"\bHMMA\.16816\.F32" if arch == "sm_80" else r"\b(HMMA\.16816\.F32|HGMMA)"
            need = (r"\bLDSM\.", r"\bLDGSTS\.")
        n_tc = len(re.findall(tc, sass))
        assert n_tc > 0, f"{arch} {name}: no tensor-core instruction ({tc}) in the SASS"
        for pat in need:
            assert re.search(pat, sass), f"{arch} {name}: no {pat} in the SASS"
        print(f"{arch} {name[-90:]}: {n_tc} tensor-core instructions")
