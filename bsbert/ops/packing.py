"""Pre-packed weight layouts of bsbert's CPU block-sparse kernel (``torch.ops.bsbert.bsr_linear``).

The canonical :class:`~bsbert.formats.BlockSparseMatrix` stores ``values[i][r][c] = W[rb*b + r, cb*b + c]``
(row = output feature). The CPU micro-kernel instead broadcasts one activation ``x[m, k]`` and
multiply-adds it into a contiguous row of output columns, so it wants each block *transposed*:

* **float32** -- ``packed[i][k][n] = W[rb*b + n, cb*b + k]``, shape ``[nnz_blocks, b, b]``.
  Row ``k`` of a block is ``b`` contiguous floats (one 64-byte line per 16 columns): a 16-column
  chunk of a block is exactly one cache line per k.
* **bfloat16** -- pair-interleaved along k: ``packed[i][p][n][j] = W[rb*b + n, cb*b + 2p + j]``,
  shape ``[nnz_blocks, b/2, b, 2]``. Reading it as int32 gives, per column ``n``, the pair
  ``(W[n, 2p], W[n, 2p+1])``: the kernel widens the even element with a 16-bit shift and the odd one
  with a mask (one load feeds two k steps), and the same layout is what AVX512-BF16 ``vdpbf16ps`` reads.

Blocks keep the order of ``col_indices`` (block rows one after the other); zero padding of a
partial block (``pad=True``) is kept, so the kernel never needs per-element masks on the weights.
The layout does not depend on the ISA: one packed tensor serves the portable, AVX2 and AVX-512 paths.
float16 is not supported by the CPU kernel (``ValueError``).
"""
from __future__ import annotations

import torch

from bsbert.formats import BlockSparseMatrix

CPU_DTYPES = (torch.float32, torch.bfloat16)


def pack_cpu(bsm: BlockSparseMatrix, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pack ``bsm``'s blocks for the CPU kernel in ``dtype`` (default: ``bsm.dtype``); see module doc."""
    if not isinstance(bsm, BlockSparseMatrix):
        raise ValueError(f"pack_cpu expects a BlockSparseMatrix, got {type(bsm).__name__}")
    dtype = dtype or bsm.dtype
    if dtype not in CPU_DTYPES:
        raise ValueError(
            f"the CPU block-sparse kernel supports {CPU_DTYPES}, not {dtype}; convert the model to "
            f"float32 or bfloat16 for CPU inference")
    b = bsm.block
    v = bsm.values.detach().to(device="cpu", dtype=dtype)  # [nnzb, n, k]
    t = v.transpose(1, 2)  # [nnzb, k, n]
    if dtype == torch.float32:
        return t.contiguous()
    # [nnzb, k/2, 2, n] -> [nnzb, k/2, n, 2]
    return t.reshape(-1, b // 2, 2, b).transpose(2, 3).contiguous()


def unpack_cpu(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of :func:`pack_cpu`: back to canonical ``[nnz_blocks, b, b]`` (row = output feature)."""
    b = block
    if packed.dtype == torch.float32:
        return packed.reshape(-1, b, b).transpose(1, 2).contiguous()
    if packed.dtype == torch.bfloat16:
        t = packed.reshape(-1, b // 2, b, 2).transpose(2, 3).reshape(-1, b, b)  # [nnzb, k, n]
        return t.transpose(1, 2).contiguous()
    raise ValueError(f"not a CPU-packed dtype: {packed.dtype}")


def bsr_linear_cpu(x: torch.Tensor, bsm: BlockSparseMatrix, packed: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """Convenience call of ``torch.ops.bsbert.bsr_linear`` on CPU (packs on the fly if ``packed`` is None)."""
    if packed is None:
        packed = pack_cpu(bsm, x.dtype)
    n, k = bsm.shape
    return torch.ops.bsbert.bsr_linear(x, bsm.crow_indices, bsm.col_indices, packed, bias, n, k,
                                       bsm.block, gelu)
