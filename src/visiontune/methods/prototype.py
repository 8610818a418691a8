"""Nearest class mean on frozen features (SimpleShot's centred, L2-normalised prototypes), as a linear head.

Wang et al. 2019, "SimpleShot: Revisiting Nearest-Neighbor Classification for Few-Shot Learning"
(https://arxiv.org/abs/1911.04623): subtract the mean training feature, L2-normalise, classify by the nearest
class mean under cosine similarity. It has no hyper-parameter to tune, so with very few labels per class it
can match or beat a logistic-regression probe whose regularisation has to be chosen from the same few images.

It is exactly a linear head: ``argmax_c cos(x - mu, p_c - mu)`` equals ``argmax_c w_c . x + b_c`` with
``w_c = (p_c - mu) / ||p_c - mu||`` and ``b_c = -w_c . mu`` (the common factor ``1 / ||x - mu||`` does not change
the argmax). So a ``prototype`` run is saved, merged, exported and served like a ``linear`` run. The scores are
those cosine-like logits times a temperature (``method.temperature``, default 10: softmax over cosines in
[-1, 1] needs a scale to express confidence; 10 is the usual cosine-classifier value), computed on the raw
pooled features the head receives. Written by hand: a class mean is a few lines, no library method fits timm's
head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from visiontune.config import MethodConfig, OptimConfig
from visiontune.methods.base import Method, classifier_of, freeze, register_method


@dataclass
class PrototypeConfig(MethodConfig):
    """Options of the nearest-prototype classifier."""

    name: str = "prototype"
    temperature: float = field(default=10.0, metadata={"help": "scale of the cosine logits (confidence only; argmax unchanged)"})

    def problems(self) -> list[str]:
        return [] if self.temperature > 0 else [f"method.temperature={self.temperature} must be > 0"]


def prototype_head(x: torch.Tensor, y: torch.Tensor, num_classes: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [C, D], bias [C]) of the centred-cosine nearest-class-mean classifier on features ``x``.

    A class without training images gets a zero row and a bias below every other class, so it is never
    predicted (there is nothing to compare with).
    """
    x = x.double()
    mu = x.mean(0)
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    present = torch.zeros(num_classes, dtype=torch.bool)
    for c in range(num_classes):
        rows = x[y == c]
        if len(rows):
            p = rows.mean(0) - mu
            w[c] = p / p.norm().clamp_min(1e-12)
            present[c] = True
    # Scale by the typical centred feature norm so the logits are cosines times the temperature on average.
    scale = temperature / (x - mu).norm(dim=1).mean().clamp_min(1e-12)
    w = w * scale
    b = -(w @ mu)
    b[~present] = -1e9
    return w, b


@register_method("prototype")
class Prototype(Method):
    """Frozen backbone; nearest class mean (centred cosine) on cached features, written as a linear head."""

    config_cls = PrototypeConfig
    feature_cache = True
    summary = "frozen backbone, nearest class mean (SimpleShot) on cached features"
    cfg: PrototypeConfig

    def apply(self, model: nn.Module) -> nn.Module:
        freeze(model)
        for p in classifier_of(model).parameters():
            p.requires_grad_(True)  # saved with the run, like the linear probe's head
        return model

    def fit_cached(self, model: nn.Module, train: tuple[torch.Tensor, torch.Tensor, np.ndarray],
                   val: tuple[torch.Tensor, torch.Tensor] | None, optim: OptimConfig, seed: int) -> dict[str, Any]:
        """Class means of ``train``'s features written into ``model``'s classifier (``optim`` and ``seed`` unused)."""
        head = classifier_of(model)
        if not isinstance(head, nn.Linear):
            raise TypeError(f"a prototype head needs an nn.Linear classifier, got {type(head).__name__}")
        x, y, _ = train
        w, b = prototype_head(x, y, head.out_features, self.cfg.temperature)
        with torch.no_grad():
            head.weight.copy_(w.to(head.weight.dtype))
            head.bias.copy_(b.to(head.bias.dtype))
        row: dict[str, Any] = {"epoch": 1, "train_loss": None, "lr": None}
        if val is not None and len(val[1]):
            row["val_accuracy"] = float(((val[0].double() @ w.T + b).argmax(1) == val[1]).float().mean())
        return {"solver": "class means", "history": [row]}

    def describe(self) -> str:
        return "nearest prototype"
