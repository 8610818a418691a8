"""BitFit: fine-tune only the bias terms of a frozen backbone, and the classifier.

Ben Zaken, Ravfogel and Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models", ACL 2022 (https://arxiv.org/abs/2106.10199). Every weight matrix stays as
pretrained; every bias vector trains (attention and MLP projections, the shifts of LayerNorm and
BatchNorm), about 0.1 % of a ViT's parameters, and the new classifier trains in full.

This module is the whole method: it registers itself when :mod:`visiontune.methods` imports it, and the
shared :class:`~visiontune.methods.base.Method` machinery does the rest (parameter groups, saving only
what trained plus BatchNorm statistics, loading, and merging, which has nothing to fold).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from visiontune.config import MethodConfig
from visiontune.methods.base import Method, classifier_of, freeze, register_method


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit has no options of its own."""

    name: str = "bitfit"


def bias_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``bias`` parameter of every module of ``model`` that has one (found by module, not by name)."""
    out = []
    for module in model.modules():
        bias = module._parameters.get("bias")
        if bias is not None:
            out.append(bias)
    return out


@register_method("bitfit")
class BitFit(Method):
    """Bias terms of a frozen backbone trained, classifier trained in full (BitFit)."""

    config_cls = BitFitConfig
    # Bias vectors are few and start from pretrained values: the LoRA defaults (1e-3 body, 1e-3 head) are the
    # range BitFit is run at on ViTs, and what the other frozen-backbone methods here use.
    default_lr = 1e-3
    default_head_lr = 1e-3
    summary = "bias terms only (BitFit), head trained"

    def apply(self, model: nn.Module) -> nn.Module:
        freeze(model)
        for p in bias_parameters(model):
            p.requires_grad_(True)
        for p in classifier_of(model).parameters():
            p.requires_grad_(True)
        return model
