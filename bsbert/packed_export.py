"""A pruned BERT's packing-only structure as a plain torch module, for other inference engines.

``packed_bert(model)`` returns a module whose ``forward(input_ids, attention_mask, token_type_ids)``
computes what the (masked dense) model computes -- start / end logits for ``BertForQuestionAnswering``,
the last hidden state for ``BertModel`` -- with standard torch ops only (``F.linear``,
``F.scaled_dot_product_attention``, ``layer_norm``, the model's own GELU and embeddings), on weights
with the dead heads and FFN neurons removed and their constant contributions folded into biases
(``bsbert.patching.pack_layer``, as ``bsbert.patch`` and ``bsbert.save`` pack them). The zero blocks
inside the kept heads stay: this is the structure nn_pruning's packing gives, and what an engine that
runs dense kernels (OpenVINO, ONNX Runtime) can be handed. Why: ``bsbert bench --engines``
(``bsbert.engines``) times such an engine on it against bsbert's patched model, the comparison a user
choosing between them needs.

The module shares the model's embeddings, LayerNorms and QA head (no copies; the model is not changed)
and holds packed copies of the four linears of each layer. Of a model in training mode it takes copies of
those modules instead, in eval mode (sharing them would switch the model's own to eval mode).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsbert.adapters import check_config, find_encoder
from bsbert.analyze import analyze
from bsbert.errors import AlreadyPatchedError, UnsupportedModelError
from bsbert.patching import is_patched, layer_act, pack_layer


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """An nn.Linear holding copies of weight and bias (built 1x1 and given them: no random initialisation
    to overwrite, nor torch's warning about initialising a layer of 0 neurons)."""
    lin = nn.Linear(1, 1)
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    lin.out_features, lin.in_features = weight.shape
    return lin


class PackedBertLayer(nn.Module):
    """One BERT layer over the kept heads and neurons (post-LayerNorm, as BertLayer)."""

    def __init__(self, packed: dict, heads: int, head_dim: int, scale: float, act: nn.Module,
                 ln_attn: nn.LayerNorm, ln_out: nn.LayerNorm):
        super().__init__()
        self.heads, self.head_dim, self.scale = heads, head_dim, scale
        self.qkv = _linear(packed["qkv.weight"], packed["qkv.bias"])
        self.attn_out = _linear(packed["attn_out.weight"], packed["attn_out.bias"])
        self.ffn_in = _linear(packed["ffn_in.weight"], packed["ffn_in.bias"])
        self.ffn_out = _linear(packed["ffn_out.weight"], packed["ffn_out.bias"])
        self.act, self.ln_attn, self.ln_out = act, ln_attn, ln_out

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        B, S, _ = x.shape
        h, d = self.heads, self.head_dim
        if h > 0:
            q, k, v = self.qkv(x).view(B, S, 3, h, d).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=self.scale)
            a = self.attn_out(ctx.transpose(1, 2).reshape(B, S, h * d))
        else:  # no kept head: the attention output is its (folded) bias (and no 0-wide GEMM, which some
            a = self.attn_out.bias.expand(B, S, -1)  # engines refuse: OpenVINO's CPU plugin does)
        a = self.ln_attn(a + x)
        if self.ffn_in.out_features > 0:
            f = self.ffn_out(self.act(self.ffn_in(a)))
        else:  # no kept neuron: the FFN's output is its (folded) bias
            f = self.ffn_out.bias.expand(B, S, -1)
        return self.ln_out(f + a)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, ffn={self.ffn_in.out_features}"


class PackedBert(nn.Module):
    """Embeddings, packed layers and (for QA) the span head; see the module docstring."""

    def __init__(self, embeddings: nn.Module, layers: list[PackedBertLayer], qa_outputs: nn.Module | None):
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)
        self.qa_outputs = qa_outputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None):
        x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        # [B, 1, 1, S], true = attend (nonzero in transformers' mask), as SDPA takes a bool mask
        attend = None if attention_mask is None else attention_mask.ne(0)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, attend)
        if self.qa_outputs is None:
            return x
        start, end = self.qa_outputs(x).split(1, dim=-1)
        return start.squeeze(-1), end.squeeze(-1)


def refuse_patched(model: nn.Module) -> None:
    """AlreadyPatchedError for a model bsbert has patched: its linears are bsbert's modules then."""
    if is_patched(model):
        raise AlreadyPatchedError("packed_bert reads the pruned model's own linears: call bsbert.unpatch(model) "
                                  "first (it restores them)")


@torch.no_grad()
def packed_bert(model: nn.Module) -> PackedBert:
    """The packing-only form of a (pruned) ``BertModel`` or ``BertForQuestionAnswering``, in eval mode;
    ``UnsupportedModelError`` for other models, ``AlreadyPatchedError`` for a model bsbert has patched (its
    linears are bsbert's modules then; the module docstring says what this computes)."""
    refuse_patched(model)
    check_config(model)  # decoders and relative-position attention: their layers are not what is written here
    name, encoder, adapter = find_encoder(model)
    if adapter.layer_style != "bert":
        raise UnsupportedModelError(f"packed_bert: {type(model).__name__} is not a BERT-style model "
                                    f"(its encoder is {adapter.family})")
    base = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    embeddings = getattr(base, "embeddings", None)
    qa = getattr(model, "qa_outputs", None)
    if embeddings is None or (qa is None and model is not base):
        raise UnsupportedModelError(f"packed_bert: takes BertModel or BertForQuestionAnswering (or another model "
                                    f"of that form), got {type(model).__name__}")
    if getattr(base, "embeddings_project", None) is not None:  # ELECTRA with embedding_size != hidden_size
        raise UnsupportedModelError(f"packed_bert: {type(base).__name__} projects its embeddings "
                                    f"(embeddings_project), which this form does not compute")
    if qa is not None and not (isinstance(qa, nn.Linear) and qa.out_features == 2):
        raise UnsupportedModelError(f"packed_bert: the QA head must be a Linear with 2 outputs, got {qa}")
    plan = analyze(model)

    def shared(m):
        # the packed module runs in eval mode (no dropout) and .eval() sets the flag of the modules it holds:
        # shared ones of a model in training mode would leave that model training without embedding dropout
        if not isinstance(m, nn.Module) or not any(x.training for x in m.modules()):
            return m
        return copy.deepcopy(m).eval()

    embeddings, qa = shared(embeddings), shared(qa)
    layers = []
    for lp, layer in zip(plan.layers, getattr(encoder, adapter.layers_attr)):
        packed = pack_layer(layer, adapter, lp, f"{name}.{adapter.layers_attr}.{lp.index}")
        attn = layer.get_submodule(adapter.self_attention)
        scale = float(getattr(attn, "scaling", lp.head_dim ** -0.5))
        layers.append(PackedBertLayer(packed, len(lp.kept_heads), lp.head_dim, scale,
                                      shared(layer_act(layer, adapter)),
                                      shared(layer.get_submodule("attention.output.LayerNorm")),
                                      shared(layer.get_submodule("output.LayerNorm"))))
    return PackedBert(embeddings, layers, qa).eval()
