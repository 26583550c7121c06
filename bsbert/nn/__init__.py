from bsbert.nn.attention import PrunedSelfAttention
from bsbert.nn.linear import FusedFFN, FusedIntermediate, SparseLinear
from bsbert.nn.norm import DenseAddLayerNorm, add_layer_norm

__all__ = ["SparseLinear", "FusedIntermediate", "FusedFFN", "PrunedSelfAttention", "DenseAddLayerNorm",
           "add_layer_norm"]
