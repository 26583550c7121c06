"""Padding-free vs padded on a SQuAD-like length mix: batch 32, lengths spread over 64..384.

Both variants are the patched seed-like model; only patch(unpad=...) differs. Small mode: 2 layers,
batch 8, lengths 16..128.
"""
import pytest
import torch

import bsbert
from benchmarks.conftest import SMALL

BATCH, LO, HI = (8, 16, 128) if SMALL else (32, 64, 384)


def length_mix(batch=BATCH, lo=LO, hi=HI, vocab=30522, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (batch,), generator=g)
    ids = torch.randint(1000, vocab, (batch, hi), generator=g)
    am = (torch.arange(hi)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": am}, lengths


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpadded"])
def test_length_mix(benchmark, seed_model, unpad):
    inp, lengths = length_mix()
    benchmark.group = f"length mix batch={BATCH} lengths {LO}..{HI}"
    bsbert.patch(seed_model, tokens=int(lengths.float().mean()) * 8, progress=False, unpad=unpad)
    try:
        benchmark.extra_info.update({"real_tokens": int(lengths.sum()), "padded_tokens": BATCH * HI})
        with torch.inference_mode():
            benchmark.pedantic(lambda: seed_model(**inp), rounds=2 if not SMALL else 3, iterations=1,
                               warmup_rounds=1)
    finally:
        bsbert.unpatch(seed_model)
