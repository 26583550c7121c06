"""Numerical tests of the CUDA kernels (csrc/cuda) against float64 references, plus torch.library.opcheck.

Everything here needs a GPU (marked ``cuda``; tests/conftest.py skips them otherwise) and the compiled
extension with its CUDA kernels (skipped with a reason when bsbert._C has no CUDA kernel for an op).
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from bsbert.ops.linear_backends import CudaBsr

pytestmark = pytest.mark.cuda

DEV = "cuda"
TOL = {torch.float16: dict(atol=1e-2, rtol=1e-2), torch.bfloat16: dict(atol=4e-2, rtol=2e-2),
       torch.float32: dict(atol=1e-4, rtol=1e-4)}


def _require_cuda_kernel(op: str):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import bsbert  # noqa: F401  (loads bsbert._C, registering torch.ops.bsbert.*)

    if not hasattr(torch.ops.bsbert, op) or not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"bsbert::{op}", "CUDA"):
        pytest.skip(f"bsbert._C has no CUDA kernel for {op} (built without CUDA?)")


def _has_fake(op: str) -> bool:
    try:
        import bsbert.ops  # noqa: F401  (registers the fake kernels, if that module provides them)
    except Exception:
        pass
    try:
        from torch._library.simple_registry import singleton

        if singleton.find(f"bsbert::{op}").fake_impl.kernel is not None:
            return True
    except Exception:
        pass
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"bsbert::{op}", "Meta")


# ------------------------------------------------------------------------------------------------------
# bsr_linear
# ------------------------------------------------------------------------------------------------------
def _random_bsr_weight(n, k, block, density, gen, empty_row=True):
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) / math.sqrt(max(k, 1))
    nb, kb = -(-n // block), -(-k // block)
    keep = torch.rand(nb, kb, generator=gen) < density
    if empty_row and nb > 1:
        keep[nb // 2] = False  # an empty block row: outputs are bias (+ GELU) only
    mask = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return w * mask


def _ref_linear(x, w, bias, gelu):
    y = x.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    if gelu:
        y = 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))
    return y


def _bsr_call(x, bsm, bias, gelu):
    n, k = bsm.shape
    return torch.ops.bsbert.bsr_linear(x, bsm.crow_indices, bsm.col_indices, bsm.values, bias, n, k, bsm.block,
                                       gelu)


BSR_CASES = [
    # (leading shape of x, N, K, block, density)
    ((1,), 64, 64, 32, 0.5),          # M = 1
    ((37,), 96, 128, 32, 0.6),        # odd M
    ((2, 65), 100, 90, 32, 0.5),      # N, K not multiples of the block; K % 8 != 0 (padded-x path)
    ((130,), 200, 136, 16, 0.4),      # block 16, M over one 128 tile
    ((3, 50), 130, 200, 64, 0.5),     # block 64, ragged N/K
    ((300,), 768, 768, 32, 0.3),      # BERT-like, several M tiles and groups
    ((1100,), 256, 96, 32, 1.0),      # fully dense, 128-row tiles
    ((17,), 48, 40, 16, 0.0),         # all-zero matrix (no stored block)
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead,n,k,block,density", BSR_CASES)
@pytest.mark.parametrize("bias_on,gelu", [(False, False), (True, False), (False, True), (True, True)])
def test_bsr_linear_matches_float64(dtype, lead, n, k, block, density, bias_on, gelu):
    _require_cuda_kernel("bsr_linear")
    from bsbert.formats import BlockSparseMatrix

    gen = torch.Generator().manual_seed(hash((lead, n, k, block, bias_on, gelu)) % 2**31)
    w = _random_bsr_weight(n, k, block, density, gen).to(dtype)  # the reference weight, as stored
    bsm = BlockSparseMatrix.from_dense(w, block, pad=True).to(DEV)
    x = torch.randn(*lead, k, generator=gen).to(dtype).to(DEV)
    bias = (torch.randn(n, generator=gen) * 0.5).to(dtype).to(DEV) if bias_on else None
    y = _bsr_call(x, bsm, bias, gelu)
    torch.cuda.synchronize()
    assert y.shape == (*lead, n) and y.dtype == dtype and y.is_contiguous()
    ref = _ref_linear(x.cpu(), w, None if bias is None else bias.cpu(), gelu)
    torch.testing.assert_close(y.cpu().double(), ref, **TOL[dtype])


@pytest.mark.parametrize("block,tile", [(b, t) for b, ts in CudaBsr.TILES.items() for t in ts])
def test_bsr_linear_every_tile_config(block, tile, monkeypatch):
    """BSBERT_CUDA_BSR_TILE forces each tile configuration (the default heuristic reaches only some of them
    on test-sized problems): M = 1 and ragged M over several tiles, ragged N and K, an empty block row
    and a fully dense matrix, bias+GELU."""
    _require_cuda_kernel("bsr_linear")
    from bsbert.formats import BlockSparseMatrix

    monkeypatch.setenv("BSBERT_CUDA_BSR_TILE", tile)
    _skip_unless_runnable(block, tile)
    bm, warps = (int(v) for v in re.fullmatch(r"(?:wg)?(?:slab)?(\d+)x(\d+)", tile).groups())
    gen = torch.Generator().manual_seed(block * 1000 + bm + warps + 7 * ("slab" in tile) + 13 * ("wg" in tile))
    n, k = 3 * block + 5, 4 * block + 8
    w = _random_bsr_weight(n, k, block, 0.6, gen)
    w[block:2 * block] = 0  # one block row with no stored block
    dense_w = torch.randn(n, k, generator=gen, dtype=torch.float64) / math.sqrt(k)
    for weight in (w, dense_w):
        for m in (1, 2 * bm + 37):
            for dtype in (torch.float16, torch.bfloat16):
                wq = weight.to(dtype)  # the reference weight, as stored
                bsm = BlockSparseMatrix.from_dense(wq, block, pad=True).to(DEV)
                x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
                bias = torch.randn(n, generator=gen).to(dtype).to(DEV)
                y = _bsr_call(x, bsm, bias, True)
                ref = _ref_linear(x.cpu(), wq, bias.cpu(), True)
                torch.testing.assert_close(y.cpu().double(), ref, **TOL[dtype])


SLAB_TILES = [t for t in CudaBsr.TILES[32] if "slab" in t]


def _skip_unless_runnable(block, tile):
    """The wgmma tiles run on compute capability 9.0 only; elsewhere, forcing one must be a clear error."""
    if tile not in CudaBsr.runnable_tiles(block):
        from bsbert.formats import BlockSparseMatrix

        bsm = BlockSparseMatrix.from_dense(torch.randn(32, 64, dtype=torch.float16), 32).to(DEV)
        with pytest.raises(RuntimeError, match="needs Hopper wgmma"):
            _bsr_call(torch.randn(8, 64, dtype=torch.float16, device=DEV), bsm, None, False)
        pytest.skip(f"{tile} needs a compute capability 9.0 GPU (checked: a clear error here)")


@pytest.mark.parametrize("tile", SLAB_TILES)
@pytest.mark.parametrize("pattern", ["random", "skewed"])
def test_bsr_linear_slab_long_runs(tile, pattern, monkeypatch):
    """The x-slab kernel's persistent grid: with more (M tile, block row) units than CTAs, each CTA's run
    crosses M tiles (several slab loads) and its warps take several block rows each (W rings prefetching
    across block rows). 'skewed': all blocks in three block rows, so the weight-balanced split hands some
    CTAs a single heavy row and others many empty ones. Checked against float64 and the default tile."""
    _require_cuda_kernel("bsr_linear")
    from bsbert.formats import BlockSparseMatrix

    monkeypatch.setenv("BSBERT_CUDA_BSR_TILE", tile)
    _skip_unless_runnable(32, tile)
    gen = torch.Generator().manual_seed(len(tile) * 31 + len(pattern))
    m, n, k = 3000, 1000, 1000  # K % 64 != 0 (and K % 32 != 0): the slab's last columns are zero-filled
    if pattern == "random":
        w = _random_bsr_weight(n, k, 32, 0.3, gen)
    else:
        w = torch.zeros(n, k, dtype=torch.float64)
        for rb in (0, 7, 31):
            w[rb * 32:(rb + 1) * 32] = torch.randn(min(32, n - rb * 32), k, generator=gen, dtype=torch.float64)
        w /= math.sqrt(k)
    for dtype in (torch.float16, torch.bfloat16):
        wq = w.to(dtype)  # the reference weight, as stored
        bsm = BlockSparseMatrix.from_dense(wq, 32, pad=True).to(DEV)
        x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
        bias = torch.randn(n, generator=gen).to(dtype).to(DEV)
        monkeypatch.delenv("BSBERT_CUDA_BSR_TILE", raising=False)
        y_default = _bsr_call(x, bsm, bias, True)
        monkeypatch.setenv("BSBERT_CUDA_BSR_TILE", tile)
        y = _bsr_call(x, bsm, bias, True)
        ref = _ref_linear(x.cpu(), wq, bias.cpu(), True)
        torch.testing.assert_close(y.cpu().double(), ref, **TOL[dtype])
        torch.testing.assert_close(y, y_default)


def test_bsr_linear_default_tile_at_bert_large_sizes(monkeypatch):
    """The default dispatch at sizes where it picks the x-slab kernel (M = 12288, N = 1024: >= 32 units per
    SM) and where the slab cannot fit (K = 4096): float64 reference and a forced rows x warps tile agree."""
    _require_cuda_kernel("bsr_linear")
    from bsbert.formats import BlockSparseMatrix

    gen = torch.Generator().manual_seed(11)
    for m, n, k in ((12288, 1024, 1024), (12288, 256, 4096)):
        w = _random_bsr_weight(n, k, 32, 0.25, gen).half()  # the reference weight, as stored
        bsm = BlockSparseMatrix.from_dense(w, 32, pad=True).to(DEV)
        x = torch.randn(m, k, generator=gen).half().to(DEV)
        monkeypatch.delenv("BSBERT_CUDA_BSR_TILE", raising=False)
        y = _bsr_call(x, bsm, None, False)
        monkeypatch.setenv("BSBERT_CUDA_BSR_TILE", "128x4")
        torch.testing.assert_close(y, _bsr_call(x, bsm, None, False))
        ref = _ref_linear(x[:512].cpu(), w, None, False)
        torch.testing.assert_close(y[:512].cpu().double(), ref, **TOL[torch.float16])


def test_bsr_linear_slab_too_wide_names_the_limit(monkeypatch):
    """A slab that cannot fit in shared memory (64 rows x K=8192 x 2 bytes = 1 MiB) is an error naming the
    shared-memory need, not a failed launch or a wrong answer."""
    _require_cuda_kernel("bsr_linear")
    from bsbert.formats import BlockSparseMatrix

    bsm = BlockSparseMatrix.from_dense(torch.randn(64, 8192, dtype=torch.float16), 32).to(DEV)
    monkeypatch.setenv("BSBERT_CUDA_BSR_TILE", "slab64x8")
    with pytest.raises(RuntimeError, match="shared memory for in_features=8192"):
        _bsr_call(torch.randn(8, 8192, dtype=torch.float16, device=DEV), bsm, None, False)


@pytest.mark.parametrize("tile", ["256x8", "128", "banana", "128x16", "slab128x8", "slab64x8x", "wgslab64x16",
                                  "wgslab64x4"])
def test_bsr_linear_rejects_bad_tile_config(tile, monkeypatch):
    _require_cuda_kernel("bsr_linear")
    from bsbert.formats import BlockSparseMatrix

    bsm = BlockSparseMatrix.from_dense(torch.randn(64, 64, dtype=torch.float16), 64).to(DEV)
    monkeypatch.setenv("BSBERT_CUDA_BSR_TILE", tile)
    with pytest.raises(RuntimeError, match="BSBERT_CUDA_BSR_TILE"):
        _bsr_call(torch.randn(8, 64, dtype=torch.float16, device=DEV), bsm, None, False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bsr_linear_strided_and_unaligned_x(dtype):
    _require_cuda_kernel("bsr_linear")
    from bsbert.formats import BlockSparseMatrix

    gen = torch.Generator().manual_seed(7)
    n, k = 96, 128
    w = _random_bsr_weight(n, k, 32, 0.5, gen).to(dtype)  # the reference weight, as stored
    bsm = BlockSparseMatrix.from_dense(w, 32).to(DEV)
    big = torch.randn(40, k + 3, generator=gen).to(dtype).to(DEV)
    for x in (big[:, 1:k + 1], big[:, :k].t().contiguous().t(), big[::2, 2:k + 2]):
        y = _bsr_call(x, bsm, None, False)
        ref = _ref_linear(x.cpu(), w, None, False)
        torch.testing.assert_close(y.cpu().double(), ref, **TOL[dtype])


def test_bsr_linear_empty_inputs():
    _require_cuda_kernel("bsr_linear")
    from bsbert.formats import BlockSparseMatrix

    bsm = BlockSparseMatrix.from_dense(torch.randn(64, 32, dtype=torch.float16), 32).to(DEV)
    x = torch.randn(0, 32, dtype=torch.float16, device=DEV)
    assert _bsr_call(x, bsm, None, False).shape == (0, 64)


@pytest.mark.parametrize("gelu", [False, True])
def test_bsr_linear_no_inputs_gives_the_bias(gelu):
    # in_features = 0: y = bias (then GELU), as the CPU op; x.reshape(-1, 0) used to fail before any check
    _require_cuda_kernel("bsr_linear")
    from bsbert.formats import BlockSparseMatrix

    bsm = BlockSparseMatrix.from_dense(torch.zeros(64, 0), 32, pad=True, dtype=torch.float16).to(DEV)
    x = torch.randn(4, 0, dtype=torch.float16, device=DEV)
    bias = torch.randn(64, dtype=torch.float16, device=DEV)
    y = _bsr_call(x, bsm, bias, gelu)
    want = torch.nn.functional.gelu(bias.float()) if gelu else bias.float()
    torch.testing.assert_close(y.float(), want.expand(4, 64), **TOL[torch.float16])
    assert torch.equal(_bsr_call(x, bsm, None, False), torch.zeros(4, 64, dtype=torch.float16, device=DEV))


def test_cuda_kernels_have_code_for_this_gpu():
    # the probe patch's backends ask before offering the CUDA kernels (no kernel image -> not eligible)
    _require_cuda_kernel("bsr_linear")
    from bsbert import _ext

    assert _ext.load().cuda_kernel_problem(torch.cuda.current_device()) == ""
    assert _ext.cuda_kernel_problem(torch.device(DEV)) is None


def test_bsr_linear_errors_name_the_problem():
    _require_cuda_kernel("bsr_linear")
    from bsbert.formats import BlockSparseMatrix

    bsm = BlockSparseMatrix.from_dense(torch.randn(64, 64, dtype=torch.float16), 32).to(DEV)
    x = torch.randn(4, 64, dtype=torch.float16, device=DEV)
    op = torch.ops.bsbert.bsr_linear
    with pytest.raises(RuntimeError, match="int32"):
        op(x, bsm.crow_indices.long(), bsm.col_indices, bsm.values, None, 64, 64, 32, False)
    with pytest.raises(RuntimeError, match="dtype"):
        op(x, bsm.crow_indices, bsm.col_indices, bsm.values.float(), None, 64, 64, 32, False)
    with pytest.raises(RuntimeError, match="in_features"):
        op(x[:, :48], bsm.crow_indices, bsm.col_indices, bsm.values, None, 64, 64, 32, False)
    with pytest.raises(RuntimeError, match="block"):
        op(x, bsm.crow_indices, bsm.col_indices, bsm.values, None, 64, 64, 48, False)
    with pytest.raises(RuntimeError, match="crow_indices"):
        op(x, bsm.crow_indices[:-1], bsm.col_indices, bsm.values, None, 64, 64, 32, False)
    with pytest.raises(RuntimeError, match="bias"):
        op(x, bsm.crow_indices, bsm.col_indices, bsm.values, torch.zeros(63, dtype=x.dtype, device=DEV),
           64, 64, 32, False)
    with pytest.raises(RuntimeError, match="CUDA"):
        op(x.cpu(), bsm.crow_indices, bsm.col_indices, bsm.values, None, 64, 64, 32, False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bsr_linear_opcheck(dtype):
    _require_cuda_kernel("bsr_linear")
    if not _has_fake("bsr_linear"):
        pytest.skip("no fake kernel registered for bsbert::bsr_linear")
    from bsbert.formats import BlockSparseMatrix

    bsm = BlockSparseMatrix.from_dense(torch.randn(80, 70).to(dtype), 32, pad=True).to(DEV)
    x = torch.randn(3, 5, 70, dtype=dtype, device=DEV)
    bias = torch.randn(80, dtype=dtype, device=DEV)
    torch.library.opcheck(torch.ops.bsbert.bsr_linear,
                          (x, bsm.crow_indices, bsm.col_indices, bsm.values, bias, 80, 70, 32, True))


# ------------------------------------------------------------------------------------------------------
# pruned_attention / pruned_attention_varlen
# ------------------------------------------------------------------------------------------------------
def _ref_attention(qkv, mask, h, d, scale):
    """qkv [B, S, 3*H*D] (any dtype) -> float64 [B, S, H*D]; all-masked queries give zeros."""
    b, s, _ = qkv.shape
    t = qkv.double().view(b, s, 3, h, d).permute(2, 0, 3, 1, 4)  # 3, B, H, S, D
    q, k, v = t[0], t[1], t[2]
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    return (p @ v).permute(0, 2, 1, 3).reshape(b, s, h * d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,s,h,d", [(1, 1, 1, 64), (2, 17, 3, 64), (2, 130, 2, 32), (3, 64, 4, 64),
                                     (1, 200, 12, 64)])
@pytest.mark.parametrize("masked", [False, True])
def test_pruned_attention_matches_float64(dtype, b, s, h, d, masked):
    _require_cuda_kernel("pruned_attention")
    gen = torch.Generator().manual_seed(b * 1000 + s * 10 + h + d)
    qkv = torch.randn(b, s, 3 * h * d, generator=gen).to(dtype)
    mask = None
    if masked:
        lens = torch.randint(1, s + 1, (b,), generator=gen)
        mask = torch.arange(s)[None, :] < lens[:, None]
        mask[-1] = False  # a fully padded sequence: its queries see no key -> zeros
    scale = 1.0 / math.sqrt(d)
    out = torch.ops.bsbert.pruned_attention(qkv.to(DEV), None if mask is None else mask.to(DEV), h, d, scale)
    ref = _ref_attention(qkv, mask, h, d, scale)
    assert out.shape == (b, s, h * d) and out.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), ref, **TOL[dtype])
    if masked:
        assert bool((out[-1] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pruned_attention_strided_qkv(dtype):
    _require_cuda_kernel("pruned_attention")
    b, s, h, d = 2, 70, 2, 64
    big = torch.randn(b, s, 3 * h * d + 16, dtype=dtype, device=DEV)
    for qkv in (big[..., :3 * h * d], big[..., 1:3 * h * d + 1]):  # in-place strides; unaligned -> copy
        out = torch.ops.bsbert.pruned_attention(qkv, None, h, d, 0.125)
        torch.testing.assert_close(out.cpu().double(), _ref_attention(qkv.cpu(), None, h, d, 0.125), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pruned_attention_contiguous_but_unaligned_qkv(dtype):
    # contiguous, starting 2 bytes past a 16-byte boundary: .contiguous() returned it as is and the
    # kernel's 16-byte cp.async copies read misaligned addresses; the op now copies it (padded and varlen)
    _require_cuda_kernel("pruned_attention")
    b, s, h, d = 2, 70, 2, 64
    buf = torch.randn(1 + b * s * 3 * h * d, dtype=dtype, device=DEV)
    qkv = buf[1:].view(b, s, 3 * h * d)
    assert qkv.is_contiguous() and qkv.data_ptr() % 16 != 0
    out = torch.ops.bsbert.pruned_attention(qkv, None, h, d, 0.125)
    torch.testing.assert_close(out.cpu().double(), _ref_attention(qkv.cpu(), None, h, d, 0.125), **TOL[dtype])
    flat = buf[1:1 + s * 3 * h * d].view(s, 3 * h * d)
    cu = torch.tensor([0, s], dtype=torch.int32, device=DEV)
    out = torch.ops.bsbert.pruned_attention_varlen(flat, cu, s, h, d, 0.125)
    torch.testing.assert_close(out.cpu().double(), _ref_attention(flat[None].cpu(), None, h, d, 0.125)[0],
                               **TOL[dtype])


def test_pruned_attention_varlen_untrusted_lengths_stay_in_bounds():
    # The CUDA op trusts cu_seqlens / max_seqlen (reading them is a sync): a too-small max_seqlen still
    # gives every row (each CTA loops over the query tiles), max_seqlen = 0 too (it returned zeros), and
    # sequence bounds past the tokens are clamped to them (they read and wrote outside qkv and out).
    _require_cuda_kernel("pruned_attention_varlen")
    h, d, t = 2, 64, 150
    qkv = torch.randn(t, 3 * h * d, dtype=torch.float16, device=DEV)
    cu = torch.tensor([0, 70, t], dtype=torch.int32, device=DEV)
    ref = torch.ops.bsbert.pruned_attention_varlen(qkv, cu, 80, h, d, 0.125)
    for small in (1, 0):
        torch.testing.assert_close(torch.ops.bsbert.pruned_attention_varlen(qkv, cu, small, h, d, 0.125), ref)
    bad = torch.tensor([0, 70, 4000], dtype=torch.int32, device=DEV)
    out = torch.ops.bsbert.pruned_attention_varlen(qkv, bad, 4000, h, d, 0.125)
    torch.cuda.synchronize()  # (an out-of-bounds access would surface here as a CUDA error)
    torch.testing.assert_close(out, ref)  # the last sequence clamped to the 150 tokens there are


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 64])
def test_pruned_attention_varlen_matches_float64(dtype, d):
    _require_cuda_kernel("pruned_attention_varlen")
    gen = torch.Generator().manual_seed(d)
    lens = [0, 1, 5, 70, 0, 129, 64]
    h = 3
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    t = int(cu[-1])
    qkv = torch.randn(t, 3 * h * d, generator=gen).to(dtype)
    scale = 0.3
    out = torch.ops.bsbert.pruned_attention_varlen(qkv.to(DEV), cu.to(DEV), max(lens), h, d, scale)
    assert out.shape == (t, h * d)
    for i, n in enumerate(lens):
        if n == 0:
            continue
        a = int(cu[i])
        ref = _ref_attention(qkv[a:a + n][None], None, h, d, scale)[0]
        torch.testing.assert_close(out[a:a + n].cpu().double(), ref, **TOL[dtype])


def test_pruned_attention_batches_past_the_grid_limit():
    # The grid's z axis (sequences) holds 65535 blocks: the op raised for a larger batch; now it launches in
    # slices, each moved to its first sequence. Check sequences on both sides of each slice boundary, with a
    # padding mask (padded form) and with cu_seqlens (varlen), whose offsets stay absolute.
    _require_cuda_kernel("pruned_attention")
    b, s, h, d = 2 * 65535 + 3, 3, 1, 32
    gen = torch.Generator().manual_seed(65535)
    qkv = torch.randn(b, s, 3 * h * d, generator=gen).half()
    lens = torch.randint(1, s + 1, (b,), generator=gen)
    mask = torch.arange(s)[None, :] < lens[:, None]
    out = torch.ops.bsbert.pruned_attention(qkv.to(DEV), mask.to(DEV), h, d, 0.2).cpu()
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    flat = qkv[mask]  # the kept tokens, sequence after sequence
    out_v = torch.ops.bsbert.pruned_attention_varlen(flat.to(DEV), cu.to(DEV), s, h, d, 0.2).cpu()
    for i in (0, 1, 65534, 65535, 65536, 2 * 65535 - 1, 2 * 65535, b - 1):
        ref = _ref_attention(qkv[i:i + 1], mask[i:i + 1], h, d, 0.2)[0]
        n = int(lens[i])
        torch.testing.assert_close(out[i].double(), ref, **TOL[torch.float16])
        torch.testing.assert_close(out_v[int(cu[i]):int(cu[i]) + n].double(), ref[:n], **TOL[torch.float16])


def test_pruned_attention_rejects_float32_and_bad_shapes():
    _require_cuda_kernel("pruned_attention")
    qkv = torch.randn(1, 4, 3 * 2 * 64, device=DEV)
    with pytest.raises(RuntimeError, match="Float|float"):
        torch.ops.bsbert.pruned_attention(qkv, None, 2, 64, 0.125)
    with pytest.raises(RuntimeError, match="head_dim"):
        torch.ops.bsbert.pruned_attention(qkv.half(), None, 3, 48, 0.125)
    with pytest.raises(RuntimeError, match="key_padding_mask"):
        torch.ops.bsbert.pruned_attention(qkv.half(), torch.ones(1, 5, dtype=torch.bool, device=DEV), 2, 64, 0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pruned_attention_opcheck(dtype):
    _require_cuda_kernel("pruned_attention")
    if not _has_fake("pruned_attention"):
        pytest.skip("no fake kernel registered for bsbert::pruned_attention")
    qkv = torch.randn(2, 33, 3 * 2 * 64, dtype=dtype, device=DEV)
    mask = torch.ones(2, 33, dtype=torch.bool, device=DEV)
    mask[1, 20:] = False
    torch.library.opcheck(torch.ops.bsbert.pruned_attention, (qkv, mask, 2, 64, 0.125))


def test_pruned_attention_varlen_opcheck():
    _require_cuda_kernel("pruned_attention_varlen")
    if not _has_fake("pruned_attention_varlen"):
        pytest.skip("no fake kernel registered for bsbert::pruned_attention_varlen")
    cu = torch.tensor([0, 5, 5, 40], dtype=torch.int32, device=DEV)
    qkv = torch.randn(40, 3 * 2 * 32, dtype=torch.float16, device=DEV)
    torch.library.opcheck(torch.ops.bsbert.pruned_attention_varlen, (qkv, cu, 35, 2, 32, 0.2))
