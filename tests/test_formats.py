"""BlockSparseMatrix (bsbert/formats.py): round trips, padding, statistics and validation errors."""
from __future__ import annotations

import pytest
import torch

from bsbert.formats import BlockSparseMatrix

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None


def blocky(n, k, block, density, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(-(-n // block), -(-k // block), generator=g) < density
    mask = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return (torch.randn(n, k, generator=g) * mask).to(dtype)


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip(block, dtype):
    w = blocky(4 * block, 3 * block, block, 0.5, seed=block, dtype=dtype)
    bsm = BlockSparseMatrix.from_dense(w, block)
    assert bsm.shape == tuple(w.shape) and bsm.dtype == dtype and bsm.block == block
    assert torch.equal(bsm.to_dense(), w)
    assert bsm.crow_indices.dtype == torch.int32 and bsm.col_indices.dtype == torch.int32
    assert bsm.values.shape == (bsm.nnz_blocks, block, block)


def test_values_orientation():
    w = torch.zeros(64, 96)
    w[33, 70] = 5.0  # block row 1, block column 2, (r, c) = (1, 6)
    bsm = BlockSparseMatrix.from_dense(w, 32)
    assert bsm.nnz_blocks == 1
    assert bsm.crow_indices.tolist() == [0, 0, 1]
    assert bsm.col_indices.tolist() == [2]
    assert bsm.values[0, 1, 6] == 5.0


def test_padding():
    w = blocky(70, 100, 32, 1.0, seed=1)
    with pytest.raises(ValueError, match="pad=True"):
        BlockSparseMatrix.from_dense(w, 32)
    bsm = BlockSparseMatrix.from_dense(w, 32, pad=True)
    assert bsm.padded_shape == (96, 128)
    assert bsm.block_rows == 3 and bsm.block_cols == 4
    assert torch.equal(bsm.to_dense(), w)
    # the padded part of stored blocks is zero: rows 70-95 of the last block row, columns 100-127 of
    # the last block column
    assert torch.equal(bsm.values[-1][6:, :], torch.zeros(26, 32))
    last_col = bsm.values[bsm.col_indices == 3]
    assert last_col.shape[0] == 3 and torch.equal(last_col[:, :, 4:], torch.zeros(3, 32, 28))


def test_stats_and_flops():
    w = torch.zeros(64, 64)
    w[:32, :32] = 1
    w[40, 40] = 1
    bsm = BlockSparseMatrix.from_dense(w, 32)
    assert bsm.stats.nnz_blocks == 2 and bsm.stats.total_blocks == 4
    assert bsm.stats.block_density == 0.5
    assert bsm.stats.empty_block_rows == 0
    assert bsm.useful_flops(10) == 2 * 10 * 2 * 32 * 32
    z = BlockSparseMatrix.from_dense(torch.zeros(64, 32), 32)
    assert z.nnz_blocks == 0 and z.stats.empty_block_rows == 2
    assert torch.equal(z.to_dense(), torch.zeros(64, 32))
    assert "nnz_blocks=0/2" in repr(z)


def test_to_dtype():
    w = blocky(64, 64, 16, 0.5)
    bsm = BlockSparseMatrix.from_dense(w, 16)
    b16 = bsm.to(dtype=torch.bfloat16)
    assert b16.dtype == torch.bfloat16 and b16.nnz_blocks == bsm.nnz_blocks
    assert torch.equal(b16.to_dense(), w.bfloat16())
    assert BlockSparseMatrix.from_dense(w, 16, dtype=torch.bfloat16).dtype == torch.bfloat16


def _parts(bsm):
    return dict(shape=bsm.shape, block=bsm.block, crow_indices=bsm.crow_indices.clone(),
                col_indices=bsm.col_indices.clone(), values=bsm.values.clone())


def test_constructor_accepts_valid():
    bsm = BlockSparseMatrix.from_dense(blocky(64, 96, 32, 0.6, seed=2), 32)
    again = BlockSparseMatrix(**_parts(bsm))
    assert torch.equal(again.to_dense(), bsm.to_dense())


@pytest.mark.parametrize("mutate,match", [
    (lambda p: p.update(block=8), "block size"),
    (lambda p: p.update(shape=(-1, 96)), "negative"),
    (lambda p: p.update(crow_indices=p["crow_indices"].long()), "int32"),
    (lambda p: p.update(col_indices=p["col_indices"].long()), "int32"),
    (lambda p: p.update(values=p["values"].double()), "dtype"),
    (lambda p: p.update(crow_indices=p["crow_indices"][:-1]), "crow_indices must have shape"),
    (lambda p: p.update(values=p["values"][:, :, :16]), "values must have shape"),
    (lambda p: p.update(values=p["values"].transpose(1, 2)), "contiguous"),
    (lambda p: p.update(col_indices=p["col_indices"].reshape(1, -1)), "1-D"),
    (lambda p: p.update(values=[1, 2]), "torch.Tensor"),
    (lambda p: p.update(values=p["values"].to("meta")), "device|meta"),
])
def test_constructor_errors(mutate, match):
    w = torch.ones(64, 96)
    p = _parts(BlockSparseMatrix.from_dense(w, 32))
    mutate(p)
    with pytest.raises(ValueError, match=match):
        BlockSparseMatrix(**p)


def test_index_errors():
    p = _parts(BlockSparseMatrix.from_dense(torch.ones(64, 96), 32))  # 2 rows x 3 cols, all stored
    q = dict(p, crow_indices=torch.tensor([1, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"crow_indices must run from 0 to nnz_blocks = 6, got 1\.\.6"):
        BlockSparseMatrix(**q)
    q = dict(p, crow_indices=torch.tensor([0, 4, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"block row 0 must be strictly increasing, got col_indices\[2\] = 2 "
                                          r"then col_indices\[3\] = 0"):  # row 0 would hold cols 0,1,2,0
        BlockSparseMatrix(**q)
    q = dict(p, crow_indices=torch.tensor([0, 7, 6], dtype=torch.int32))  # starts at 0, ends at nnz
    with pytest.raises(ValueError, match=r"crow_indices must be non-decreasing \(row 1\)"):
        BlockSparseMatrix(**q)
    cols = p["col_indices"].clone()
    cols[0] = 3
    with pytest.raises(ValueError, match=r"col_indices\[0\] = 3 is outside \[0, ceil\(in_features/block\) = 3\)"):
        BlockSparseMatrix(**dict(p, col_indices=cols))
    cols = p["col_indices"].clone()
    cols[0], cols[1] = cols[1].item(), cols[0].item()
    with pytest.raises(ValueError, match="block row 0 must be strictly increasing"):
        BlockSparseMatrix(**dict(p, col_indices=cols))


def test_from_dense_errors():
    with pytest.raises(ValueError, match="2-D"):
        BlockSparseMatrix.from_dense(torch.ones(4, 4, 4), 16)
    with pytest.raises(ValueError, match="block size"):
        BlockSparseMatrix.from_dense(torch.ones(32, 32), 24)
    for block in (32.0, True):  # 32.0 passed the check, then failed in torch.zeros with a TypeError
        with pytest.raises(ValueError, match=f"block size {block!r} is not supported"):
            BlockSparseMatrix.from_dense(torch.ones(32, 32), block)
    import numpy as np

    assert BlockSparseMatrix.from_dense(torch.ones(32, 32), np.int64(32)).block == 32
    with pytest.raises(ValueError, match="torch.Tensor"):
        BlockSparseMatrix.from_dense([[1.0]], 16)
    w = torch.ones(32, 32)
    w[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        BlockSparseMatrix.from_dense(w, 16)
    with pytest.raises(ValueError, match="dtype"):
        BlockSparseMatrix.from_dense(torch.ones(32, 32), 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="meta"):
        BlockSparseMatrix.from_dense(torch.ones(32, 32, device="meta"), 16)
    big = torch.full((32, 32), 1e5)  # finite in fp32, Inf in float16
    with pytest.raises(ValueError, match="overflows torch.float16"):
        BlockSparseMatrix.from_dense(big, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="overflows torch.float16"):
        BlockSparseMatrix.from_dense(big, 32).to(dtype=torch.float16)
    assert BlockSparseMatrix.from_dense(big, 32, dtype=torch.bfloat16).values.isfinite().all()


if given is not None:

    @settings(max_examples=40, deadline=None)
    @given(n=st.integers(1, 130), k=st.integers(1, 130), block=st.sampled_from([16, 32, 64]),
           density=st.floats(0, 1), seed=st.integers(0, 1000))
    def test_round_trip_property(n, k, block, density, seed):
        w = blocky(n, k, block, density, seed=seed)
        bsm = BlockSparseMatrix.from_dense(w, block, pad=True)
        assert torch.equal(bsm.to_dense(), w)
        assert int(bsm.crow_indices[-1]) == bsm.nnz_blocks
        nz_tiles = int(torch.nn.functional.pad(w, (0, -k % block, 0, -n % block))
                       .reshape(-(-n // block), block, -(-k // block), block).ne(0).any(3).any(1).sum())
        assert bsm.nnz_blocks == nz_tiles


def test_from_dense_of_a_weight_that_requires_grad_keeps_no_autograd_history():
    w = torch.randn(64, 32, requires_grad=True)
    bsm = BlockSparseMatrix.from_dense(w, 32)
    assert bsm.values.grad_fn is None and not bsm.values.requires_grad
    torch.testing.assert_close(bsm.to_dense(), w.detach())
