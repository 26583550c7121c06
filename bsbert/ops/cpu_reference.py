"""Pure-torch reference for ``bsbert::bsr_linear``: masked dense computation.

``bsr_linear_reference(x, bsm, bias, gelu)`` expands the block-sparse weight to its dense form (zeros
outside the stored blocks, padding cut off) and runs ``F.linear`` + BERT's exact erf GELU in the dtype
of ``x``. Tests call it on float64 inputs to get exact references (``dense=``: a cached ``bsm.to_dense()``
to avoid rebuilding it). Without the compiled extension bsbert does not call it: the ``torch-dense``
backend (``bsbert.ops.linear_backends``) runs ``F.linear`` on the packed weight instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bsbert.formats import BlockSparseMatrix


def bsr_linear_reference(x: torch.Tensor, bsm: BlockSparseMatrix, bias: torch.Tensor | None = None,
                         gelu: bool = False, *, dense: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) (then GELU) with W = ``bsm`` as a masked dense matrix, in x's dtype."""
    n, k = bsm.shape
    if x.shape[-1] != k:
        raise ValueError(f"x.shape[-1] = {x.shape[-1]} does not match the weight's in_features = {k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    w = bsm.to_dense() if dense is None else dense
    w = w.to(device=x.device, dtype=x.dtype)
    y = F.linear(x, w, None if bias is None else bias.to(device=x.device, dtype=x.dtype))
    if gelu:
        y = F.gelu(y)  # approximate="none": 0.5 * y * (1 + erf(y / sqrt(2)))
    return y.contiguous()
