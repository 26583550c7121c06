"""Wall-clock timing that is honest on both devices: warm-up first, synchronise CUDA, median of repeats."""
from __future__ import annotations

import statistics
import time

import torch


def time_fn(fn, *, repeats: int = 5, warmup: int = 1, device: str | torch.device = "cpu") -> dict:
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
            "max_ms": 1e3 * max(ts), "repeats": repeats}


def dense_gemm_gflops(device="cpu", dtype=torch.float32, m=384, k=1024, n=4096, repeats=10) -> dict:
    """The best dense GEMM rate this device offers torch here (oneDNN on CPU when it supports the
    dtype, else torch's default F.linear; cuBLAS on CUDA): the denominator of FLOP bounds."""
    from bsbert.ops.linear_backends import BACKENDS

    dev = torch.device(device)
    x = torch.randn(m, k, device=dev).to(dtype)
    w = torch.randn(n, k, device=dev).to(dtype)
    best = None
    for name in ("onednn-dense", "torch-dense"):
        be = BACKENDS[name]
        if be.not_supported_reasons(dev, dtype, None):
            continue
        prepared = be.prepare(w, None, False, None)
        t = time_fn(lambda: prepared(x), repeats=repeats, device=dev)["median_ms"]
        gf = 2 * m * k * n / (t * 1e-3) / 1e9
        if best is None or gf > best["gflops"]:
            best = {"backend": name, "gflops": gf, "shape": [m, k, n], "dtype": str(dtype)}
    return best
