from bsbert.nn.attention import PrunedSelfAttention
from bsbert.nn.linear import FusedIntermediate, SparseLinear

__all__ = ["SparseLinear", "FusedIntermediate", "PrunedSelfAttention"]
