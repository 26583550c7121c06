"""Ratio table of bsbert's CPU block-sparse kernel against oneDNN / torch dense GEMMs, same process.

``run_kernel_report()`` returns one dict per (dtype, M, shape, density) with the useful GFLOP/s of
``torch.ops.bsbert.bsr_linear`` (2*M*nnz_blocks*b*b per second), the dense GFLOP/s (2*M*N*K per
second) of oneDNN (``torch.ops.mkldnn._linear_pointwise`` on a prepacked weight) and of
``F.linear``, and ``ratio_vs_onednn`` = ours useful / oneDNN dense. The three are timed interleaved
(round-robin, best of ``rounds``) so that background load affects them alike; ``ours_of_isa_peak``
is ours useful over the instruction peak (bsbert.timing.cpu_peak_gflops, measured once per dtype). bf16 on a
CPU without a bf16 dot product (AVX2, AVX-512 without BF16): oneDNN runs the GEMM in fp32 (``onednn_dtype``),
what bf16 work runs as there; its bf16 GEMM is missing or emulated. Used by ``bsbert bench --kernels``;
``python -m bsbert.ops.cpu_kernel_report`` prints the table.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from bsbert.formats import BlockSparseMatrix
from bsbert.ops.packing import pack_cpu
from bsbert.timing import best_of_interleaved

DEFAULT_SHAPES = ((1024, 1024), (4096, 1024), (1024, 4096))  # (N out, K in)
DEFAULT_DENSITIES = (1.0, 0.64, 0.5, 0.25, 0.1)


def block_sparse_weight(n: int, k: int, block: int, density: float, seed: int = 0) -> torch.Tensor:
    """Random fp32 weight whose blocks are kept with probability ``density`` (all of them at 1.0)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    keep = torch.rand(-(-n // block), -(-k // block), generator=g) < density
    if density >= 1.0:
        keep[:] = True
    return w * keep.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]


def _onednn(x, w, bias):
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        wm = w.to_mkldnn()
        f = lambda: torch.ops.mkldnn._linear_pointwise(x, wm, bias, "none", [], "")  # noqa: E731
        f()
        return f
    except Exception:  # pragma: no cover - op missing in this torch build
        return None


def run_kernel_report(shapes=DEFAULT_SHAPES, densities=DEFAULT_DENSITIES, ms=(384,), block: int = 32,
                      dtypes=(torch.float32,), rounds: int = 5, gelu: bool = False,
                      verbose: bool = False) -> list[dict]:
    """Measure the ratio table; see the module docstring. Needs the compiled extension."""
    from bsbert import _ext

    if not _ext.has_op("bsr_linear"):
        raise RuntimeError(f"bsbert::bsr_linear is unavailable: {_ext.reason_unavailable()}")
    from bsbert.timing import cpu_peak_gflops

    rows = []
    for dtype in dtypes:
        peak = cpu_peak_gflops(dtype)  # the instruction peak, all threads at once (None: nothing to time)
        dnn_dtype = torch.float32 if dtype == torch.bfloat16 and _ext.bf16_widened_on_cpu() else dtype
        for (n, k) in shapes:
            for d in densities:
                w32 = block_sparse_weight(n, k, block, d, seed=n + k)
                bsm = BlockSparseMatrix.from_dense(w32, block, pad=True, dtype=dtype)
                packed = pack_cpu(bsm, dtype)
                w = w32.to(dtype)
                for m in ms:
                    x = torch.randn(m, k).to(dtype)
                    bias = torch.randn(n).to(dtype)
                    ours = lambda: torch.ops.bsbert.bsr_linear(  # noqa: E731
                        x, bsm.crow_indices, bsm.col_indices, packed, bias, n, k, block, gelu)
                    lin = lambda: F.linear(x, w, bias)  # noqa: E731
                    fns = [ours, lin]
                    dnn = _onednn(x.to(dnn_dtype), w.to(dnn_dtype), bias.to(dnn_dtype))
                    if dnn is not None:
                        fns.append(dnn)
                    ts = best_of_interleaved(fns, rounds, target_s=0.03)
                    useful = bsm.useful_flops(m)
                    dense = 2 * m * n * k
                    row = {
                        "dtype": str(dtype).replace("torch.", ""), "m": m, "n": n, "k": k, "block": block,
                        "density": d, "block_density": bsm.stats.block_density,
                        "threads": torch.get_num_threads(),
                        "ours_ms": ts[0] * 1e3, "ours_gflops": useful / ts[0] / 1e9,
                        "flinear_ms": ts[1] * 1e3, "flinear_gflops": dense / ts[1] / 1e9,
                        "onednn_ms": ts[2] * 1e3 if dnn else None,
                        "onednn_gflops": dense / ts[2] / 1e9 if dnn else None,
                        "onednn_dtype": str(dnn_dtype).replace("torch.", "") if dnn else None,
                    }
                    base = row["onednn_gflops"] or row["flinear_gflops"]
                    row["ratio_vs_onednn"] = row["ours_gflops"] / base
                    row["ratio_vs_flinear"] = row["ours_gflops"] / row["flinear_gflops"]
                    row["speedup_vs_onednn"] = (row["onednn_ms"] or row["flinear_ms"]) / row["ours_ms"]
                    row["isa_peak_gflops"] = peak["gflops"] if peak else None
                    row["ours_of_isa_peak"] = row["ours_gflops"] / peak["gflops"] if peak else None
                    rows.append(row)
                    if verbose:
                        print(format_row(row), flush=True)
    return rows


HEADER = ("dtype", "M", "N x K", "density", "ours GF/s", "oneDNN GF/s", "F.linear GF/s", "ratio",
          "speedup", "ours ms", "ours / instruction peak")


def format_row(r: dict) -> str:
    dnn = f"{r['onednn_gflops']:.1f}" if r["onednn_gflops"] else "-"
    if r["onednn_gflops"] and r.get("onednn_dtype") not in (None, r["dtype"]):
        dnn += f" ({r['onednn_dtype']})"  # bf16 widened here: oneDNN in fp32
    of_peak = f"{r['ours_of_isa_peak']:.0%} of {r['isa_peak_gflops']:.0f}" if r.get("ours_of_isa_peak") else "-"
    return (f"| {r['dtype']} | {r['m']} | {r['n']}x{r['k']} | {r['block_density']:.2f} | "
            f"{r['ours_gflops']:.1f} | {dnn} | {r['flinear_gflops']:.1f} | {r['ratio_vs_onednn']:.2f} | "
            f"{r['speedup_vs_onednn']:.2f}x | {r['ours_ms']:.3f} | {of_peak} |")


def format_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += [format_row(r) for r in rows]
    return "\n".join(lines)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[384])
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--density", type=float, nargs="+", default=list(DEFAULT_DENSITIES))
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER), flush=True)
    run_kernel_report(densities=a.density, ms=a.m, block=a.block, rounds=a.rounds,
                      dtypes=[getattr(torch, d) for d in a.dtype], verbose=True)


if __name__ == "__main__":
    main()
