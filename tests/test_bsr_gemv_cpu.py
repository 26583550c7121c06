"""The M <= 3 path of the CPU block-sparse GEMM (csrc/cpu/bsr_linear_kernel.h: gemv_block_row).

Inputs of one to three rows take a GEMV kernel of their own where it is on (BSBERT_BSR_GEMV: unset = on
at the AVX2 and portable levels, "1" = on at every level, "0" = the register tiles). Each path is checked against the
float64 masked-dense reference on fresh random inputs, at every ISA level this machine (or the emulated
AVX-512 build) runs, with the awkward cases: partial last block row and block column, empty block rows,
all-zero and fully dense matrices, K = 0, bf16, GELU, strided and 1-D x, NaN beyond column K.
"""
from __future__ import annotations

import pytest
import torch

from bsbert import _ext
from bsbert.formats import BlockSparseMatrix
from tests.helpers import cpu_isa_levels
from tests.test_bsr_linear_cpu import check, make_bsm, ref64, run_op

pytestmark = pytest.mark.skipif(not _ext.has_op("bsr_linear"),
                                reason=f"bsbert._C / bsr_linear unavailable: {_ext.reason_unavailable()}")

ISAS = cpu_isa_levels(bf16_level=True)
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def isa_env(monkeypatch):
    def set_env(isa: str, gemv: str | None):
        monkeypatch.setenv("BSBERT_CPU_ISA", isa)
        if gemv is None:
            monkeypatch.delenv("BSBERT_BSR_GEMV", raising=False)
        else:
            monkeypatch.setenv("BSBERT_BSR_GEMV", gemv)
    return set_env


GEMV_ROWS = 3  # csrc/cpu/bsr_linear.h: kBsrGemvRows


def one_row(k, dtype, seed, m=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("density", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_gemv_matches_reference(isa_env, isa, dtype, block, density, m):
    isa_env(isa, "1")
    # N and K not multiples of the block: a partial last block row (epilogue tail) and block column
    n, k = 3 * block + 5, 5 * block - 7
    w, bsm = make_bsm(n, k, block, density, seed=block + int(density * 10), dtype=dtype)
    x = one_row(k, dtype, seed=block, m=m)
    b = torch.randn(n).to(dtype)
    for bias, gelu in ((b, False), (None, True), (b, True), (None, False)):
        y = run_op(x, bsm, bias, gelu)
        check(y, ref64(x, w, bias, gelu), dtype, x.shape, n)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3])
def test_gemv_and_tiles_agree(isa_env, isa, dtype, m):
    # the GEMV path may sum in another order (P interleaved k sums vs one): equal within rounding
    w, bsm = make_bsm(300, 700, 32, 0.6, seed=11, dtype=dtype)
    x = one_row(700, dtype, seed=12, m=m)
    b = torch.randn(300).to(dtype)
    isa_env(isa, "yes")  # any value but an off spelling turns it on
    y_gemv = run_op(x, bsm, b, True)
    isa_env(isa, " Off ")  # the off spellings of bsbert's switches
    y_tiles = run_op(x, bsm, b, True)
    # (bounded as check() bounds either against float64: relative to the largest output, since a sum of
    # 700 products can cancel to a small value whose own relative error is large)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    scale = max(1.0, float(y_tiles.float().abs().max()))
    torch.testing.assert_close(y_gemv.float(), y_tiles.float(), rtol=0, atol=2 * tol * scale)
    check(y_gemv, ref64(x, w, b, True), dtype, x.shape, 300)


@pytest.mark.parametrize("isa", ISAS)
def test_gemv_is_the_default_only_where_measured(isa_env, isa):
    # unset: the GEMV path at avx2/portable (measured faster there), the tiles at the AVX-512 levels
    # (not timed on such a CPU yet). At M = 1 the two paths round differently on this input (K = 900
    # of random values: the GEMV keeps several k sums apart), so the bits tell which one ran.
    w, bsm = make_bsm(256, 900, 32, 0.7, seed=21)
    x = one_row(900, torch.float32, seed=22)
    isa_env(isa, "1")
    y_gemv = run_op(x, bsm)
    isa_env(isa, "0")
    y_tiles = run_op(x, bsm)
    assert not torch.equal(y_gemv, y_tiles), "the input no longer tells the paths apart"
    isa_env(isa, None)
    y_default = run_op(x, bsm)
    expected = y_tiles if isa.startswith("avx512") else y_gemv
    assert torch.equal(y_default, expected), f"default M = 1 path at {isa}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_threads_do_not_change_a_bit(isa_env, dtype):
    # every block row is computed by one thread, whole: the same bits for any thread count
    isa_env(ISAS[-1], "1")
    w, bsm = make_bsm(40 * 32 + 3, 300, 32, 0.5, seed=5, dtype=dtype)  # 41 block rows, uneven claims
    x = one_row(300, dtype, seed=6, m=2)
    b = torch.randn(w.shape[0]).to(dtype)
    old = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(run_op(x, bsm, b, True))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    check(outs[0], ref64(x, w, b, True), dtype, x.shape, w.shape[0])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_edges(isa_env, isa, dtype):
    isa_env(isa, "1")
    # all blocks zero: the bias (through GELU) alone
    bsm = BlockSparseMatrix.from_dense(torch.zeros(70, 64, dtype=dtype), 32, pad=True)
    b = torch.randn(70).to(dtype)
    y = run_op(one_row(64, dtype, 1), bsm, b, gelu=True)
    torch.testing.assert_close(y.float(), torch.nn.functional.gelu(b.float()).expand(1, 70),
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    # one empty block row between full ones
    w = torch.randn(96, 64).to(dtype)
    w[32:64] = 0
    bsm = BlockSparseMatrix.from_dense(w, 32)
    x = one_row(64, dtype, 2)
    check(run_op(x, bsm, b[:1].expand(96).contiguous()), ref64(x, w, b[:1].expand(96), False), dtype, x.shape, 96)
    # K = 0: the bias
    _, bsm0 = make_bsm(40, 0, 16, 1.0, dtype=dtype)
    y = run_op(torch.randn(1, 0).to(dtype), bsm0, b[:40])
    assert torch.equal(y, b[:40].expand(1, 40))
    # N = 1, K = 1
    w1, bsm1 = make_bsm(1, 1, 16, 1.0, seed=3, dtype=dtype)
    x1 = one_row(1, dtype, 3)
    check(run_op(x1, bsm1), ref64(x1, w1, None, False), dtype, x1.shape, 1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [39, 40, 64])
def test_gemv_reads_only_k_columns_and_any_layout(isa_env, isa, dtype, k):
    isa_env(isa, "1")
    w, bsm = make_bsm(80, k, 32, 1.0, seed=k, dtype=dtype)
    base = torch.full((5, 128), float("nan"), dtype=dtype)
    base[1:4, :k] = torch.randn(3, k).to(dtype)
    for m in range(1, GEMV_ROWS + 1):
        x = base[1:1 + m, :k]  # NaN right after column K (and rows 128 apart): the packing must stop there
        y = run_op(x, bsm)
        assert torch.isfinite(y).all()
        check(y, ref64(x, w, None, False), dtype, x.shape, 80)
    x = base[1:2, :k]
    for xs in (x.reshape(k), x.reshape(1, 1, k), torch.randn(k, 2).to(dtype)[:, 0].reshape(1, k)):
        check(run_op(xs, bsm), ref64(xs, w, None, False), dtype, xs.shape, 80)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_serves_only_its_rows(isa_env, dtype):
    # M = kBsrGemvRows + 1 and up take the register tiles whatever BSBERT_BSR_GEMV says: equal bits with
    # the switch on and off, and within the bound of the reference
    w, bsm = make_bsm(200, 500, 32, 0.7, seed=31, dtype=dtype)
    for m in (GEMV_ROWS + 1, 7):
        x = one_row(500, dtype, seed=m, m=m)
        isa_env(ISAS[-1], "1")
        y_on = run_op(x, bsm, None, True)
        isa_env(ISAS[-1], "0")
        y_off = run_op(x, bsm, None, True)
        assert torch.equal(y_on, y_off), m
        check(y_on, ref64(x, w, None, True), dtype, x.shape, 200)
