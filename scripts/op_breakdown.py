"""Where a patched seed-like BERT-large forward spends its time on CPU: wall time and GFLOP/s of each
bsbert / oneDNN op inside the forward (a TorchDispatchMode times every op call), next to the FLOP bound
at oneDNN's dense rate measured right after. Usage: python scripts/op_breakdown.py [seq] [forwards] [dtype] [--shapes]
(--shapes: one line per op and (M, K, N) instead of per op)

The mode's own Python per op (all aten ops pass through it) lands in "rest", so compare op times
across runs of this script, and whole-forward times with `bsbert bench`.
"""
import collections
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bsbert
from bsbert import models
from bsbert.bench import _inputs
from bsbert.timing import dense_gemm_gflops


def op_flops(name, args):
    if name in ("bsbert::bsr_linear", "bsbert::bsr_linear_add_layer_norm"):
        x, col, block = args[0], args[2], args[7]
        return 2 * (x.numel() // x.shape[-1]) * col.numel() * block * block
    if name == "mkldnn::_linear_pointwise":
        x, w = args[0], args[1]
        return 2 * (x.numel() // x.shape[-1]) * w.numel()
    if name == "bsbert::pruned_attention":
        qkv, heads, head_dim = args[0], args[2], args[3]
        return 4 * qkv.shape[0] * heads * qkv.shape[1] ** 2 * head_dim
    return 0


def op_shape(name, args):
    if name in ("bsbert::bsr_linear", "bsbert::bsr_linear_add_layer_norm"):
        x, row, block = args[0], args[1], args[7]
        return f"M={x.numel() // x.shape[-1]} K={x.shape[-1]} N={(row.numel() - 1) * block} nnzb={args[2].numel()}"
    if name == "mkldnn::_linear_pointwise":
        return f"M={args[0].numel() // args[0].shape[-1]} K={args[1].shape[1]} N={args[1].shape[0]}"
    if name == "bsbert::pruned_attention":
        return f"heads={args[2]} seq={args[0].shape[1]}"
    return ""


class OpTimer(TorchDispatchMode):
    def __init__(self, by_shape=False):
        super().__init__()
        self.by_shape = by_shape
        self.acc = collections.defaultdict(lambda: [0.0, 0.0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if name.startswith(("bsbert::", "mkldnn::")):
            e = self.acc[(name, op_shape(name, args)) if self.by_shape else name]
            e[0] += time.perf_counter() - t0
            e[1] += op_flops(name, args)
            e[2] += 1
        return out


def main():
    seq = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    dtype = getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.float32
    model = models.seed_like_model().eval().to(dtype)
    inp = _inputs(1, seq, model.config.vocab_size, torch.device("cpu"))
    bsbert.patch(model, tokens=seq, progress=False, fused_encoder=False)
    timer = OpTimer(by_shape="--shapes" in sys.argv)
    with torch.inference_mode():
        for _ in range(3):
            model(**inp)
        with timer:
            t0 = time.perf_counter()
            for _ in range(n):
                model(**inp)
            fwd = (time.perf_counter() - t0) / n
    rate = dense_gemm_gflops("cpu", dtype, 384)["gflops"]
    print(f"seq {seq}, {torch.get_num_threads()} threads: forward {fwd * 1e3:.1f} ms (inside the timing mode); "
          f"oneDNN dense {rate:.0f} GFLOP/s at M=384")
    total_t = total_f = 0.0
    for name, (t, f, c) in sorted(timer.acc.items(), key=lambda kv: -kv[1][0]):
        rate_s = f"{f / t / 1e9:6.0f} GFLOP/s" if f else ""
        print(f"  {str(name):36s} {t / n * 1e3:7.2f} ms {c // n:4d} calls {f / n / 1e9:6.2f} GFLOP {rate_s}")
        total_t += t / n
        total_f += f / n
    print(f"  ops {total_t * 1e3:.1f} ms, rest {(fwd - total_t) * 1e3:.1f} ms; FLOP bound {total_f / rate / 1e6:.1f} ms "
          f"-> forward/bound {fwd / (total_f / rate / 1e9):.2f}")


if __name__ == "__main__":
    main()
