from bsbert.nn.attention import PrunedSelfAttention
from bsbert.nn.linear import FusedFFN, FusedIntermediate, SparseLinear

__all__ = ["SparseLinear", "FusedIntermediate", "FusedFFN", "PrunedSelfAttention"]
