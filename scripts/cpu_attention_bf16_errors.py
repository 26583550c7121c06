"""Errors of bsbert's two CPU bf16 attention paths and of torch SDPA against float64 (markdown table).

"widen": bf16 read as fp32, fp32 FMAs (BSBERT_CPU_ISA=avx512); "dot": vdpbf16ps products with P
rounded to bf16 (BSBERT_CPU_ISA=avx512_bf16, needs a CPU with it). Max and mean |error| over the
output; the tests' rule is max error <= 2x SDPA's (tests/test_cpu_attention.py, whose reference and
input helpers this reuses).

    python scripts/cpu_attention_bf16_errors.py
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.test_cpu_attention import masks, op, rand_qkv, ref64, sdpa  # noqa: E402

SHAPES = [(17, 3, 64, 1.0), (128, 10, 64, 1.0), (385, 2, 64, 1.0), (384, 10, 64, 1.0), (127, 2, 48, 1.0),
          (300, 2, 64, 4.0), (1100, 2, 64, 1.0)]  # S, H, D, spread of the inputs (4: large logits)


def errors(out, ref):
    e = (out.double() - ref).abs()
    return e.max().item(), e.mean().item()


def main():
    gen = torch.Generator().manual_seed(0)
    print("| S | H | D | logit spread | mask | SDPA max / mean err | widen max / mean | dot max / mean "
          "| dot / SDPA (max) |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x: f"{x[0]:.2e} / {x[1]:.2e}"  # noqa: E731
    for s, h, d, spread in SHAPES:
        qkv = rand_qkv(2, s, h, d, torch.bfloat16, gen, spread)
        scale = d ** -0.5 if spread == 1 else 0.5
        for mask in masks(2, s, gen)[:2]:  # none, right padding
            ref = ref64(qkv, mask, h, d, scale)
            t = errors(sdpa(qkv, mask, h, d, scale), ref)
            e = {}
            for isa in ("avx512", "avx512_bf16"):
                os.environ["BSBERT_CPU_ISA"] = isa
                e[isa] = errors(op(qkv, mask, h, d, scale), ref)
            print(f"| {s} | {h} | {d} | {spread:g} | {'none' if mask is None else 'right pad'} | {fmt(t)} | "
                  f"{fmt(e['avx512'])} | {fmt(e['avx512_bf16'])} | {e['avx512_bf16'][0] / t[0]:.2f}x |")


if __name__ == "__main__":
    main()
