"""Where a model family keeps its encoder layers, attention and FFN modules.

The patch code is written once against this small table; a new family is a new ``EncoderAdapter``
entry, not a copy of the patch code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from bsbert.errors import UnsupportedModelError


@dataclass(frozen=True)
class EncoderAdapter:
    family: str
    encoder_class_names: tuple[str, ...]  # names of transformers' classes of the module that holds the layer list
    # attribute paths inside one encoder layer
    self_attention: str = "attention.self"
    query: str = "attention.self.query"
    key: str = "attention.self.key"
    value: str = "attention.self.value"
    attn_out: str = "attention.output.dense"
    intermediate: str | None = "intermediate"   # module computing act(ffn_in(x)); None: see ffn_block
    ffn_block: str | None = None                # module computing ffn_out(act(ffn_in(x))) (DistilBERT)
    act: str = "intermediate.intermediate_act_fn"
    ffn_in: str = "intermediate.dense"
    ffn_out: str = "output.dense"
    layers_attr: str = "layer"
    # True when the self-attention module also applies the output projection (DistilBERT)
    attention_includes_output: bool = False
    # how one layer is wired (residuals, LayerNorms), for the padding-free forward: "bert" or "distilbert"
    layer_style: str = "bert"


_BERT_LIKE = ("Bert", "Roberta", "XLMRoberta", "Camembert", "Electra", "Data2VecText", "Ernie")

ADAPTERS = (
    EncoderAdapter("bert", tuple(f"{p}Encoder" for p in _BERT_LIKE)),
    EncoderAdapter("distilbert", ("Transformer",), self_attention="attention", query="attention.q_lin",
                   key="attention.k_lin", value="attention.v_lin", attn_out="attention.out_lin",
                   intermediate=None, ffn_block="ffn", act="ffn.activation", ffn_in="ffn.lin1",
                   ffn_out="ffn.lin2", attention_includes_output=True, layer_style="distilbert"),
)


def num_heads(attn: nn.Module, config=None) -> int | None:
    for name in ("num_attention_heads", "n_heads", "num_heads"):
        v = getattr(attn, name, None)
        if isinstance(v, int):
            return v
    for name in ("num_attention_heads", "n_heads"):
        v = getattr(config, name, None)
        if isinstance(v, int):
            return v
    return None


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _is_encoder_class(cls: type, names: tuple[str, ...]) -> bool:
    """``cls`` is (or subclasses) transformers' own class of one of ``names``: a user's module that happens to be
    called ``Transformer`` or ``BertEncoder`` (holding a ``layer`` list of other layers) is no DistilBERT / BERT
    encoder, and patching it as one failed with an AttributeError deep inside."""
    return any(c.__name__ in names and c.__module__.startswith("transformers.") for c in cls.__mro__)


def find_encoder(model: nn.Module) -> tuple[str, nn.Module, EncoderAdapter]:
    """Return (qualified name, encoder module, adapter) or raise UnsupportedModelError."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    found = []
    for name, module in model.named_modules():
        for adapter in ADAPTERS:
            if _is_encoder_class(type(module), adapter.encoder_class_names) and hasattr(module, adapter.layers_attr):
                found.append((name, module, adapter))
                break
    if len(found) > 1:
        # a dual encoder (e.g. query and passage BertModels): patching the first one only left the others dense,
        # silently; patching several is not implemented
        paths = ", ".join(repr(name) for name, _, _ in found)
        raise UnsupportedModelError(
            f"{type(model).__name__} holds {len(found)} encoders ({paths}): bsbert patches models with one encoder; "
            f"patch / analyze each encoder's own model (e.g. the BertModel holding it) instead")
    if found:
        return found[0]
    known = ", ".join(n for a in ADAPTERS for n in a.encoder_class_names)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported: bsbert patches models holding one of [{known}] "
        f"(BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, Data2VecText, ERNIE, DistilBERT encoders and "
        f"their task heads, as transformers defines them), found none; other architectures (e.g. "
        f"relative-position or decoder models) have a different attention and are not supported")


_DECODER_REFUSED = ("decoder / cross-attention BERT configs are not supported: bsbert patches bidirectional "
                    "encoders (config.is_decoder and config.add_cross_attention must be False)")


def check_config(model: nn.Module, encoder: nn.Module | None = None) -> None:
    """Refuse decoders, cross-attention and relative-position attention. Read from the model's config, the
    encoder's own config and the flags its layers were built with: a model without a config of its own (a
    user's wrapper, nn.DataParallel) or whose top-level config differs from its layers' still holds a
    causal BertModel, which the bidirectional patched attention would compute silently wrong."""
    if encoder is None:
        encoder = find_encoder(model)[1]
    configs = [c for c in (getattr(model, "config", None), getattr(encoder, "config", None)) if c is not None]
    for cfg in configs:
        if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
            raise UnsupportedModelError(_DECODER_REFUSED)
        pet = getattr(cfg, "position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            # transformers 5's BERT no longer reads this setting (checked: 5.17 and 5.24 compute absolute
            # attention and drop a checkpoint's distance embeddings), so such a model is not the one that
            # was trained: refused rather than reproduced.
            raise UnsupportedModelError(
                f"position_embedding_type={pet!r} is not supported (relative attention scores; transformers "
                f"5's BERT ignores the setting, so this model is not the one its checkpoint was trained as); "
                f"only 'absolute' models can be patched")
    # transformers' layers keep what they were built as: BertLayer.is_decoder / add_cross_attention /
    # crossattention, BertSelfAttention.is_causal (used when a call has no mask)
    for name, m in encoder.named_modules():
        if (getattr(m, "is_decoder", False) is True or getattr(m, "add_cross_attention", False) is True
                or getattr(m, "is_causal", False) is True or "crossattention" in m._modules):
            raise UnsupportedModelError(f"{_DECODER_REFUSED}; the encoder's module '{name}' "
                                        f"({type(m).__name__}) was built as a decoder / causal / cross-attention layer")
