"""Small pruned BERTs for tests (random weights, deterministic) and the masked-dense comparison."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bsbert import models


def tiny_config(layers=3, hidden=128, heads=4, ffn=512, attn="sdpa", act="gelu"):
    return models.bert_large_config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                    intermediate_size=ffn, attn_implementation=attn, hidden_act=act,
                                    vocab_size=1000, max_position_embeddings=512)


def tiny_pruned(heads=(2, 0, 4), ffn=(100, 37, 0), task="qa", seed=0, dead_bias_units=True, **cfg):
    cfg.setdefault("layers", len(heads))
    model = models.build_model(tiny_config(**cfg), task=task, seed=seed)
    return models.prune_like_seed(model, heads, ffn, seed=seed, dead_bias_units=dead_bias_units)


def tiny_pruned_distilbert():
    """A 2-layer DistilBERT (hidden 64, vocab 500) with one dead head and pruned FFNs."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.DistilBertModel(tf.DistilBertConfig(dim=64, n_layers=2, n_heads=2, hidden_dim=256,
                                                   vocab_size=500, max_position_embeddings=64)).eval()
    return models.prune_like_seed(model, heads_per_layer=(1, 2), ffn_per_layer=(40, 7))


def inputs(batch=2, seq=37, vocab=1000, pad_from=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    am = torch.ones(batch, seq, dtype=torch.long)
    if pad_from is not None:
        am[-1, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": am}


def logits(out):
    for k in ("start_logits", "logits", "last_hidden_state"):
        if k in out and out[k] is not None:
            parts = [out[k]] + ([out["end_logits"]] if k == "start_logits" else [])
            return torch.cat([p.reshape(-1) for p in parts])
    raise KeyError("no logits in model output")


def rel_err(ref, out) -> float:
    r, o = logits(ref).double(), logits(out).double()
    return float((r - o).abs().max() / r.abs().max())


def cpu_isa_levels(bf16_level: bool = False) -> list[str]:
    """BSBERT_CPU_ISA values this machine can run (only "portable" without the extension).
    bf16_level: include "avx512_bf16" where the CPU has it (for kernels with a bf16 path of their own:
    the block-sparse GEMM and the attention kernel; elsewhere it is the same as "avx512")."""
    import os

    from bsbert import _ext
    from bsbert._ext import ISA_LEVELS

    if not _ext.available():
        return ["portable"]
    old = os.environ.pop("BSBERT_CPU_ISA", None)
    try:
        best = _ext.load(warn=False).cpu_isa()
    finally:
        if old is not None:
            os.environ["BSBERT_CPU_ISA"] = old
    levels = list(ISA_LEVELS if bf16_level else ISA_LEVELS[:-1])  # the values the kernels take
    if best not in levels:  # avx512_bf16 without bf16_level
        best = "avx512"
    return levels[: levels.index(best) + 1]


def skip_unless_backend_fits(backend: str, dtype=torch.float32, block: int = 32) -> None:
    """Skip the test where a forced CPU linear backend cannot run: patch refuses to force it there, by
    design (e.g. oneDNN has no bf16 GEMM on an AVX2 CPU). The backend's own reasons name the skip."""
    from bsbert.ops.linear_backends import BACKENDS

    why = BACKENDS[backend].not_supported_reasons(torch.device("cpu"), dtype, block)
    if why:
        pytest.skip(f"{backend}: {why}")


def with_threads(n: int, fn):
    """fn() run with torch.set_num_threads(n), the previous count restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def qa_outputs_itself(monkeypatch):
    """For tests that compare forward paths bit for bit: the lean QA forward's head (bsbert::head_logits) sums
    in another order than F.linear (its own tests: test_lean_model.py), so there qa_outputs runs itself."""
    from bsbert import lean_model

    monkeypatch.setattr(lean_model, "_head_logits", lambda *a: None)


# ---- argument errors of the block-sparse linear ops ------------------------------------------------
# torch.ops.bsbert.bsr_linear (the CPU op, csrc/cpu/bsr_linear.cpp ``prepare``) and
# torch.ops.bsbert.triton_bsr_linear refuse these arguments in the same words. Both take
# (x, crow_indices, col_indices, values or packed values, bias, out_features, in_features, ...); the cases
# are written for out_features 64, in_features 48, block 16 (4 block rows, 3 block columns), at least one
# stored block. A case is (argument index, its replacement as a function of the unchanged arguments, the
# message: a regex, or a function of the unchanged arguments giving one); see ``assert_arg_error``.
def _replaced(t: torch.Tensor, i: int, v) -> torch.Tensor:
    """A copy of ``t`` with ``t[i] = v`` (a case never writes into the arguments it was given)."""
    t = t.clone()
    t[i] = v
    return t


BSR_ARG_ERRORS = [  # shapes and dtypes: checked without reading any values
    pytest.param(0, lambda a: a[0][0, 0], "x must have at least 1 dimension", id="x-0d"),
    pytest.param(0, lambda a: a[0][:, :47].contiguous(), r"x.shape\[-1\] = 47 does not match in_features = 48",
                 id="x-width"),
    pytest.param(5, lambda a: -1, r"negative out_features \(-1\)", id="out-features-negative"),
    pytest.param(1, lambda a: a[1].long(), "crow_indices and col_indices must be int32, got", id="crow-int64"),
    pytest.param(2, lambda a: a[2][None], "crow_indices and col_indices must be 1-D", id="col-2d"),
    pytest.param(1, lambda a: a[1][:-1], r"crow_indices must have ceil\(out_features/block\)\+1 = 5 entries, got 4",
                 id="crow-short"),
]

BSR_INDEX_ERRORS = [  # index values (bsbert.formats.validate_indices): indices that gave garbage or read out of bounds
    pytest.param(2, lambda a: _replaced(a[2], 0, 99),
                 r"col_indices\[0\] = 99 is outside \[0, ceil\(in_features/block\) = 3\)", id="col-too-large"),
    pytest.param(2, lambda a: _replaced(a[2], -1, -1),
                 lambda a: rf"col_indices\[{a[2].numel() - 1}\] = -1 is outside", id="col-negative"),
    pytest.param(1, lambda a: _replaced(a[1], -1, a[1][-1] + 1),
                 lambda a: rf"crow_indices must run from 0 to nnz_blocks = {a[2].numel()}, got 0\.\.{a[2].numel() + 1}",
                 id="crow-end"),
    pytest.param(1, lambda a: _replaced(a[1], 0, 1), "crow_indices must run from 0 to nnz_blocks", id="crow-start"),
    # row 0 takes every block, row 1 ends (at 0) before it starts
    pytest.param(1, lambda a: _replaced(_replaced(a[1], 1, a[1][-1]), 2, 0),
                 r"crow_indices must be non-decreasing \(row 1\)", id="crow-decreasing"),
]


def assert_arg_error(op, args, index, replace, match, errors=ValueError):
    """``op(*args)`` with ``args[index]`` replaced by ``replace(args)`` raises ``errors`` matching ``match`` (a
    regex, or a function of the unchanged ``args`` giving one). ``args`` itself is left as it was."""
    if callable(match):
        match = match(args)
    args = list(args)
    args[index] = replace(args)
    with pytest.raises(errors, match=match):
        op(*args)


def huge_storage(n: int, dtype=torch.float16) -> torch.Tensor:
    """n elements of untouched memory (virtual: only the pages written are backed), for offsets past 2^31
    elements; a skip where the address space or overcommit limit refuses it."""
    try:
        return torch.empty(n, dtype=dtype)
    except RuntimeError as exc:
        pytest.skip(f"cannot reserve {n * dtype.itemsize / 2**30:.1f} GiB of address space: {exc}")


class OpCounter(TorchDispatchMode):
    """Counts the ops that reach the dispatcher (custom ops included) by schema name: ``calls["bsbert::x"]``."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func._schema.name] += 1
        return func(*args, **(kwargs or {}))
