"""Where a patched model's time goes beyond its GEMMs: the patched seed-like model's linears timed
one by one with hot (cache-resident) weights, then all in model order (weights streamed as in a
forward), then the whole forward; best of interleaved rounds. Usage: python scripts/linears_hot_vs_model.py 384
"""
import argparse

import torch

import bsbert
from bsbert import models
from bsbert.bench import _inputs
from bsbert.cli import positive_int, seq_fits_or_usage_error
from bsbert.nn import SparseLinear
from bsbert.timing import best_of_interleaved


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("seq", nargs="?", type=positive_int, default=384)
    seq = ap.parse_args().seq
    m = models.seed_like_model().eval()
    seq_fits_or_usage_error(ap, m, seq)
    inp = _inputs(1, seq, m.config.vocab_size, torch.device("cpu"))
    bsbert.patch(m, tokens=seq, progress=False)
    lins = [mod for mod in m.modules() if isinstance(mod, SparseLinear) and mod.choice is not None]
    xs = [torch.randn(1, seq, lin.in_features) for lin in lins]
    with torch.inference_mode():
        hot = 0.0
        for lin, x in zip(lins, xs):
            hot += best_of_interleaved([lambda lin=lin, x=x: lin(x)], rounds=5, target_s=0.005)[0]

        # cold: run all linears in sequence (weights stream like in the model)
        def seq_all():
            for lin, x in zip(lins, xs):
                lin(x)
        cold = best_of_interleaved([seq_all], rounds=5, target_s=0.2)[0]
        full = best_of_interleaved([lambda: m(**inp)], rounds=5, target_s=0.2)[0]
    print("linears hot sum %.1f ms, in sequence %.1f ms, full model %.1f ms" % (hot * 1e3, cold * 1e3, full * 1e3))


if __name__ == "__main__":
    main()
