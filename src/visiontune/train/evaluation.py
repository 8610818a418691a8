"""Forward passes without training: logits, metrics and pooled features of a loader, in one process or many.

Under a launcher each process runs its range of the images (:func:`visiontune.distributed.shard_eval`) and every
process ends with all of them, once, in dataset order (:func:`visiontune.distributed.gather_in_order`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import visiontune.distributed as distributed
from visiontune.config import Config
from visiontune.data.cache import image_dataset
from visiontune.eval import compute_metrics
from visiontune.runtime import autocast, batches, make_loader


def predict_logits(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: torch.dtype | None = None, progress: bool = False,
    desc: str = "eval",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every batch in ``loader`` (model in eval mode, no augmentation)."""
    was_training = model.training
    model.eval()
    outs, labels = [], []
    with distributed.without_grad(model):
        for x, y in batches(loader, desc, progress):
            with autocast(device, amp):
                outs.append(model(x.to(device, non_blocking=True)).float().cpu())
            labels.append(y)
    model.train(was_training)
    # Under a launcher each process scored its range of the images (distributed.shard_eval): all of them, once.
    return distributed.gather_in_order(loader, outs, labels)


def evaluate_loader(
    model: nn.Module, loader: DataLoader, device: torch.device, classes: list[str], amp: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics dict (accuracy, F1s, per-class, confusion) of ``model`` on ``loader``."""

    logits, labels = predict_logits(model, loader, device, amp, progress)
    return compute_metrics(labels.numpy(), logits.argmax(1).numpy(), classes)


@torch.inference_mode()
def extract_features(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: torch.dtype | None = None, progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logits features (timm ``forward_head(pre_logits=True)``) and labels for ``loader``."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for x, y in batches(loader, desc, progress):
        with autocast(device, amp):
            f = model.forward_head(model.forward_features(x.to(device, non_blocking=True)), pre_logits=True)
        feats.append(f.float().cpu())
        labels.append(y)
    model.train(was_training)
    return distributed.gather_in_order(loader, feats, labels)


def eval_loader(records: Any, tf: Any, cfg: Config, cache: bool | None = None) -> DataLoader:
    """``records`` in order, for a forward pass only (features, validation, scoring): ``optim.eval_batch_size``
    batches through ``tf``, the decoded-image cache as ``data.cache`` says unless ``cache`` is given."""
    ds = image_dataset(records, tf, cfg.data.cache if cache is None else cache, limits=cfg.data.image_limits())
    return make_loader(ds, cfg.optim.eval_batch_size, False, 0, cfg.data.num_workers)


def view_features(
    fast: nn.Module, records: Any, cfg: Config, device: torch.device, amp: torch.dtype | None,
    eval_tf: Any, train_tf: Any, views: int, what: str = "features",
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Features of ``records`` for a head fitted on cached features: (features, labels, source image per row).

    View 0 is the clean eval view; views 1.. are augmented (``train_tf``: random crop/flip), each computed once,
    so a head fitted on them has seen what training with augmentation feeds it.
    """
    xs, ys = [], []
    for v in range(views):
        loader = eval_loader(records, eval_tf if v == 0 else train_tf, cfg)
        loader = distributed.shard_eval(loader)  # under a launcher each process extracts its share of the features
        f, y = extract_features(fast, loader, device, amp, cfg.run.progress, f"{what} view {v + 1}/{views}")
        xs.append(f)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys), np.tile(np.arange(len(records)), views)
