"""Where a patched model's time goes beyond its GEMMs: the patched seed-like model's linears timed
one by one with hot (cache-resident) weights, then all in model order (weights streamed as in a
forward), then the whole forward; best of interleaved rounds. Usage: python scripts/linears_hot_vs_model.py 384
"""
import sys

import torch

import bsbert
from bsbert import models
from bsbert.bench import _inputs
from bsbert.nn import SparseLinear
from bsbert.timing import best_of_interleaved

seq = int(sys.argv[1]) if len(sys.argv) > 1 else 384
m = models.seed_like_model().eval()
inp = _inputs(1, seq, m.config.vocab_size, torch.device("cpu"))
bsbert.patch(m, tokens=seq, progress=False)
lins = [mod for mod in m.modules() if isinstance(mod, SparseLinear) and mod.choice is not None]
xs = [torch.randn(1, seq, l.in_features) for l in lins]
with torch.inference_mode():
    hot = 0.0
    for l, x in zip(lins, xs):
        hot += best_of_interleaved([lambda l=l, x=x: l(x)], rounds=5, target_s=0.005)[0]
    # cold: run all linears in sequence (weights stream like in the model)
    def seq_all():
        for l, x in zip(lins, xs): l(x)
    cold = best_of_interleaved([seq_all], rounds=5, target_s=0.2)[0]
    full = best_of_interleaved([lambda: m(**inp)], rounds=5, target_s=0.2)[0]
print("linears hot sum %.1f ms, in sequence %.1f ms, full model %.1f ms" % (hot*1e3, cold*1e3, full*1e3))
