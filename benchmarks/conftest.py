"""Benchmarks: `pytest benchmarks --benchmark-only`.

BSBERT_BENCH_SMALL=1 shrinks everything (2-layer models, seq 128) for a CI smoke run; the default is
the real thing (24-layer BERT-large, seq 384 and 128, batch 1). Models are built once per session.
Each group compares dense vs packed vs patched in the same run: read the ratios off one table.
"""
import os

import pytest
import torch

SMALL = os.environ.get("BSBERT_BENCH_SMALL", "0") == "1"


@pytest.fixture(scope="session")
def model_overrides():
    return {"num_hidden_layers": 2} if SMALL else {}


@pytest.fixture(scope="session")
def dense_model(model_overrides):
    from bsbert import models

    return models.dense_bert_large(**model_overrides)


@pytest.fixture(scope="session")
def seed_model(model_overrides):
    from bsbert import models

    return models.seed_like_model(**model_overrides)


def bench_inputs(seq, batch=1, vocab=30522):
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
