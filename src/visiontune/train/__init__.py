"""Training: the loop (``train``), optimiser/schedule, checkpoints.

The names below load :mod:`visiontune.train.loop` (torch, timm) on first use, so importing the package is free.
"""

from visiontune.lazy import lazy_attributes

__all__ = ["RunResult", "evaluate_loader", "extract_features", "predict_logits", "train", "train_one_epoch"]
__getattr__ = lazy_attributes(__name__, dict.fromkeys(__all__, "visiontune.train.loop"))
