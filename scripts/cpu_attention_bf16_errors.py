"""Errors of bsbert's CPU bf16 attention paths and of torch SDPA against float64 (markdown table).

One column per path this CPU can run (BSBERT_CPU_ISA only lowers the CPU's level, so a level the CPU lacks
would time the CPU's own path again under another name; those are left out, and the lines above the table
say which path each setting ran): "widen" = bf16 read as fp32, fp32 FMAs (BSBERT_CPU_ISA=avx512, or avx2);
"dot" = vdpbf16ps products with P rounded to bf16 (BSBERT_CPU_ISA=avx512_bf16, needs a CPU with it);
"scalar" = the portable C++ path. Max and mean |error| over the output; the tests' rule is max error <= 2x
SDPA's (tests/test_cpu_attention.py, whose reference and input helpers this reuses).

    python scripts/cpu_attention_bf16_errors.py
"""
from __future__ import annotations

import os
import sys

import torch

# appended, not prepended (as in cpu_attention_fp32_errors.py): PYTHONPATH=<another checkout> then measures that
# checkout's bsbert
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.helpers import cpu_isa_levels  # noqa: E402
from tests.test_cpu_attention import masks, op, rand_qkv, ref64, sdpa  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu_attention import _with_isa  # noqa: E402  (the sibling script's env switch)


def with_isa(isa, fn):
    """fn() with BSBERT_CPU_ISA=isa (read by the kernels on every call), the variable restored after."""
    return _with_isa(isa, fn)()

SHAPES = [(17, 3, 64, 1.0), (128, 10, 64, 1.0), (385, 2, 64, 1.0), (384, 10, 64, 1.0), (127, 2, 48, 1.0),
          (300, 2, 64, 4.0), (1100, 2, 64, 1.0)]  # S, H, D, spread of the inputs (4: large logits)
KIND = {"portable": "scalar", "avx2": "widen", "avx512": "widen", "avx512_bf16": "dot"}


def errors(out, ref):
    e = (out.double() - ref).abs()
    return e.max().item(), e.mean().item()


def levels() -> list[str]:
    """The BSBERT_CPU_ISA values whose bf16 attention path this CPU runs, lowest first."""
    return cpu_isa_levels(bf16_level=True)


def main():
    import bsbert

    isas = levels()
    print(f"bsbert from {os.path.dirname(bsbert.__file__)}")
    for isa in isas:
        print(f"- BSBERT_CPU_ISA={isa}: kernel path {with_isa(isa, lambda: bsbert._ext.load().cpu_isa())} "
              f"({KIND[isa]})")
    missing = [isa for isa in KIND if isa not in isas]
    if missing:
        print(f"- left out, not on this CPU: {', '.join(f'{i} ({KIND[i]})' for i in missing)}")
    print()
    best = isas[-1]
    print("| S | H | D | logit spread | mask | SDPA max / mean err | "
          + " | ".join(f"{isa} {KIND[isa]} max / mean" for isa in isas) + f" | {best} / SDPA (max) |")
    print("|---" * (7 + len(isas)) + "|")
    fmt = lambda x: f"{x[0]:.2e} / {x[1]:.2e}"  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    for s, h, d, spread in SHAPES:
        qkv = rand_qkv(2, s, h, d, torch.bfloat16, gen, spread)
        scale = d ** -0.5 if spread == 1 else 0.5
        for mask in masks(2, s, gen)[:2]:  # none, right padding
            ref = ref64(qkv, mask, h, d, scale)
            t = errors(sdpa(qkv, mask, h, d, scale), ref)
            e = {isa: with_isa(isa, lambda: errors(op(qkv, mask, h, d, scale), ref)) for isa in isas}
            print(f"| {s} | {h} | {d} | {spread:g} | {'none' if mask is None else 'right pad'} | {fmt(t)} | "
                  + " | ".join(fmt(e[isa]) for isa in isas) + f" | {e[best][0] / t[0]:.2f}x |")


if __name__ == "__main__":
    main()
