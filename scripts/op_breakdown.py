"""Where a patched seed-like BERT-large forward spends its time on CPU: wall time and GFLOP/s of each
bsbert / oneDNN op, and of the aten GEMMs and attention that linears on torch-dense and torch-sdpa
attention run, inside the forward (a TorchDispatchMode times every op call), next to the FLOP bound (the
plan's remaining FLOPs, as `bsbert bench` counts them) at the dense rate measured right after (oneDNN or
torch's F.linear, whichever is faster: the probe's label says).

    python scripts/op_breakdown.py [seq] [forwards] [dtype] [--shapes]

(--shapes: one line per op and (M, K, N) instead of per op)

The mode's own Python per op (all aten ops pass through it) lands in "rest", so compare op times
across runs of this script, and whole-forward times with `bsbert bench`.
"""
import argparse
import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bsbert
from bsbert import models
from bsbert.bench import _inputs
from bsbert.cli import positive_int, seq_fits_or_usage_error
from bsbert.timing import dense_gemm_gflops

# aten ops a patched forward runs for linears on torch-dense (F.linear) and attention on torch-sdpa: timed and
# counted like bsbert's ops (they were not, and forward/bound looked inflated). Under inference_mode the mode sees
# aten::linear and aten::scaled_dot_product_attention themselves; the lower-level names are there in case a
# forward reaches them directly (the mode does not see the ops a timed op calls inside, so none counts twice)
GEMMS = ("aten::linear", "aten::addmm", "aten::mm", "aten::bmm")
SDPAS = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu")
ATEN_OPS = GEMMS + SDPAS


def _mkn(name, args):
    """(batch, M, K, N) of an aten GEMM's call (aten::linear: x [..., K] and weight [N, K])."""
    if name == "aten::linear":
        x, w = args[0], args[1]
        return 1, x.numel() // x.shape[-1], x.shape[-1], w.shape[0]
    a, b = (args[1], args[2]) if name == "aten::addmm" else (args[0], args[1])
    batch = a.shape[0] if name == "aten::bmm" else 1
    return batch, a.shape[-2], a.shape[-1], b.shape[-1]


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
    if name in GEMMS:
        batch, m, k, n = _mkn(name, args)
        return 2 * batch * m * k * n
    if name in SDPAS:
        q, k = args[0], args[1]  # [B, H, S, D]: Q K^T and P V
        return 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
    return 0


def op_shape(name, args):
    if name in ("bsbert::bsr_linear", "bsbert::bsr_linear_add_layer_norm"):
        x, row, block = args[0], args[1], args[7]
        return f"M={x.numel() // x.shape[-1]} K={x.shape[-1]} N={(row.numel() - 1) * block} nnzb={args[2].numel()}"
    if name == "mkldnn::_linear_pointwise":
        return f"M={args[0].numel() // args[0].shape[-1]} K={args[1].shape[1]} N={args[1].shape[0]}"
    if name == "bsbert::pruned_attention":
        return f"heads={args[2]} seq={args[0].shape[1]}"
    if name in GEMMS:
        batch, m, k, n = _mkn(name, args)
        return f"M={m} K={k} N={n}" + (f" batch={batch}" if name == "aten::bmm" else "")
    if name in SDPAS:
        return f"heads={args[0].shape[1]} seq={args[0].shape[2]}"
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
        if name.startswith(("bsbert::", "mkldnn::")) or name in ATEN_OPS:
            e = self.acc[(name, op_shape(name, args)) if self.by_shape else name]
            e[0] += time.perf_counter() - t0
            e[1] += op_flops(name, args)
            e[2] += 1
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("seq", nargs="?", type=positive_int, default=128)
    ap.add_argument("forwards", nargs="?", type=positive_int, default=10)
    ap.add_argument("dtype", nargs="?", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shapes", action="store_true", help="one line per op and (M, K, N) instead of per op")
    args = ap.parse_args()
    seq, n, dtype = args.seq, args.forwards, getattr(torch, args.dtype)
    model = models.seed_like_model().eval().to(dtype)
    seq_fits_or_usage_error(ap, model, seq)
    inp = _inputs(1, seq, model.config.vocab_size, torch.device("cpu"))
    bsbert.patch(model, tokens=seq, progress=False, fused_encoder=False)
    timer = OpTimer(by_shape=args.shapes)
    with torch.inference_mode():
        for _ in range(3):
            model(**inp)
        with timer:
            t0 = time.perf_counter()
            for _ in range(n):
                model(**inp)
            fwd = (time.perf_counter() - t0) / n
    peak = dense_gemm_gflops("cpu", dtype, 384)
    rate = peak["gflops"]
    # the bound's FLOPs are the plan's (what bench divides by), whichever op ran them; the ops' sum below may add
    # the QA head's GEMM
    bound_flops = model.bsbert_plan.flops(seq, "remaining")
    print(f"seq {seq}, {torch.get_num_threads()} threads: forward {fwd * 1e3:.1f} ms (inside the timing mode); "
          f"dense probe {peak['label']} {rate:.0f} GFLOP/s at M=384")
    total_t = total_f = 0.0
    for name, (t, f, c) in sorted(timer.acc.items(), key=lambda kv: -kv[1][0]):
        rate_s = f"{f / t / 1e9:6.0f} GFLOP/s" if f else ""
        print(f"  {str(name):36s} {t / n * 1e3:7.2f} ms {c // n:4d} calls {f / n / 1e9:6.2f} GFLOP {rate_s}")
        total_t += t / n
        total_f += f / n
    bound_s = bound_flops / (rate * 1e9)
    print(f"  ops {total_t * 1e3:.1f} ms {total_f / 1e9:.2f} GFLOP, rest {(fwd - total_t) * 1e3:.1f} ms; "
          f"FLOP bound {bound_flops / 1e9:.2f} GFLOP / {rate:.0f} GFLOP/s = {bound_s * 1e3:.1f} ms "
          f"-> forward/bound {fwd / bound_s:.2f}")


if __name__ == "__main__":
    main()
