"""Task models around a DEQ, and their registry.

::

    image ──stem──▶ x ──DEQ: z* = f(z*, x)──▶ z* ──head──▶ class scores        (``vision``)
    tokens ──embed──▶ x ──DEQ over a Transformer block──▶ z* ──▶ next-token logits (``language``)
    tokens ──embed──▶ x ──DEQ over a TrellisNet layer──▶ [h*; c*] ──▶ next-token logits
                                                                          (``trellisnet``)

``MODELS`` maps the names the training configs use to the classes; ``build_model(name, **options)``
builds one with its options validated (an unknown option names the valid ones).
"""
from __future__ import annotations

from torch import nn

from .._validate import check_options, lookup
from .language import AdaptiveInput, DEQTransformerLM, TransformerLM
from .trellisnet import DEQTrellisNetLM, TrellisNetLM
from .vision import (ConvDEQClassifier, DEQClassifier, DEQDecoder, ExplicitClassifier,
                     MDEQClassifier)

MODELS = {"deq_classifier": DEQClassifier, "explicit_classifier": ExplicitClassifier,
          "conv_deq_classifier": ConvDEQClassifier, "mdeq_classifier": MDEQClassifier,
          "deq_transformer_lm": DEQTransformerLM, "transformer_lm": TransformerLM,
          "deq_trellisnet_lm": DEQTrellisNetLM, "trellisnet_lm": TrellisNetLM}

__all__ = ["MODELS", "build_model", "count_parameters", "is_language_model", "AdaptiveInput",
           "ConvDEQClassifier", "DEQClassifier", "DEQDecoder", "DEQTransformerLM",
           "DEQTrellisNetLM", "ExplicitClassifier", "MDEQClassifier", "TransformerLM",
           "TrellisNetLM"]


def build_model(name: str, **options) -> nn.Module:
    """``MODELS[name](**options)``, with an unknown option reported by name."""
    cls = lookup(MODELS, name, "model")
    check_options(cls.__init__, options, f"model {name!r}")
    return cls(**options)


def count_parameters(model: nn.Module) -> int:
    """Entries of the trainable parameters (those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def is_language_model(cls: type) -> bool:
    """A language model has ``loss(tokens, targets)`` (the trainer calls it for text)."""
    return callable(getattr(cls, "loss", None))
