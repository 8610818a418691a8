"""Stage 1 of ``visiontune auto``, the plan: the labeled pool and its folds, the candidates, the time estimates.

:class:`Task` is what every later stage reads: the run config built from the user's overrides, the labeled pool
(training and validation images; the test split kept apart for the final run), the stratified folds, each fold's
inner split and schedule, the backbones with the overrides that select each, and the fine-tuning candidates that
apply to a backbone. :func:`make_plan` times one forward pass per backbone and says what the selection will do
(``--dry-run`` prints it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from visiontune.auto.candidates import Candidate, Family, backbone_family, balanced, family_candidates, why_not
from visiontune.auto.folds import fold_count, fold_epochs, steps_per_epoch, stratified_folds
from visiontune.auto.schedule import Clock, GainPrior
from visiontune.auto.settings import EXPLORA_BUDGET_SHARE, REDUCTION_FACTOR, AutoSettings
from visiontune.backbones import input_size
from visiontune.config import Config, load_config
from visiontune.data import load_records, make_splits
from visiontune.data.records import ImageRecords
from visiontune.errors import DataError
from visiontune.registry import METHODS
from visiontune.runs import build_model, with_band_statistics

INNER_VAL_FRACTION = 0.2
MIN_INNER_VAL_PER_CLASS = 10
"""A fold's fine-tuning keeps its best epoch on an inner validation split only when that split would hold at least
this many images per class; below it the choice is noise (16 inner images for 10 classes picked best epochs 1, 16,
3 and 11 on four folds of Fashion-MNIST 10/class), so the fold trains its full step count on every training image of
the fold and the fallback to the probe happens between candidates: the probe is scored on the same folds."""
EXPLORA_SUFFIX = " + ExPLoRA"
CHEAP = (
    Candidate("linear probe", ("method.name=linear",), cheap=True),
    Candidate("nearest prototype", ("method.name=prototype",), cheap=True),
)
FINETUNE = family_candidates(Family("transformer", 12))
"""The fine-tuning candidates on a 12-block ViT (ViT-S/B, DINOv2-S); by default each backbone gets its family's
(:func:`visiontune.auto.candidates.family_candidates`)."""
PROBE = CHEAP[0].name
IMBALANCE_RATIO = 1.5
"""Largest / smallest class count in the labeled pool from which class-balanced candidates join the selection."""
BALANCED = (
    Candidate("linear probe, class-balanced", ("method.name=linear", "optim.class_weights=balanced"), cheap=True),
    balanced(FINETUNE[0]),
)
"""Class-balanced candidates for imbalanced pools: the probe, and the backbone's first fine-tune (on a ViT, this
LoRA q,v r8) with a class-balanced loss."""


def offline_default_backbones(cfg: Config, overrides: list[str]) -> dict[str, list[str]] | None:
    """The backbones ``auto`` compares when the user names none and asks for ``backbone.weights=offline``.

    :data:`visiontune.backbones.offline.OFFLINE_AUTO_BACKBONES`, each with its measured input size unless
    ``backbone.img_size`` is given. None when a backbone is named (``--backbone`` or ``backbone.name=``) or the
    weights are anything but plain ``offline`` (``offline:<source>`` names one architecture's file).
    """
    if cfg.backbone.weights != "offline" or any(o.split("=", 1)[0].strip() == "backbone.name" for o in overrides):
        return None
    from visiontune.backbones.offline import OFFLINE_AUTO_BACKBONES

    sized = any(o.split("=", 1)[0].strip() == "backbone.img_size" for o in overrides)
    return {name: ([] if sized or size is None else [f"backbone.img_size={size}"])
            for name, size in OFFLINE_AUTO_BACKBONES}


def method_of(cfg: Config) -> Any:
    """The method object ``cfg.method`` names."""
    return METHODS.get(cfg.method.name)(cfg.method)


def _fingerprint(ids: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _concat(a: Any, b: Any) -> Any:
    return ImageRecords(
        items=[*a.items, *b.items], labels=np.concatenate([a.labels, b.labels]), ids=[*a.ids, *b.ids],
        classes=list(a.classes), source=a.source, channels=a.channels,
    )


class Task:
    """The labeled pool a selection works on, its folds, backbones and candidates; the config of any job on it."""

    def __init__(self, data: str, settings: AutoSettings, backbones: list[str] | None = None,
                 overrides: list[str] | None = None):
        self.steps = settings.steps
        self.user_overrides = list(overrides or [])
        self.base_overrides = [f"data.dataset={data}", "optim.batch_size=16", "run.measure_speed=false",
                               *self.user_overrides]
        cfg = self.cfg = load_config(None, overrides=self.base_overrides)
        defaults = None if backbones else offline_default_backbones(cfg, self.user_overrides)
        self.backbones = list(backbones or (list(defaults) if defaults else [cfg.backbone.name]))
        # backbone key -> the overrides that select it (an ExPLoRA backbone adds its weights file; an offline default
        # its measured input size)
        self.variants: dict[str, list[str]] = {b: [f"backbone.name={b}", *(defaults or {}).get(b, [])]
                                               for b in self.backbones}
        records = load_records(cfg.data.dataset, root=cfg.data.root, limits=cfg.data.image_limits(), channels=cfg.data.channels)
        splits = make_splits(records, cfg.data)
        # The selection sees the training (and validation) images only; the test split goes to the final run.
        self.pool = _concat(splits["train"], splits["val"]) if len(splits["val"]) else splits["train"]
        # Multi-band data: one set of per-band statistics, of the labeled pool, for every fold and the final run.
        resolved = with_band_statistics(cfg, self.pool).data
        if resolved.band_mean != cfg.data.band_mean or resolved.band_std != cfg.data.band_std:
            self.base_overrides = [*self.base_overrides, f"data.band_mean={resolved.band_mean}",
                                   f"data.band_std={resolved.band_std}"]
            self.cfg = cfg = load_config(None, overrides=self.base_overrides)
        self.test = splits["test"]
        self.classes = list(self.pool.classes)
        counts = np.bincount(self.pool.labels, minlength=len(self.classes))
        smallest = int(counts[counts > 0].min())
        if smallest < 2:
            raise DataError(
                f"a class has {smallest} labeled image(s); cross-validation needs at least 2 per class "
                "(add images or raise data.train_per_class)"
            )
        self.k = fold_count(settings.folds, self.pool.labels)
        self.imbalance = float(counts.max() / smallest)
        # Imbalanced classes: class-balanced loss competes as a candidate (probe and one LoRA), judged on the folds
        # like the rest, rather than being switched on by a rule of thumb.
        self.cheap = CHEAP + (BALANCED[:1] if self.imbalance >= IMBALANCE_RATIO else ())
        # Fine-tuning candidates per backbone: the family's own (or the caller's), each checked against it.
        self._given = settings.candidates
        self._fitted: dict[str, tuple[tuple[Candidate, ...], dict[str, str]]] = {}
        self.folds = stratified_folds(self.pool.labels, self.k, cfg.run.seed)
        self.data_meta: dict[str, Any] | None = None  # the pool's image statistics, once measured (stage 2)
        self.signature = {
            "data": data, "backbones": self.backbones, "overrides": self.user_overrides, "folds": self.k,
            "pool": _fingerprint(self.pool.ids),
            "candidates": list(dict.fromkeys(c.name for b in self.backbones for c in self.fit(b)[0])),
            "steps": self.steps, "rungs": "thirds of a fold",  # successive halving's resource (older: whole folds)
        }
        if not settings.prune:
            self.signature["prune"] = False
        if defaults:  # the offline defaults' input sizes are part of what the selection compares
            self.signature["variants"] = {b: self.variants[b] for b in self.backbones}
        if settings.unlabeled:
            self.signature.update(unlabeled=str(settings.unlabeled), unlabeled_steps=settings.unlabeled_steps)

    def overrides(self, backbone: str, overrides: tuple[str, ...], extra: list[str] | None = None) -> list[str]:
        """Every override of a job: the base, the backbone's, the candidate's, then ``extra``."""
        chosen = self.variants.get(backbone, [f"backbone.name={backbone}"])
        return [*self.base_overrides, *chosen, *overrides, *(extra or [])]

    def config(self, backbone: str, overrides: tuple[str, ...], extra: list[str] | None = None) -> Config:
        return load_config(None, overrides=self.overrides(backbone, overrides, extra))

    def steps_per_epoch(self, n_train: int) -> int:
        """Optimizer steps of one epoch over ``n_train`` images at ``optim.batch_size`` (the last batch partial)."""
        return steps_per_epoch(n_train, self.cfg.optim.batch_size)

    def epochs(self, n_train: int) -> int:
        """A fold's epochs: enough for ``steps`` (default :data:`~visiontune.auto.folds.FINETUNE_STEPS`) of
        ``optim.batch_size`` (16 unless the user set it; at most :data:`~visiontune.auto.folds.MAX_EPOCHS`), and
        never fewer than ``optim.epochs``."""
        return fold_epochs(n_train, self.cfg.optim.batch_size, self.cfg.optim.epochs, self.steps)

    def fold_splits(self, j: int) -> dict[str, Any]:
        """Fold ``j``'s training part, its inner validation split (empty below :data:`MIN_INNER_VAL_PER_CLASS` per
        class) and its held-out part (``test``)."""
        from sklearn.model_selection import StratifiedShuffleSplit

        tr, va = self.folds[j]
        labels = self.pool.labels[tr]
        counts = np.bincount(labels)
        n_classes = int((counts > 0).sum())
        n_val = max(int(round(INNER_VAL_FRACTION * len(tr))), n_classes)
        if counts[counts > 0].min() < 2 or n_val >= len(tr) or n_val < MIN_INNER_VAL_PER_CLASS * n_classes:
            inner_tr, inner_va = np.arange(len(tr)), np.array([], dtype=int)
        else:
            sss = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=self.cfg.run.seed + j)
            inner_tr, inner_va = next(sss.split(np.zeros(len(tr)), labels))
        return {
            "train": self.pool.subset(np.sort(tr[inner_tr])), "val": self.pool.subset(np.sort(tr[inner_va])),
            "test": self.pool.subset(va),
        }

    def fit(self, backbone: str) -> tuple[tuple[Candidate, ...], dict[str, str]]:
        """The fine-tuning candidates that apply to ``backbone``, and those that do not with the reason why.

        The caller's candidates, or the backbone family's (:mod:`visiontune.auto.candidates`), plus a class-balanced
        copy of the first on an imbalanced pool; each checked on the meta device as a run would build it. An ExPLoRA
        backbone has its base's architecture, so its base's answer holds.
        """
        base = backbone.removesuffix(EXPLORA_SUFFIX)
        if base not in self._fitted:
            cands = self._given
            if cands is None:
                cands = family_candidates(backbone_family(self.config(base, CHEAP[0].overrides)))
            if self.imbalance >= IMBALANCE_RATIO and cands:
                cands = (*cands, balanced(cands[0]))
            skipped = {c.name: why for c in cands if (why := why_not(lambda o: self.config(base, o), c))}
            self._fitted[base] = (tuple(c for c in cands if c.name not in skipped), skipped)
        return self._fitted[base]


@dataclass
class Plan:
    """What ``auto`` will do: data sizes, folds, candidates, estimated seconds per stage."""

    pool: int
    test: int
    classes: list[str]
    folds: int
    backbones: list[str]
    candidates: list[str]
    cheap: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    imbalance: float = 1.0
    estimates_s: dict[str, float] = field(default_factory=dict)
    unlabeled: str | None = None
    prune: bool = True
    decision: str = ""

    def describe(self) -> str:
        lines = [
            f"labeled pool: {self.pool} images, {len(self.classes)} classes (largest/smallest class {self.imbalance:.1f}x"
            f"{'; class-balanced candidates included' if self.imbalance >= IMBALANCE_RATIO else ''}); "
            f"test split: {self.test} images (held out, read once at the end)",
            f"folds: stratified {self.folds}-fold, the same folds for every candidate",
            f"backbones: {', '.join(self.backbones)}",
            f"cheap candidates: {', '.join(self.cheap)}",
            f"fine-tuning candidates ({f'pruned by successive halving, factor {REDUCTION_FACTOR}' if self.prune else 'no pruning: every candidate on every fold'}): "
            f"{', '.join(self.candidates)}",
            *[f"skipped, cannot apply to {self.backbones[0]}: {name} ({why})" for name, why in self.skipped.items()],
            *([f"ExPLoRA: pretraining the best backbone on {self.unlabeled} (at most {100 * EXPLORA_BUDGET_SHARE:.0f} % of "
               "the budget left; its probe must beat the original's beyond the paired interval)"] if self.unlabeled else []),
            *([self.decision] if self.decision else []),
            "estimated time (this machine, measured forward pass): "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in self.estimates_s.items()),
        ]
        return "\n".join(lines)


def _decision_text(prior: GainPrior, cost_margin: float) -> str:
    """The plan's line on the decision: the prior and the cost margin."""
    about = prior.describe({})
    name = "flat (the folds alone)" if about["name"] == "flat" else (
        f"{about['name']}, learned on {len(about.get('provenance', {}).get('datasets') or [])} datasets ({about.get('file')})")
    return (f"decision: highest posterior expected accuracy; prior on each fine-tune's gain: {name}; cost margin "
            f"{cost_margin:g} points for a fine-tune")


def make_plan(task: Task, settings: AutoSettings, prior: GainPrior, clock: Clock) -> tuple[Plan, float]:
    """The plan with time estimates from one measured forward pass per backbone (nothing is trained), and a cost-1
    candidate's estimated optimizer step in seconds (what :class:`~visiontune.auto.schedule.StepTimes` starts from)."""
    est: dict[str, float] = {}
    n = len(task.pool)
    inner_val = len(task.fold_splits(0)["val"])
    fold_train = n * (task.k - 1) / task.k - inner_val
    for name in task.backbones:
        cfg = task.config(name, CHEAP[0].overrides)
        model = build_model(cfg, method_of(cfg), len(task.classes)).eval()
        size = input_size(model)
        x = torch.randn(8, cfg.data.input_bands(), size, size)
        with torch.no_grad():
            model(x)
            times = []
            for _ in range(3):  # the fastest of three: the least disturbed by whatever else the machine runs
                t = clock()
                model(x)
                times.append(clock() - t)
            per_img = min(times) / 8
        est[f"features ({name})"] = per_img * n
    epochs = task.epochs(int(fold_train))
    batch = task.cfg.optim.batch_size
    # forward + backward ~ 3 forwards, over every batch of every epoch
    steps_time = per_img * 3 * batch * task.steps_per_epoch(int(fold_train)) * epochs
    # + the probe head's feature pass, the fold's held-out images, the inner validation once per epoch
    est["fine-tuning, one fold"] = steps_time + per_img * (fold_train + n / task.k + inner_val * epochs)
    candidates, skipped = task.fit(task.backbones[0])
    est["fine-tuning, every candidate on every fold (no pruning)"] = est["fine-tuning, one fold"] * task.k * len(candidates)
    est["final retrain"] = steps_time
    plan = Plan(
        len(task.pool), len(task.test), task.classes, task.k, task.backbones, [c.name for c in candidates],
        [c.name for c in task.cheap], skipped, task.imbalance, est, settings.unlabeled, settings.prune,
        _decision_text(prior, settings.cost_margin),
    )
    return plan, per_img * 3 * batch


__all__ = ["BALANCED", "CHEAP", "EXPLORA_SUFFIX", "FINETUNE", "IMBALANCE_RATIO", "INNER_VAL_FRACTION",
           "MIN_INNER_VAL_PER_CLASS", "PROBE", "Plan", "Task", "make_plan", "method_of", "offline_default_backbones"]
