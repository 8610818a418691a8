"""Stage 2 of ``visiontune auto``, cheap first: per backbone, features are computed once per image; the linear probe
(C chosen by CV inside each fold's training part) and the nearest class mean (:mod:`visiontune.methods.prototype`)
are scored on every fold. The best backbone is the one whose best cheap candidate scores highest.

Also what the prior conditions on, all known after this stage and before any fine-tuning
(:func:`meta_features`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from visiontune.auto.candidates import backbone_family
from visiontune.auto.folds import cheap_logits
from visiontune.auto.plan import CHEAP, EXPLORA_SUFFIX, PROBE, Task, method_of
from visiontune.auto.record import Record
from visiontune.backbones import build_transform
from visiontune.data.cache import image_dataset
from visiontune.eval.metrics import compute_metrics
from visiontune.methods.baselines import fit_probe_head
from visiontune.runs import build_model
from visiontune.runtime import make_loader, resolve_device
from visiontune.train.loop import extract_features
from visiontune.train.speed import fast_forward

GRAY_TOLERANCE = 8
"""Largest difference between an image's colour bands (0-255) that still counts as gray (JPEG noise)."""
Features = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""backbone -> its features and labels of every pooled image (this process's cheap stage): the folds' LP-FT heads."""


def fold_mean(rec: dict[str, Any]) -> float:
    """A candidate record's mean accuracy over its finished folds (nan before any)."""
    return float(np.mean([f["accuracy"] for f in rec["folds"]])) if rec["folds"] else float("nan")


def scores(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """The scores a fold keeps: accuracy, weighted and macro F1, the confusion matrix."""
    m = compute_metrics(y_true, y_pred, classes)
    return {"accuracy": m["accuracy"], "f1_weighted": m["f1_weighted"], "f1_macro": m["f1_macro"], "confusion": m["confusion"]}


def _probe_train_accuracy(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> float:
    """Training accuracy of the probe fitted on every pooled image (a meta-feature of the prior: with the CV accuracy,
    how far the probe overfits)."""
    head = torch.nn.Linear(x.shape[1], n_classes)
    fit_probe_head(head, (x, y, np.arange(len(y))), None)
    with torch.no_grad():
        return float((head(x).argmax(1) == y).double().mean())


def _logloss(y: np.ndarray, logits: torch.Tensor, n_classes: int) -> float:
    """Held-out log-loss of a head's ``logits`` (scikit-learn's, over every class)."""
    from sklearn.metrics import log_loss

    return float(log_loss(y, torch.softmax(logits.double(), 1).numpy(), labels=list(range(n_classes))))


def probe_model(task: Task, name: str) -> torch.nn.Module:
    """Backbone ``name`` with a probe head, on the run's device, in eval mode."""
    cfg = task.config(name, CHEAP[0].overrides)
    return build_model(cfg, method_of(cfg), len(task.classes)).to(resolve_device(cfg.run.device)).eval()


def pool_features(task: Task, name: str, model: torch.nn.Module, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s (:func:`probe_model`) pooled features and labels of every image of the labeled pool, in pool order:
    what the cheap candidates are fitted on and the folds' LP-FT heads start from."""
    cfg = task.config(name, CHEAP[0].overrides)
    tf = build_transform(model, train=False)
    loader = make_loader(image_dataset(task.pool, tf, cfg.data.cache), cfg.optim.eval_batch_size, False, 0, 0)
    return extract_features(fast_forward(model), loader, resolve_device(cfg.run.device), None, progress, f"features {name}")


def cheap_stage(task: Task, record: Record, features: Features, keys: list[str] | None = None) -> str:
    """Score the cheap candidates of every backbone in ``keys`` (default: the task's) not yet in the record, keeping
    their features in ``features``; the backbone whose best cheap candidate scores highest."""
    state = record.state
    for name in keys or task.backbones:
        if name in state["cheap"]:
            continue
        model = probe_model(task, name)
        t0 = record.clock()
        x, y = pool_features(task, name, model, record.progress)
        feat_s = record.clock() - t0
        features[name] = (x, y)
        head_numel = sum(p.numel() for p in model.get_classifier().parameters())
        total = sum(p.numel() for p in model.parameters())
        results: dict[str, Any] = {}
        for cand in task.cheap:
            rows = []
            for tr, va in task.folds:
                t1 = record.clock()
                logits = cheap_logits(cand.overrides, x[tr], y[tr], x[va], len(task.classes))
                row = scores(y[va].numpy(), logits.argmax(1).numpy(), task.classes)
                if "method.name=linear" in cand.overrides:  # a meta-feature of the prior: the probe's held-out log-loss
                    row["logloss"] = _logloss(y[va].numpy(), logits, len(task.classes))
                row["train_s"] = record.clock() - t1 + feat_s * len(tr) / len(y)
                rows.append(row)
            results[cand.name] = {"folds": rows, "status": "complete", "trainable_pct": 100.0 * head_numel / total}
        state["cheap"][name] = {"candidates": results, "feature_s": feat_s,
                                "probe_train_accuracy": _probe_train_accuracy(x, y, len(task.classes))}
        record.save()
        record.log(f"{name}: probe {fold_mean(results[PROBE]):.3f}, prototype {fold_mean(results[CHEAP[1].name]):.3f} "
                   "(fold means)")
    return max(task.backbones, key=lambda b: max(fold_mean(r) for r in state["cheap"][b]["candidates"].values()))


def meta_features(task: Task, state: dict[str, Any], backbone: str) -> dict[str, Any]:
    """What a :class:`~visiontune.auto.schedule.GainPrior` may condition on, all known before any fine-tuning: the
    task's size, the images' (gray, median shorter side, from a sample) and the cheap candidates' cross-validated
    scores on ``backbone`` (the probe's accuracy, log-loss, training accuracy and their gap, the prototype's gap to
    it); the meta-benchmark's ``meta`` columns (``benchmarks/meta/``). A selection resumed from a record that
    predates a feature leaves it None (the prior imputes it and widens)."""
    cheap = state["cheap"][backbone]["candidates"]
    base = backbone.removesuffix(EXPLORA_SUFFIX)
    cfg = task.config(base, CHEAP[0].overrides)  # with the backbone's own overrides (its input size)
    family = backbone_family(cfg)
    probe = cheap[PROBE]["folds"]

    def probe_mean(key: str) -> float | None:
        values = [f[key] for f in probe if key in f]
        return float(np.mean(values)) if len(values) == len(probe) and values else None

    cv, train_acc = fold_mean(cheap[PROBE]), state["cheap"][backbone].get("probe_train_accuracy")
    return {
        # an ExPLoRA backbone ("... + ExPLoRA") has no meta-benchmark key: the prior falls back to its family
        "backbone": backbone,
        "img_size": cfg.backbone.img_size, "family": family.kind, "depth": family.depth, "pool": len(task.pool),
        "classes": len(task.classes), "shots_per_class": len(task.pool) / len(task.classes),
        "probe_cv_accuracy": cv, "prototype_cv_accuracy": fold_mean(cheap[CHEAP[1].name]),
        "probe_cv_logloss": probe_mean("logloss"), "probe_train_accuracy": train_acc,
        "probe_gap": None if train_acc is None else train_acc - cv,
        "prototype_gap": fold_mean(cheap[CHEAP[1].name]) - cv,
        **image_meta(task),
    }


def image_meta(task: Task, sample: int = 20) -> dict[str, Any]:
    """``gray`` and ``image_px_median`` as the meta-benchmark measures them, on ``sample`` pooled images evenly
    spaced: gray when no pixel's bands differ by more than :data:`GRAY_TOLERANCE` (JPEG noise) in any of them; the
    median of sqrt(width x height). Measured once per task."""
    if task.data_meta is None:
        from visiontune.data.cache import decode_compact
        from visiontune.data.bands import read_bands

        gray, sides = True, []
        for i in range(0, len(task.pool), max(1, len(task.pool) // sample)):
            if task.pool.channels is not None:  # multi-band arrays: never gray; their size from the array
                h, w = read_bands(task.pool.items[i], task.pool.channels, task.pool.ids[i], task.cfg.data.image_limits()).shape[1:]
                gray = False
                sides.append(math.sqrt(h * w))
                continue
            img = decode_compact(task.pool.items[i], task.pool.ids[i], task.cfg.data.image_limits())
            sides.append(math.sqrt(img.size[0] * img.size[1]))
            if gray and img.mode != "L":
                a = np.asarray(img.convert("RGB"), dtype=np.int16)
                gray = bool(np.abs(a[..., 0] - a[..., 1]).max() <= GRAY_TOLERANCE
                            and np.abs(a[..., 1] - a[..., 2]).max() <= GRAY_TOLERANCE)
        task.data_meta = {"gray": gray, "image_px_median": float(np.median(sides))}
    return task.data_meta


__all__ = ["Features", "GRAY_TOLERANCE", "cheap_stage", "fold_mean", "image_meta", "meta_features", "pool_features",
           "probe_model", "scores"]
