"""Padding-free vs padded on a SQuAD-like length mix: batch 32, lengths spread over 64..384.

Both variants are the patched seed-like model; only patch(unpad=...) differs, and each is planned for the
tokens its GEMMs see: the real tokens (mean length x batch) padding-free, batch x the padded length padded.
Each case first checks its outputs on the real tokens, untimed, against the unpatched model's. Small mode:
2 layers, batch 8, lengths 16..128.
"""
import pytest
import torch

import bsbert
from benchmarks.conftest import SMALL, check_outputs, run_info

BATCH, LO, HI = (8, 16, 128) if SMALL else (32, 64, 384)


def length_mix(batch=BATCH, lo=LO, hi=HI, vocab=30522, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (batch,), generator=g)
    ids = torch.randint(1000, vocab, (batch, hi), generator=g)
    am = (torch.arange(hi)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": am}, lengths


def planned_tokens(lengths, unpad: bool) -> int:
    """M of the forward's GEMMs, what patch() plans for: padding-free, the real tokens of the whole batch;
    padded, every position of it."""
    return int(lengths.float().mean()) * len(lengths) if unpad else len(lengths) * HI


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpadded"])
def test_length_mix(benchmark, seed_model, unpad):
    inp, lengths = length_mix()
    benchmark.group = f"length mix batch={BATCH} lengths {LO}..{HI}"
    dtype = next(seed_model.parameters()).dtype
    with torch.inference_mode():
        ref = seed_model(**inp)  # the unpatched model: what both variants must compute on the real tokens
    bsbert.patch(seed_model, tokens=planned_tokens(lengths, unpad), progress=False, unpad=unpad)
    try:
        benchmark.extra_info.update({"real_tokens": int(lengths.sum()), "padded_tokens": BATCH * HI,
                                     "num_hidden_layers": seed_model.config.num_hidden_layers, **run_info()})
        with torch.inference_mode():
            benchmark.extra_info["max_rel_err"] = check_outputs(ref, seed_model(**inp), inp["attention_mask"],
                                                                dtype, f"unpad={unpad}")
            benchmark.pedantic(lambda: seed_model(**inp), rounds=2 if not SMALL else 3, iterations=1,
                               warmup_rounds=1)
    finally:
        bsbert.unpatch(seed_model)
