"""bsbert.triton.attention (pruned-head flash attention) against float64 references.

GPU when there is one, else CPU tensors through the Triton interpreter (set up by tests/conftest.py).
Small shapes; sequence lengths cross the kernel's 32-key tile so the online softmax is exercised.
Error criterion as in test_triton_bsr_linear.py: at most 2x the error of the same attention computed
by PyTorch in the same dtype (naive softmax(q k^T * scale) v), vs float64, plus a tiny floor.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import bsbert.triton as bt  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if bt.not_supported_reasons(DEVICE, torch.float32):
    pytest.skip(f"triton kernels unusable here: {bt.not_supported_reasons(DEVICE, torch.float32)}",
                allow_module_level=True)

from bsbert.triton.attention import (  # noqa: E402
    pruned_attention_triton,
    pruned_attention_varlen_triton,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _assert_close(out, ref64, torch_out, factor=2.0):
    assert out.shape == ref64.shape and out.dtype == torch_out.dtype
    assert torch.isfinite(out).all()
    if out.numel() == 0:
        return
    out64, t64 = out.double(), torch_out.double()
    eps = torch.finfo(out.dtype).eps
    err, terr = (out64 - ref64).norm().item(), (t64 - ref64).norm().item()
    assert err <= factor * terr + 1e-6 * eps * ref64.norm().item() + 1e-30, (
        f"normwise error {err:.3e} > {factor} x torch's {terr:.3e}")
    emax, tmax = (out64 - ref64).abs().max().item(), (t64 - ref64).abs().max().item()
    amax = ref64.abs().max().item()
    assert emax <= factor * tmax + 0.5 * eps * amax + 1e-30, (
        f"max error {emax:.3e} > {factor} x torch's {tmax:.3e} (max |out| {amax:.3e})")


def _ref_attention(qkv, mask, h, d, scale):
    """softmax(q k^T * scale) v per head in qkv's dtype; fully masked queries -> 0. [B,S,3HD]->[B,S,HD]."""
    b, s, _ = qkv.shape
    q, k, v = qkv.view(b, s, 3, h, d).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    return (p @ v).permute(0, 2, 1, 3).reshape(b, s, h * d)


def _qkv(shape, dtype, gen, big=False):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if big:  # larger logits: sharper softmax, stresses the running max
        x = x * 3
    return x.to(dtype).to(DEVICE)


def _check_padded(qkv, mask, h, d, scale):
    out = pruned_attention_triton(qkv, mask, h, d, scale)
    ref = _ref_attention(qkv.double(), mask, h, d, scale)
    tor = _ref_attention(qkv, mask, h, d, scale)
    _assert_close(out, ref, tor)
    return out


@pytest.mark.parametrize("mask_kind", ["none", "padded"])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padded_matches_reference(dtype, head_dim, heads, mask_kind):
    gen = torch.Generator().manual_seed(head_dim + heads)
    b, s = 3, 37
    qkv = _qkv((b, s, 3 * heads * head_dim), dtype, gen, big=heads == 3)
    mask = None
    if mask_kind == "padded":
        lengths = torch.tensor([37, 20, 0])  # full, padded tail, fully padded sequence
        mask = (torch.arange(s)[None, :] < lengths[:, None]).to(DEVICE)
    out = _check_padded(qkv, mask, heads, head_dim, 1 / math.sqrt(head_dim))
    if mask is not None:  # documented: no valid key -> zeros
        assert out[2].abs().max().item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_random_mask_and_odd_scale(dtype):
    gen = torch.Generator().manual_seed(1)
    b, s, h, d = 2, 45, 2, 32
    qkv = _qkv((b, s, 3 * h * d), dtype, gen)
    mask = (torch.rand(b, s, generator=gen) < 0.6).to(DEVICE)
    mask[1, :] = False
    mask[1, 44] = True  # a single valid key, at the very end
    _check_padded(qkv, mask, h, d, 0.37)


def test_seq_len_one_and_strided_qkv():
    gen = torch.Generator().manual_seed(2)
    h, d = 2, 32
    big = _qkv((2, 1, 3 * h * d + 16), torch.float32, gen)
    _check_padded(big[..., 8:8 + 3 * h * d], None, h, d, 0.2)  # S=1, token stride != 3HD
    big = _qkv((2, 40, 2 * 3 * h * d), torch.float32, gen)
    _check_padded(big[..., ::2], None, h, d, 0.2)  # last-dim stride 2


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_matches_reference(dtype, head_dim):
    gen = torch.Generator().manual_seed(10 + head_dim)
    h = 2
    lengths = [1, 0, 35, 4, 0]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    qkv = _qkv((int(cu[-1]), 3 * h * head_dim), dtype, gen)
    scale = 1 / math.sqrt(head_dim)
    out = pruned_attention_varlen_triton(qkv, cu.to(DEVICE), max(lengths), h, head_dim, scale)
    assert out.shape == (int(cu[-1]), h * head_dim)
    refs, tors = [], []
    for i in range(len(lengths)):
        seg = qkv[int(cu[i]):int(cu[i + 1])][None]
        refs.append(_ref_attention(seg.double(), None, h, head_dim, scale)[0])
        tors.append(_ref_attention(seg, None, h, head_dim, scale)[0])
    _assert_close(out, torch.cat(refs), torch.cat(tors))


def test_varlen_equals_padded():
    gen = torch.Generator().manual_seed(3)
    h, d, s = 3, 32, 36
    lengths = torch.tensor([36, 7, 1])
    mask = torch.arange(s)[None, :] < lengths[:, None]
    qkv = _qkv((3, s, 3 * h * d), torch.float32, gen)
    padded = pruned_attention_triton(qkv, mask.to(DEVICE), h, d, 0.125)
    packed = qkv[mask.to(DEVICE)]
    cu = torch.tensor([0] + lengths.cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    var = pruned_attention_varlen_triton(packed, cu, s, h, d, 0.125)
    torch.testing.assert_close(var, padded[mask.to(DEVICE)], atol=1e-6, rtol=1e-5)


def test_varlen_degenerate():
    h, d = 1, 32
    # no sequences, and only empty sequences
    for cu in ([0], [0, 0, 0]):
        out = pruned_attention_varlen_triton(torch.empty(0, 3 * h * d, device=DEVICE),
                                             torch.tensor(cu, dtype=torch.int32, device=DEVICE),
                                             0, h, d, 0.1)
        assert out.shape == (0, h * d)
    # all sequences of length 1: output is exactly v
    qkv = torch.randn(4, 3 * h * d, device=DEVICE)
    cu = torch.arange(5, dtype=torch.int32, device=DEVICE)
    out = pruned_attention_varlen_triton(qkv, cu, 1, h, d, 0.1)
    torch.testing.assert_close(out, qkv[:, 2 * h * d:])


def test_zero_heads():
    out = pruned_attention_triton(torch.empty(2, 5, 0, device=DEVICE), None, 0, 64, 0.1)
    assert out.shape == (2, 5, 0)


def test_registered_ops_and_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen = torch.Generator().manual_seed(4)
    h, d = 2, 32
    qkv = _qkv((2, 9, 3 * h * d), torch.float32, gen)
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    a = torch.ops.bsbert.triton_pruned_attention(qkv, mask, h, d, 0.2)
    torch.testing.assert_close(a, pruned_attention_triton(qkv, None, h, d, 0.2))
    flat = qkv.reshape(18, -1)
    cu = torch.tensor([0, 9, 18], dtype=torch.int32, device=DEVICE)
    v = torch.ops.bsbert.triton_pruned_attention_varlen(flat, cu, 9, h, d, 0.2)
    torch.testing.assert_close(v.reshape(2, 9, -1), a)
    with FakeTensorMode() as mode:
        fq, fm, ff, fc = (mode.from_tensor(t) for t in (qkv, mask, flat, cu))
        assert torch.ops.bsbert.triton_pruned_attention(fq, fm, h, d, 0.2).shape == (2, 9, h * d)
        assert torch.ops.bsbert.triton_pruned_attention_varlen(ff, fc, 9, h, d, 0.2).shape == (18, h * d)
    torch.library.opcheck(torch.ops.bsbert.triton_pruned_attention.default, (qkv, mask, h, d, 0.2),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.bsbert.triton_pruned_attention_varlen.default,
                          (flat, cu, 9, h, d, 0.2), test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs():
    qkv = torch.randn(1, 4, 3 * 2 * 32, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        pruned_attention_triton(torch.randn(1, 4, 3 * 48, device=DEVICE), None, 1, 48, 0.1)
    with pytest.raises(ValueError, match="last dim"):
        pruned_attention_triton(qkv, None, 3, 32, 0.1)
    with pytest.raises(ValueError, match="key_padding_mask"):
        pruned_attention_triton(qkv, torch.ones(1, 5, dtype=torch.bool, device=DEVICE), 2, 32, 0.1)
    with pytest.raises(ValueError, match="int32"):
        pruned_attention_varlen_triton(qkv[0], torch.tensor([0, 4], device=DEVICE), 4, 2, 32, 0.1)


@pytest.mark.parametrize("scale,match", [(float("inf"), "scale must be finite"), (float("nan"), "scale must be finite"),
                                         (3e38, "overflows fp32")])
def test_scale_that_is_not_a_finite_fp32(scale, match):
    # the kernel takes scale x log2(e) as an fp32: inf / NaN (or a finite scale that overflows there) gave all-NaN
    # outputs; the CPU op refused inf / NaN already
    qkv = torch.randn(1, 4, 3 * 32, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        pruned_attention_triton(qkv, None, 1, 32, scale)
    with pytest.raises(ValueError, match=match):
        pruned_attention_varlen_triton(qkv[0], torch.tensor([0, 4], dtype=torch.int32, device=DEVICE), 4, 1, 32,
                                       scale)


def _varlen_raises(qkv, cu, max_seqlen, match, h=2, d=32):
    with pytest.raises(ValueError, match=match):
        pruned_attention_varlen_triton(qkv, cu, max_seqlen, h, d, 0.1)


def test_varlen_bad_cu_seqlens():
    """Same checks, in the same words, as the CPU op (csrc/cpu/pruned_attention_cpu.cpp). The shape,
    dtype and device checks hold everywhere; each of these used to launch and read / write outside the
    sequences (wrong rows, or a crash)."""
    h, d = 2, 32
    qkv = torch.randn(80, 3 * h * d, device=DEVICE)

    def cu(*v):
        return torch.tensor(v, dtype=torch.int32, device=DEVICE)

    _varlen_raises(qkv, cu(0, 10), -1, r"max_seqlen must be >= 0, got -1")
    _varlen_raises(qkv, cu(0, 10).long(), 10, r"cu_seqlens must be int32, got torch.int64")
    _varlen_raises(qkv, cu(0, 10)[None], 10, r"cu_seqlens must be 1-D \[batch \+ 1\], got shape \(1, 2\)")
    _varlen_raises(qkv, cu(), 10, r"cu_seqlens must be 1-D \[batch \+ 1\], got shape \(0,\)")
    # a meta argument dispatches to the fake kernel: it too must refuse (not return an unwritten tensor)
    _varlen_raises(qkv, cu(0, 10).to("meta"), 10, r"cu_seqlens is on meta but qkv is on")
    with pytest.raises(ValueError, match="key_padding_mask is on meta but qkv is on"):
        pruned_attention_triton(qkv.view(1, 80, -1), torch.ones(1, 80, dtype=torch.bool, device="meta"),
                                h, d, 0.1)


def test_varlen_cu_seqlens_values():
    """cu_seqlens' values: under the interpreter (CPU tensors) they are checked, in the CPU op's words.
    On a GPU they are not read on the host (a device -> host sync per call, not allowed in CUDA-graph
    capture), so the kernel clamps every sequence to the tokens there are: bad values must stay inside
    qkv and out (seen on an H200 in stop 30: this test used to expect the CPU's errors there too)."""
    h, d = 2, 32
    qkv = torch.randn(80, 3 * h * d, device=DEVICE)

    def cu(*v):
        return torch.tensor(v, dtype=torch.int32, device=DEVICE)

    if DEVICE == "cpu":
        _varlen_raises(qkv, cu(0, 80), 1, r"sequence 0 has 80 tokens, more than max_seqlen = 1")
        _varlen_raises(qkv[:40], cu(0, 80), 80, r"cu_seqlens\[-1\] = 80 exceeds the 40 tokens of qkv")
        _varlen_raises(qkv, cu(0, 10, 5), 10, r"cu_seqlens must be non-decreasing, got 10 then 5 at index 1")
        _varlen_raises(qkv, cu(3, 10), 10, r"cu_seqlens\[0\] must be 0, got 3")
        return
    ref = pruned_attention_varlen_triton(qkv, cu(0, 30, 80), 50, h, d, 0.1)
    # the last sequence's end far past the 80 tokens: clamped to them
    out = pruned_attention_varlen_triton(qkv, cu(0, 30, 4000), 4000, h, d, 0.1)
    torch.cuda.synchronize()  # (an out-of-bounds access would surface here as a CUDA error)
    torch.testing.assert_close(out, ref)
    # a decreasing bound: that sequence is empty (zeros), the one before it is computed as usual
    out = pruned_attention_varlen_triton(qkv, cu(0, 30, 5), 50, h, d, 0.1)
    torch.cuda.synchronize()
    torch.testing.assert_close(out[:30], ref[:30])
    assert torch.count_nonzero(out[30:]) == 0


def test_varlen_tail_rows_are_zero_and_strided_cu():
    """Rows past cu_seqlens[-1] belong to no sequence: zeros (the CPU op does the same), not whatever
    the allocator hands back. The NaN tensor freed just before makes stale memory likely to show."""
    gen = torch.Generator().manual_seed(5)
    h, d, t = 2, 32, 14
    qkv = _qkv((t, 3 * h * d), torch.float32, gen)
    torch.full((t, h * d), float("nan"), device=DEVICE)  # freed at once; its memory is likely reused
    # a strided cu_seqlens ([0, 5, 9]): the kernel must not read the elements in between
    cu = torch.tensor([0, 0, 5, 5, 9, 9], dtype=torch.int32, device=DEVICE)[::2]
    out = pruned_attention_varlen_triton(qkv, cu, 5, h, d, 0.2)
    assert out.shape == (t, h * d)
    assert bool((out[9:] == 0).all())
    refs, tors = [], []
    for a, b in ((0, 5), (5, 9)):
        refs.append(_ref_attention(qkv[a:b][None].double(), None, h, d, 0.2)[0])
        tors.append(_ref_attention(qkv[a:b][None], None, h, d, 0.2)[0])
    _assert_close(out[:9], torch.cat(refs), torch.cat(tors))
    # no token in any sequence (max_seqlen 0, no launch): every row is a tail row
    torch.full((t, h * d), float("nan"), device=DEVICE)
    zero = pruned_attention_varlen_triton(qkv, torch.tensor([0, 0], dtype=torch.int32, device=DEVICE),
                                          0, h, d, 0.2)
    assert bool((zero == 0).all())


def _attn_config_ids():
    from bsbert.triton.attention import _attn_configs

    return [f"m{c.kwargs['BLOCK_M']}n{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}" for c in _attn_configs()]


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", range(len(_attn_config_ids())), ids=_attn_config_ids())
def test_every_tuning_config_matches_reference(monkeypatch, cfg):
    # Each autotuning config forced (the other tests run the fixed one: BSBERT_TRITON_AUTOTUNE=0 in
    # tests/conftest.py), padded with a mask and varlen, lengths that cross its tiles.
    from bsbert.triton import _common
    from bsbert.triton import attention as ta

    if DEVICE != "cuda":
        pytest.skip("the tuning configs are compiled for a GPU (the interpreter runs one config)")
    c = ta._attn_configs()[cfg]
    monkeypatch.setenv("BSBERT_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(ta, "_fixed_attn_kernel", lambda: _common.fixed_config_kernel(
        ta._attn_kernel, dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages))
    gen = torch.Generator().manual_seed(cfg)
    s = 2 * max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) + 5
    for dtype in (torch.float16, torch.bfloat16):
        qkv = _qkv((3, s, 3 * 2 * 64), dtype, gen, big=True)
        lengths = torch.tensor([s, s // 2 + 1, 0])
        mask = (torch.arange(s)[None, :] < lengths[:, None]).to(DEVICE)
        _check_padded(qkv, mask, 2, 64, 0.125)
        cu = torch.tensor([0, s, s + 7, 2 * s], dtype=torch.int32, device=DEVICE)
        flat = qkv.reshape(-1, qkv.shape[-1])[: 2 * s]
        out = pruned_attention_varlen_triton(flat, cu, s, 2, 64, 0.125)
        for a, b in ((0, s), (s, s + 7), (s + 7, 2 * s)):
            seq = flat[a:b][None]
            _assert_close(out[a:b][None], _ref_attention(seq.double(), None, 2, 64, 0.125),
                          _ref_attention(seq, None, 2, 64, 0.125))


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU interpreter: the storage is a host allocation")
def test_token_offsets_past_int32():
    # a [B, S, 3HD] view of sequence-major memory has token stride B x 3HD: offs * stride_qs was int32, so
    # token 2 at 2^31 elements wrapped to the storage's start and read what lay there
    T, O, W = 2**30, 2**31, 96
    from tests.helpers import huge_storage

    store = huge_storage(O + 2 * T + W)
    qkv = store.as_strided((1, 3, W), (0, T, 1), storage_offset=O)
    g = torch.Generator().manual_seed(0)
    for j in range(3):
        store[O + j * T:O + j * T + W] = torch.randn(W, generator=g).half()
    store[:W] = 100.0
    out = pruned_attention_triton(qkv, None, 1, 32, 0.2)
    ref = _ref_attention(qkv.clone().double(), None, 1, 32, 0.2)
    assert (out.double() - ref).abs().max().item() < 1e-2


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU interpreter: the storage is a host allocation")
def test_column_offsets_past_int32():
    # a qkv whose last dim is strided (column-major [3HD, tokens] memory seen as [B, S, 3HD]): the V columns'
    # (2HD + d) * stride_qd was int32 and passed 2^31 at stride 2^25, reading outside the storage
    SD, W = 2**25, 96
    from tests.helpers import huge_storage

    store = huge_storage(W * SD + 1)
    qkv = store.as_strided((1, 1, W), (0, 0, SD))
    vals = torch.randn(W, generator=torch.Generator().manual_seed(0)).half()
    for c in range(W):
        store[c * SD] = vals[c]
    out = pruned_attention_triton(qkv, None, 1, 32, 0.2)
    # one token attends to itself only: the output is its V
    assert torch.equal(out[0, 0], vals[64:96]), (out[0, 0, :4], vals[64:68])
