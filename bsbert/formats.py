"""BlockSparseMatrix: the one validated block-sparse (BSR) weight format of bsbert.

Every backend reads the same canonical description:

* ``shape = (N, K)``: the logical weight of ``y = x @ W.T`` (N outputs, K inputs);
* ``block``: square block size (16, 32 or 64);
* ``crow_indices`` (int32, ``[N_blocks + 1]``), ``col_indices`` (int32, ``[nnz_blocks]``):
  CSR over block rows, column indices sorted inside a block row;
* ``values`` (``[nnz_blocks, block, block]``): ``values[i] == W[rb*b:(rb+1)*b, cb*b:(cb+1)*b]``,
  i.e. blocks in the weight's own orientation (row = output feature).

``from_dense(..., pad=True)`` accepts shapes that are not multiples of the block by padding the weight
with zero rows/columns up to ``padded_shape``; kernels then compute only the logical ``N`` outputs and
read only the logical ``K`` inputs. Without ``pad`` a non-divisible shape is a ``ValueError``.
Backends derive their own pre-packed layouts from ``values`` once (see ``bsbert.ops``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BLOCKS = (16, 32, 64)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _ceil_to(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@dataclass(frozen=True)
class BlockStats:
    nnz_blocks: int
    total_blocks: int
    block_density: float  # fraction of blocks stored
    empty_block_rows: int


def _converted(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values in dtype (contiguous), refusing values that a narrower dtype turns into Inf (float16's
    largest is 65504): the kernels would compute with them silently."""
    out = values.to(dtype).contiguous()
    if out.dtype != values.dtype and out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise ValueError(f"weight overflows {dtype}: its largest magnitude {values.abs().max().item():.4g} exceeds "
                         f"{torch.finfo(dtype).max:.4g}")
    return out


def validate_indices(crow_indices: torch.Tensor, col_indices: torch.Tensor, shape, block: int, *,
                     sorted_cols: bool = True, prefix: str = "") -> None:
    """Check the index *values* of a BSR matrix of logical ``shape = (out_features, in_features)`` and
    square ``block``: ``crow_indices`` runs from 0 to ``nnz_blocks = col_indices.numel()`` and never
    decreases, every ``col_indices`` entry is a block column (``0 <= c < ceil(in_features/block)``) and,
    with ``sorted_cols``, the columns inside each block row are strictly increasing. Raises a ValueError
    naming the first offending entry (``prefix`` goes in front of the message, e.g. ``"bsr_linear: "``: the
    words are those of the CPU op, csrc/cpu/bsr_linear.cpp ``prepare``).

    Expects the structure already checked (1-D int32 tensors, ``crow_indices`` with
    ``ceil(out_features/block) + 1`` entries). Reads the values: tensors on another device are copied to
    the CPU (a device -> host copy and a sync), so callers on a hot path run it on CPU tensors only.

    Used by :class:`BlockSparseMatrix` (which also requires sorted columns: its canonical form) and by
    the Triton op on CPU tensors (``sorted_cols=False``: the kernels, like the CPU op, accumulate a block
    row's blocks in any order)."""
    crow, col = crow_indices.cpu(), col_indices.cpu()
    nnz, nbc = col.numel(), -(-int(shape[1]) // block)
    first, last = int(crow[0]), int(crow[-1])
    if first != 0 or last != nnz:
        raise ValueError(f"{prefix}crow_indices must run from 0 to nnz_blocks = {nnz}, got {first}..{last}")
    bad = (crow[1:] < crow[:-1]).nonzero()
    if bad.numel():
        raise ValueError(f"{prefix}crow_indices must be non-decreasing (row {int(bad[0])})")
    bad = ((col < 0) | (col >= nbc)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"{prefix}col_indices[{i}] = {int(col[i])} is outside [0, "
                         f"ceil(in_features/block) = {nbc})")
    if sorted_cols and nnz > 1:
        rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), (crow[1:] - crow[:-1]).long())
        bad = ((rows[1:] == rows[:-1]) & (col[1:] <= col[:-1])).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"{prefix}col_indices of block row {int(rows[i])} must be strictly increasing, got "
                             f"col_indices[{i}] = {int(col[i])} then col_indices[{i + 1}] = {int(col[i + 1])}")


class BlockSparseMatrix:
    """A validated BSR matrix; construct with :meth:`from_dense` or the checked constructor."""

    def __init__(self, shape, block, crow_indices, col_indices, values):
        self.shape = (int(shape[0]), int(shape[1]))
        self.block = int(block)
        self.crow_indices = crow_indices
        self.col_indices = col_indices
        self.values = values
        self._validate()
        counts = self.crow_indices[1:] - self.crow_indices[:-1]
        self.stats = BlockStats(
            nnz_blocks=int(self.col_indices.numel()),
            total_blocks=self.block_rows * self.block_cols,
            block_density=(self.col_indices.numel() / max(1, self.block_rows * self.block_cols)),
            empty_block_rows=int((counts == 0).sum()),
        )

    # ---- properties -------------------------------------------------------------------------
    @property
    def padded_shape(self):
        return (_ceil_to(self.shape[0], self.block), _ceil_to(self.shape[1], self.block))

    @property
    def block_rows(self) -> int:
        return self.padded_shape[0] // self.block

    @property
    def block_cols(self) -> int:
        return self.padded_shape[1] // self.block

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz_blocks(self) -> int:
        return self.stats.nnz_blocks

    def useful_flops(self, m: int) -> int:
        """FLOPs of ``x[m, K] @ W.T`` counting stored blocks only (2 per multiply-add)."""
        return 2 * m * self.nnz_blocks * self.block * self.block

    # ---- validation ---------------------------------------------------------------------------
    def _validate(self):
        b = self.block
        if b not in SUPPORTED_BLOCKS:
            raise ValueError(f"block size {b} is not supported; use one of {SUPPORTED_BLOCKS}")
        if self.shape[0] < 0 or self.shape[1] < 0:
            raise ValueError(f"shape {self.shape} has a negative dimension")
        for name in ("crow_indices", "col_indices", "values"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        ci, co, v = self.crow_indices, self.col_indices, self.values
        if ci.dtype != torch.int32 or co.dtype != torch.int32:
            raise ValueError(
                f"crow_indices/col_indices must be int32, got {ci.dtype} and {co.dtype}")
        if v.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"values dtype {v.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
        if not (ci.device == co.device == v.device):
            raise ValueError(
                f"crow_indices, col_indices and values must share a device, got "
                f"{ci.device}, {co.device}, {v.device}")
        if ci.dim() != 1 or ci.numel() != self.block_rows + 1:
            raise ValueError(
                f"crow_indices must have shape [{self.block_rows + 1}] for shape {self.shape} and "
                f"block {b}, got {tuple(ci.shape)}")
        if co.dim() != 1:
            raise ValueError(f"col_indices must be 1-D, got shape {tuple(co.shape)}")
        if v.dim() != 3 or v.shape[1:] != (b, b) or v.shape[0] != co.numel():
            raise ValueError(
                f"values must have shape [nnz_blocks={co.numel()}, {b}, {b}], got {tuple(v.shape)}")
        if not v.is_contiguous():
            raise ValueError("values must be contiguous")
        if v.device.type == "meta":
            raise ValueError("values are on the meta device: materialise the weights first")
        validate_indices(ci, co, self.shape, b)

    # ---- conversions --------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, block: int = 32, *, pad: bool = False,
                   dtype: torch.dtype | None = None) -> "BlockSparseMatrix":
        """Keep every ``block x block`` tile of ``weight`` that has a non-zero entry."""
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got {tuple(weight.shape)}")
        if weight.device.type == "meta":
            raise ValueError("weight is on the meta device: materialise the weights first")
        # an integer (numpy's too): 32.0 passed the membership test and then failed in torch.zeros (TypeError)
        if not hasattr(block, "__index__") or isinstance(block, bool) or block not in SUPPORTED_BLOCKS:
            raise ValueError(f"block size {block!r} is not supported; use one of {SUPPORTED_BLOCKS}")
        block = int(block)
        dtype = dtype or weight.dtype
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype {dtype} is not supported; use one of {SUPPORTED_DTYPES}")
        n, k = weight.shape
        if not pad and (n % block or k % block):
            raise ValueError(
                f"weight shape {(n, k)} is not divisible by block {block}; pass pad=True to pad "
                f"with zeros")
        if weight.is_floating_point() and not bool(torch.isfinite(weight).all()):
            raise ValueError("weight contains NaN or Inf")
        np_, kp = _ceil_to(n, block), _ceil_to(k, block)
        w = torch.zeros(np_, kp, dtype=weight.dtype, device=weight.device)
        w[:n, :k] = weight.detach()  # a weight that requires grad: no autograd history in the stored values
        tiles = w.reshape(np_ // block, block, kp // block, block).permute(0, 2, 1, 3)
        keep = tiles.ne(0).flatten(2).any(-1)  # [block_rows, block_cols]
        counts = keep.sum(1)
        crow = torch.zeros(np_ // block + 1, dtype=torch.int32, device=weight.device)
        crow[1:] = counts.cumsum(0).to(torch.int32)
        rows, cols = keep.nonzero(as_tuple=True)
        values = _converted(tiles[rows, cols], dtype)
        return cls((n, k), block, crow, cols.to(torch.int32), values)

    def to_dense(self) -> torch.Tensor:
        b = self.block
        np_, kp = self.padded_shape
        out = torch.zeros(self.block_rows, self.block_cols, b, b, dtype=self.dtype, device=self.device)
        counts = (self.crow_indices[1:] - self.crow_indices[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(self.block_rows, device=self.device), counts)
        out[rows, self.col_indices.long()] = self.values
        return out.permute(0, 2, 1, 3).reshape(np_, kp)[: self.shape[0], : self.shape[1]]

    def to(self, device=None, dtype=None) -> "BlockSparseMatrix":
        return BlockSparseMatrix(
            self.shape, self.block, self.crow_indices.to(device), self.col_indices.to(device),
            _converted(self.values.to(device=device), dtype or self.dtype))

    def __repr__(self):
        return (f"BlockSparseMatrix(shape={self.shape}, block={self.block}, "
                f"nnz_blocks={self.nnz_blocks}/{self.stats.total_blocks} "
                f"({self.stats.block_density:.2f}), dtype={self.dtype}, device={self.device})")
