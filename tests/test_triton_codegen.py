"""The Triton kernels compile to real GPU code (sm_80 and sm_90), checked without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler, so it cannot catch code-generation
errors (unsupported constructs, dot shapes, dtype rules). This compiles representative variants
ahead of time with ``triton.compile(..., target=GPUTarget("cuda", cc, 32))`` (PTX + ptxas) in a
subprocess, since in the test process the kernels were already created in interpreter mode.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_LIN_INTS = ("M", "N", "K", "NUM_BLOCK_ROWS", "stride_xm", "stride_xk", "stride_ym", "stride_yn",
             "M_BUCKET", "DENSITY_BUCKET")
_ATT_INTS = ("stride_qb", "stride_qs", "stride_qd", "stride_mb", "stride_ms", "stride_ob",
             "stride_os", "M_LEN", "SEQ_BUCKET")

# (dtype, block, BLOCK_M, num_warps, num_stages, input_precision)
LINEAR_CASES = [("fp16", 16, 128, 4, 3, "tf32"), ("bf16", 64, 64, 4, 4, "tf32"),
                ("fp32", 32, 64, 4, 3, "ieee"), ("fp32", 32, 64, 4, 3, "tf32")]
# (dtype, head_dim, varlen, BLOCK_M, BLOCK_N, num_warps)
ATTN_CASES = [("fp16", 64, False, 128, 64, 8), ("bf16", 32, True, 64, 64, 4),
              ("fp32", 32, False, 32, 32, 4)]


def _compile_all(ccs=(80, 90)):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bsbert.triton import attention as A
    from bsbert.triton import bsr_linear as L

    assert not L.INTERPRETED and not A.INTERPRETED, "run without TRITON_INTERPRET"
    failures = []
    for cc in ccs:
        target = GPUTarget("cuda", cc, 32)
        for dt, b, bm, warps, stages, prec in LINEAR_CASES:
            sig = {n: f"*{dt}" for n in ("x_ptr", "vals_ptr", "bias_ptr", "y_ptr")}
            sig.update(crow_ptr="*i32", col_ptr="*i32", **{n: "i32" for n in _LIN_INTS})
            const = dict(BLOCK=b, BLOCK_M=bm, GROUP_M=8, HAS_BIAS=True, GELU=True,
                         INPUT_PRECISION=prec, UPCAST=False, EVEN_K=b != 64)
            sig.update({c: "constexpr" for c in const})
            try:
                triton.compile(ASTSource(L._bsr_linear_kernel, sig, const), target=target,
                               options=dict(num_warps=warps, num_stages=stages))
            except Exception as exc:  # noqa: BLE001
                failures.append(f"linear sm{cc} {dt} b{b}: {type(exc).__name__}: {exc}")
        for dt, d, varlen, bm, bn, warps in ATTN_CASES:
            sig = {"qkv_ptr": f"*{dt}", "mask_ptr": f"*{dt}" if varlen else "*u8",
                   "cu_ptr": "*i32" if varlen else f"*{dt}", "out_ptr": f"*{dt}", "S": "i32",
                   "H": "i32", "qk_scale": "fp32", **{n: "i32" for n in _ATT_INTS}}
            const = dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, VARLEN=varlen, HAS_MASK=not varlen,
                         UPCAST=False)
            sig.update({c: "constexpr" for c in const})
            try:
                triton.compile(ASTSource(A._attn_kernel, sig, const), target=target,
                               options=dict(num_warps=warps, num_stages=3))
            except Exception as exc:  # noqa: BLE001
                failures.append(f"attention sm{cc} {dt} d{d} varlen={varlen}: "
                                f"{type(exc).__name__}: {exc}")
    return failures


def test_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_fixed_config_switch(monkeypatch):
    """BSBERT_TRITON_AUTOTUNE=0 (set by conftest on GPUs) gives one cached single-config autotuner per
    config: Triton launches a lone config without benchmarking it."""
    import triton

    from bsbert.triton import _common
    from bsbert.triton import bsr_linear as L

    monkeypatch.setenv("BSBERT_TRITON_AUTOTUNE", "0")
    assert not _common.autotune_enabled()
    monkeypatch.setenv("BSBERT_TRITON_AUTOTUNE", "1")
    assert _common.autotune_enabled()
    monkeypatch.setattr(_common, "_FIXED_CONFIG_KERNELS", {})
    k1 = _common.fixed_config_kernel(L._bsr_linear_kernel, {"BLOCK_M": 64, "GROUP_M": 8}, 4, 3)
    k2 = _common.fixed_config_kernel(L._bsr_linear_kernel, {"GROUP_M": 8, "BLOCK_M": 64}, 4, 3)
    k3 = _common.fixed_config_kernel(L._bsr_linear_kernel, {"BLOCK_M": 16, "GROUP_M": 8}, 2, 3)
    assert k1 is k2 and k1 is not k3 and len(_common._FIXED_CONFIG_KERNELS) == 2
    assert isinstance(k1, triton.runtime.Autotuner) and len(k1.configs) == 1
    assert k1.configs[0].kwargs == {"BLOCK_M": 64, "GROUP_M": 8} and k1.configs[0].num_warps == 4


if __name__ == "__main__":
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        print(f"no NVIDIA backend in this triton ({exc})")
        sys.exit(77)
    errs = _compile_all()
    print("\n".join(errs) if errs else "all variants compiled")
    sys.exit(1 if errs else 0)

