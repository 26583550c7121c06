"""The fake (meta) kernels (bsbert/ops/fake.py) refuse the bad inputs the CPU kernels refuse, with the same words.

torch.compile / torch.export trace the ops with fake tensors: a fake kernel that took a call the eager op refuses
(a key_padding_mask of the wrong shape, int32 input_ids, packed_values of the wrong size, ...) let the trace
succeed, and the error came only when the traced program ran. Each case here is a call with one defect that does
not depend on tensor values: the eager op raises, and the same call under FakeTensorMode raises too, naming the
same problem. (Checks of values, such as cu_seqlens' lengths against max_seqlen, and one device's refusals, such
as float16 on the CPU, stay with the kernels.)
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bsbert import _ext

pytestmark = pytest.mark.skipif(not (_ext.has_op("bsr_linear") and _ext.has_op("bert_encoder_registered")),
                                reason=f"bsbert._C unavailable: {_ext.reason_unavailable()}")

if _ext.available():
    from bsbert.ops.fake import register_fakes

    register_fakes()  # (idempotent; loading the extension did it already)

UNREGISTERED_HANDLE = 2 ** 62  # handles count up from 1


def _r(*shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(sum(shape) + 7)
    return torch.randn(*shape, generator=g).to(dtype)


def _bsr():
    """A 64 x 48 block-sparse weight (block 16) packed for the CPU: crow, col, packed_values."""
    from bsbert.formats import BlockSparseMatrix
    from bsbert.ops.packing import pack_cpu

    bsm = BlockSparseMatrix.from_dense(_r(64, 48), 16, pad=True)
    return bsm.crow_indices, bsm.col_indices, pack_cpu(bsm, torch.float32)


def _ids(*shape, dtype=torch.long):
    return torch.zeros(*shape, dtype=dtype)


def _emb_tables():
    return _r(97, 48), _r(40, 48), _r(3, 48)


def _mask(*shape, dtype=torch.bool):
    return torch.ones(*shape, dtype=dtype)


# name -> (op name, () -> args, a phrase both messages hold)
CASES = {
    "bsr_linear packed_values wrong size": (
        "bsr_linear", lambda: (lambda c, k, p: (_r(5, 48), c, k, p[:-1], None, 64, 48, 16, False))(*_bsr()),
        "bsr_linear: packed_values must hold nnz_blocks*block*block = 3072 values, got 2816"),
    "bsr_linear col_indices 2-D": (
        "bsr_linear", lambda: (lambda c, k, p: (_r(5, 48), c, k[None], p, None, 64, 48, 16, False))(*_bsr()),
        "bsr_linear: crow_indices and col_indices must be 1-D"),
    "bsr_linear negative out_features": (
        "bsr_linear", lambda: (lambda c, k, p: (_r(5, 48), c, k, p, None, -1, 48, 16, False))(*_bsr()),
        "bsr_linear: negative out_features (-1)"),
    "bsr_linear crow_indices wrong length": (
        "bsr_linear", lambda: (lambda c, k, p: (_r(5, 48), c[:-1], k, p, None, 64, 48, 16, False))(*_bsr()),
        "bsr_linear: crow_indices must have ceil(out_features/block)+1 = 5 entries, got 4"),
    "bsr_linear_add_layer_norm negative eps": (
        "bsr_linear_add_layer_norm",
        lambda: (lambda c, k, p: (_r(5, 48), c, k, p, None, 64, 48, 16, _r(5, 64), _r(64), _r(64), -1e-5))(*_bsr()),
        "bsr_linear_add_layer_norm: eps must be finite and >= 0"),
    "bsr_linear_add_layer_norm ln_weight wrong shape": (
        "bsr_linear_add_layer_norm",
        lambda: (lambda c, k, p: (_r(5, 48), c, k, p, None, 64, 48, 16, _r(5, 64), _r(63), _r(64), 1e-5))(*_bsr()),
        "bsr_linear_add_layer_norm: ln_weight must have shape [64] (out_features), got [63]"),
    "add_layer_norm negative eps": (
        "add_layer_norm", lambda: (_r(5, 64), _r(5, 64), _r(64), _r(64), -1e-5),
        "add_layer_norm: eps must be finite and >= 0, got -0.000010"),
    "pruned_attention mask wrong shape": (
        "pruned_attention", lambda: (_r(2, 5, 192), _mask(2, 4), 2, 32, 0.2),
        "pruned_attention: key_padding_mask must have shape [2, 5] (qkv's [B, S]), got [2, 4]"),
    "pruned_attention mask 3-D": (
        "pruned_attention", lambda: (_r(2, 5, 192), _mask(2, 1, 5), 2, 32, 0.2),
        "pruned_attention: key_padding_mask must have shape [2, 5] (qkv's [B, S]), got [2, 1, 5]"),
    "pruned_attention mask int64": (
        "pruned_attention", lambda: (_r(2, 5, 192), _mask(2, 5, dtype=torch.long), 2, 32, 0.2),
        "pruned_attention: key_padding_mask must be bool (true = attend), got Long"),
    "pruned_attention num_heads 0": (
        "pruned_attention", lambda: (_r(2, 5, 0), None, 0, 32, 0.2),
        "pruned_attention: num_heads must be >= 1, got 0"),
    "pruned_attention_varlen cu_seqlens int64": (
        "pruned_attention_varlen", lambda: (_r(8, 192), torch.tensor([0, 3, 8]), 5, 2, 32, 0.2),
        "pruned_attention_varlen: cu_seqlens must be int32, got Long"),
    "pruned_attention_varlen cu_seqlens 2-D": (
        "pruned_attention_varlen", lambda: (_r(8, 192), torch.tensor([[0, 3, 8]], dtype=torch.int32), 5, 2, 32, 0.2),
        "pruned_attention_varlen: cu_seqlens must be 1-D [batch + 1], got shape [1, 3]"),
    "pruned_attention_varlen negative max_seqlen": (
        "pruned_attention_varlen", lambda: (_r(8, 192), torch.tensor([0, 3, 8], dtype=torch.int32), -1, 2, 32, 0.2),
        "pruned_attention_varlen: max_seqlen must be >= 0, got -1"),
    "head_logits bias dtype": (
        "head_logits", lambda: (_r(3, 64), _r(2, 64), _r(2, dtype=torch.bfloat16)),
        "head_logits: bias dtype (BFloat16) must match x's dtype (Float)"),
    "bert_embeddings int32 input_ids": (
        "bert_embeddings", lambda: (_ids(2, 5, dtype=torch.int32), None, *_emb_tables(), _r(48), _r(48), 1e-12),
        "bert_embeddings: input_ids must be int64, got Int"),
    "bert_embeddings sequence longer than the position table": (
        "bert_embeddings", lambda: (_ids(2, 41), None, *_emb_tables(), _r(48), _r(48), 1e-12),
        "bert_embeddings: sequence length 41 exceeds the 40 rows of the position table"),
    "bert_embeddings token_type_ids wrong shape": (
        "bert_embeddings", lambda: (_ids(2, 5), _ids(2, 4), *_emb_tables(), _r(48), _r(48), 1e-12),
        "bert_embeddings: token_type_ids must be a CPU int64 tensor of input_ids' shape [2, 5], got Long [2, 4]"),
    "bert_embeddings token_type_ids int32": (
        "bert_embeddings", lambda: (_ids(2, 5), _ids(2, 5, dtype=torch.int32), *_emb_tables(), _r(48), _r(48), 1e-12),
        "bert_embeddings: token_type_ids must be a CPU int64 tensor of input_ids' shape [2, 5], got Int [2, 5]"),
    "bert_embeddings ln_weight wrong shape": (
        "bert_embeddings", lambda: (_ids(2, 5), None, *_emb_tables(), _r(47), _r(48), 1e-12),
        "bert_embeddings: ln_weight must be a CPU [48] tensor of Float or float32, got Float [47]"),
    "bert_embeddings position table of another hidden size": (
        "bert_embeddings", lambda: (_ids(2, 5), None, _r(97, 48), _r(40, 47), _r(3, 48), _r(48), _r(48), 1e-12),
        "bert_embeddings: position has hidden size 47, the word table 48"),
    "bert_embeddings negative eps": (
        "bert_embeddings", lambda: (_ids(2, 5), None, *_emb_tables(), _r(48), _r(48), -1.0),
        "bert_embeddings: eps must be finite and >= 0"),
    "bert_encoder mask wrong shape": (
        "bert_encoder", lambda: (_r(2, 5, 8), _mask(2, 4), [], [], []),
        "bert_encoder: key_padding_mask must have shape [2, 5] (hidden's [B, S]), got [2, 4]"),
    "bert_encoder float mask": (
        "bert_encoder", lambda: (_r(2, 5, 8), _mask(2, 5, dtype=torch.float32), [], [], []),
        "bert_encoder: key_padding_mask must be bool (true = attend) or an integer attention mask"),
    "bert_encoder_registered unknown handle": (
        "bert_encoder_registered", lambda: (_r(2, 5, 8), None, UNREGISTERED_HANDLE),
        f"bert_encoder_registered: no encoder is registered under handle {UNREGISTERED_HANDLE}"),
}


def _fake_call(op, args):
    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        op(*fake_args)


@pytest.mark.parametrize("case", list(CASES))
def test_fake_kernel_refuses_what_the_eager_op_refuses(case):
    name, make_args, phrase = CASES[case]
    if not _ext.has_op(name):
        pytest.skip(f"bsbert::{name} unavailable")
    op = getattr(torch.ops.bsbert, name)
    args = make_args()
    with pytest.raises(RuntimeError) as eager:
        op(*args)
    assert phrase in str(eager.value), f"the eager op's message changed: {eager.value}"
    with pytest.raises(RuntimeError) as fake:
        _fake_call(op, args)
    assert phrase in str(fake.value), f"eager: {eager.value}\nfake: {fake.value}"


def test_fake_kernels_take_good_inputs():
    """The fakes' checks refuse nothing that the eager ops take (shapes of the results as eagerly)."""
    c, k, p = _bsr()
    calls = [("bsr_linear", (_r(5, 48), c, k, p, _r(64), 64, 48, 16, False)),
             ("bsr_linear_add_layer_norm", (_r(5, 48), c, k, p, None, 64, 48, 16, _r(5, 64), _r(64), _r(64), 1e-5)),
             ("add_layer_norm", (_r(5, 64), _r(5, 64), _r(64), _r(64), 0.0)),
             ("pruned_attention", (_r(2, 5, 192), _mask(2, 5), 2, 32, 0.2)),
             ("pruned_attention_varlen", (_r(8, 192), torch.tensor([0, 3, 8], dtype=torch.int32), 5, 2, 32, 0.2)),
             ("head_logits", (_r(3, 64), _r(2, 64), _r(2))),
             ("bert_embeddings", (_ids(2, 40), _ids(2, 40), *_emb_tables(), _r(48), _r(48), 1e-12)),
             ("bert_encoder", (_r(2, 5, 8), _mask(2, 5, dtype=torch.long), [], [], []))]
    for name, args in calls:
        if not _ext.has_op(name):
            continue
        op = getattr(torch.ops.bsbert, name)
        want = op(*args)
        mode = FakeTensorMode()
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with mode:
            got = op(*fake_args)
        assert (tuple(got.shape), got.dtype) == (tuple(want.shape), want.dtype), name


def test_fake_checks_work_with_dynamic_shapes():
    """The shape checks hold symbolic sizes (torch.export with dynamic batch and sequence): they become guards
    or runtime assertions, not trace failures, and a sequence beyond the position table still fails."""
    if not _ext.has_op("pruned_attention"):
        pytest.skip("bsbert::pruned_attention unavailable")
    word, position, token_type = _emb_tables()
    ln_w, ln_b = _r(48), _r(48)

    class M(torch.nn.Module):
        def forward(self, ids, tt, qkv, mask):
            e = torch.ops.bsbert.bert_embeddings(ids, tt, word, position, token_type, ln_w, ln_b, 1e-12)
            return e, torch.ops.bsbert.pruned_attention(qkv, mask, 2, 32, 0.2)

    b, s = torch.export.Dim("b", min=1, max=64), torch.export.Dim("s", min=1, max=40)
    args = (_ids(2, 5), _ids(2, 5), _r(2, 5, 192), _mask(2, 5))
    ep = torch.export.export(M(), args, dynamic_shapes=tuple({0: b, 1: s} for _ in args))
    e, a = ep.module()(_ids(3, 7), _ids(3, 7), _r(3, 7, 192), _mask(3, 7))
    assert tuple(e.shape) == (3, 7, 48) and tuple(a.shape) == (3, 7, 64)
    too_long = torch.export.Dim("too_long", min=1, max=41)  # one more than the position table's rows
    with pytest.raises(Exception, match="too_long"):
        torch.export.export(M(), args, dynamic_shapes=tuple({0: b, 1: too_long} for _ in args))
