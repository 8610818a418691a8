"""What a selection sees of a labeled pool, as plain functions: its folds, the cheap candidates' scores on cached
features, and the fine-tuning schedule of a fold.

:class:`visiontune.auto.AutoSelect` and the meta-benchmark (``benchmarks/meta``, which the selection's prior is
learned from) both call these, so the benchmark's meta-features and fold scores are the ones ``auto`` computes.
The folds are scikit-learn's; the probe is :func:`~visiontune.methods.baselines.fit_probe_head`, the prototype
:func:`~visiontune.methods.prototype.prototype_head`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from visiontune.methods.baselines import fit_probe_head
from visiontune.methods.prototype import prototype_head

FINETUNE_STEPS = 120
"""Optimizer steps per fine-tuning run (batch 16) on small data: about 90-120 steps is where a hand-written
timm + peft loop stopped underfitting on 10-20 labels per class, while 10 epochs at batch 32 (~20 steps) underfit.
It only lengthens a fold's schedule: a fold never trains fewer epochs than ``optim.epochs`` (the ``train``
default, 10), so that more data never means less training than ``visiontune train`` gives the same method (with
120 steps alone, 400 training images got 5 epochs, and the chosen LoRA scored 1.8 points under the same LoRA
trained with the defaults on Fashion-MNIST 50/class; underfitting, not overfitting, is the risk the DINOv3 study
found)."""
MIN_EPOCHS, MAX_EPOCHS = 2, 60
"""``MIN_EPOCHS``: the first rung needs an epoch before the last; ``MAX_EPOCHS`` caps the step count's epochs on
tiny data (never ``optim.epochs``, which the user set)."""
PROTOTYPE_TEMPERATURE = 10.0
"""Scale of the prototype's cosine logits (only its probabilities, e.g. a log-loss, depend on it)."""


def fold_count(folds: int, labels: np.ndarray) -> int:
    """``k`` of the stratified k-fold: ``folds``, at most the smallest class's size, at least 2."""
    counts = np.bincount(np.asarray(labels))
    return max(2, min(int(folds), int(counts[counts > 0].min())))


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training indices, held-out indices) of each fold: shuffled stratified k-fold seeded by ``seed``."""
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, va) for tr, va in skf.split(np.zeros(len(labels)), labels)]


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps of one epoch over ``n_train`` images (the last batch partial)."""
    return max(1, math.ceil(n_train / batch_size))


def fold_epochs(n_train: int, batch_size: int, min_epochs: int, steps: int = FINETUNE_STEPS) -> int:
    """A fine-tune's epochs on ``n_train`` images: enough for ``steps`` optimizer steps (at most
    :data:`MAX_EPOCHS`), never fewer than ``min_epochs`` (``optim.epochs``) nor :data:`MIN_EPOCHS`."""
    per_epoch = steps_per_epoch(n_train, batch_size)
    return int(max(MIN_EPOCHS, min_epochs, min(MAX_EPOCHS, math.ceil(steps / per_epoch))))


def cheap_logits(overrides: Sequence[str], x: torch.Tensor, y: torch.Tensor, x_eval: torch.Tensor,
                 num_classes: int) -> torch.Tensor:
    """Logits on ``x_eval`` of the cheap candidate ``overrides`` names, fitted on features ``x`` / labels ``y``.

    ``method.name=linear``: the linear probe as the ``linear`` method fits it (C by grouped CV inside ``x``;
    ``optim.class_weights=balanced`` for the class-balanced one); otherwise the nearest class prototype.
    """
    if "method.name=linear" in overrides:
        head = torch.nn.Linear(x.shape[1], num_classes)
        fit_probe_head(head, (x, y, np.arange(len(y))), None, balanced="optim.class_weights=balanced" in overrides)
        with torch.no_grad():
            return head(x_eval).double()
    w, b = prototype_head(x, y, num_classes, PROTOTYPE_TEMPERATURE)
    return x_eval.double() @ w.T + b


__all__ = ["FINETUNE_STEPS", "MAX_EPOCHS", "MIN_EPOCHS", "cheap_logits", "fold_count", "fold_epochs", "steps_per_epoch",
           "stratified_folds"]
