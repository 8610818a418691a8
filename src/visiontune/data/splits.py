"""Stratified, seeded train / val / test splits for the limited-data regime, and the leak check.

Rules (``make_splits``):

- Without an explicit split, each class is shuffled once (seeded by ``seed`` and the class index)
  and cut in order: the first ``train_per_class`` images (or ``train_fraction`` of the class, at
  least 1) train, the next ``val_per_class`` (or ``val_fraction`` of the class, at least 1) validate,
  and the rest test, capped at ``test_per_class``. Fractions are of the class's total. With neither
  train setting, ``train_fraction`` is 0.8.
- With an explicit split (a manifest's split column, Fashion-MNIST's official split) each setting
  samples *within its own pool*: train from the "train" rows; val from the "val" rows (at most
  ``val_per_class`` / ``val_fraction`` of them per class, all by default), or from the train rows
  not drawn for training when there are none; test from the "test" rows (capped), or from whatever
  of the train pool is left when there are none. With neither train
  setting, all "train" rows train (minus any val drawn from them) -- unless there are no "test"
  rows, in which case ``train_fraction`` 0.8 of the train pool trains and the rest tests.

Cutting one shuffled order per class makes the splits nested: with the same seed, the 5 training
images per class of ``train_per_class=5`` are among the 10 of ``train_per_class=10``, so few-shot
curves compare like with like. Seeding per class keeps a class's split unchanged when another
class gains images. Count settings that do not fit a class are errors; fraction settings shrink
(never below 1) so that each class keeps at least one test image.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from visiontune.data.images import MAX_LISTED
from visiontune.data.records import SPLIT_NAMES, ImageRecords
from visiontune.errors import ConfigError, DataError

DEFAULT_TRAIN_FRACTION = 0.8


class SplitSpec(Protocol):
    """What ``make_splits`` reads from a config (``visiontune.config.DataConfig`` has these fields)."""

    train_per_class: int | None
    train_fraction: float | None
    val_per_class: int | None
    val_fraction: float | None
    test_per_class: int | None
    seed: int


@dataclass
class SplitConfig:
    """A stand-alone :class:`SplitSpec` for library use and tests (fields as in ``DataConfig``)."""

    train_per_class: int | None = None
    train_fraction: float | None = None
    val_per_class: int | None = None
    val_fraction: float | None = None
    test_per_class: int | None = None
    seed: int = 0


def split_problems(cfg: Any) -> list[str]:
    """Problems of the split settings of ``cfg`` (a DataConfig or any object with the same split fields)."""
    out = []
    if cfg.train_per_class is not None and cfg.train_fraction is not None:
        out.append("data.train_per_class and data.train_fraction are both set; keep one")
    if cfg.val_per_class is not None and cfg.val_fraction is not None:
        out.append("data.val_per_class and data.val_fraction are both set; keep one")
    for key in ("train_per_class", "val_per_class", "test_per_class"):
        v = getattr(cfg, key)
        if v is not None and (int(v) != v or v < 1):
            out.append(f"data.{key}={v!r} must be an integer >= 1 (or null)")
    for key in ("train_fraction", "val_fraction"):
        v = getattr(cfg, key)
        if v is not None and not 0.0 < v < 1.0:
            out.append(f"data.{key}={v!r} must be in (0, 1) (or null)")
    return out


def _check_spec(cfg: SplitSpec) -> None:
    problems = split_problems(cfg)
    if problems:
        raise ConfigError(problems)


def _count(n: int, per_class: int | None, fraction: float | None) -> tuple[int, bool]:
    """(images wanted from a pool of ``n``, whether the number may shrink to fit)."""
    if per_class is not None:
        return int(per_class), False
    if fraction is not None:
        return max(1, round(fraction * n)), True
    return 0, False


def _perm(pool: np.ndarray, seed: int, label: int, pool_id: int) -> np.ndarray:
    """A seeded shuffle of one class's pool; independent of every other class and pool."""
    return np.random.default_rng([seed, label, pool_id]).permutation(pool)


def make_splits(records: ImageRecords, cfg: SplitSpec) -> dict[str, ImageRecords]:
    """Split ``records`` into stratified, seeded "train", "val" (possibly empty) and "test" subsets.

    Args:
        records: the whole dataset.
        cfg: the split settings (see the module docstring for the rules).

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``, each in the records' original order.

    Raises:
        ConfigError: contradictory or out-of-range settings.
        DataError: a class has too few images for the requested counts, or no training image,
            or the same file ends up in two splits.
    """
    _check_spec(cfg)
    seed = int(cfg.seed)
    labels = records.labels
    n_classes = len(records.classes)
    explicit = records.splits is not None
    split_of = np.asarray(records.splits if explicit else ["train"] * len(records))
    has = {s: bool((split_of == s).any()) for s in SPLIT_NAMES}
    if explicit and not has["train"]:
        raise DataError(f"{records.source}: the explicit split has no 'train' rows "
                        f"(only {', '.join(s for s in SPLIT_NAMES if has[s])}). Fix: mark some rows 'train'.")
    tpc, tf = cfg.train_per_class, cfg.train_fraction
    if tpc is None and tf is None and not has["test"]:
        tf = DEFAULT_TRAIN_FRACTION
    val_from_train = not has["val"]
    test_from_train = not has["test"]

    chosen: dict[str, list[np.ndarray]] = {s: [] for s in SPLIT_NAMES}
    problems: list[str] = []
    pool_name = "the 'train' rows" if explicit else "the dataset"
    for c in range(n_classes):
        in_class = labels == c
        pool = _perm(np.flatnonzero(in_class & (split_of == "train")), seed, c, 0)
        n = len(pool)
        if n == 0:
            problems.append(f"class {records.classes[c]!r} has no images in {pool_name}")
            continue
        n_val, val_shrinks = _count(n, cfg.val_per_class, cfg.val_fraction) if val_from_train else (0, False)
        need_test = 1 if test_from_train else 0
        if tpc is None and tf is None:
            n_train, train_shrinks = n - n_val - need_test, False
        else:
            n_train, train_shrinks = _count(n, tpc, tf)
        excess = n_train + n_val + need_test - n
        if excess > 0 and val_shrinks:
            cut = min(excess, n_val - 1)
            n_val, excess = n_val - cut, excess - cut
        if excess > 0 and train_shrinks:
            cut = min(excess, n_train - 1)
            n_train, excess = n_train - cut, excess - cut
        if excess > 0 or n_train < 1:
            parts = [f"{n_train} train"] + ([f"{n_val} val"] if n_val else []) + (["1 test"] if need_test else [])
            problems.append(
                f"class {records.classes[c]!r} has {n} images in {pool_name}, fewer than the "
                f"{n_train + n_val + need_test} the split needs ({' + '.join(parts)})"
            )
            continue
        chosen["train"].append(pool[:n_train])
        if val_from_train:
            chosen["val"].append(pool[n_train:n_train + n_val])
        if test_from_train:
            chosen["test"].append(pool[n_train + n_val:])
        if not val_from_train:
            vpool = _perm(np.flatnonzero(in_class & (split_of == "val")), seed, c, 1)
            k, _ = _count(len(vpool), cfg.val_per_class, cfg.val_fraction)
            chosen["val"].append(vpool[: (k or len(vpool))])
        if not test_from_train:
            chosen["test"].append(_perm(np.flatnonzero(in_class & (split_of == "test")), seed, c, 2))
    if problems:
        raise DataError(
            f"{records.source}: cannot split with train_per_class={cfg.train_per_class}, "
            f"train_fraction={cfg.train_fraction}, val_per_class={cfg.val_per_class}, val_fraction={cfg.val_fraction}:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nFix: lower data.train_per_class / data.val_per_class (or the fractions), or add images to those classes."
        )
    cap = cfg.test_per_class
    if cap is not None:
        chosen["test"] = [t[:cap] for t in chosen["test"]]
    out = {}
    for s in SPLIT_NAMES:
        idx = np.sort(np.concatenate(chosen[s])) if chosen[s] else np.zeros(0, dtype=np.int64)
        out[s] = records.subset(idx)
    check_no_leak(out)
    return out


def _identity(item: str | np.ndarray, id: str) -> str:
    """What makes two records the same image: the resolved file, or the id of an in-memory image."""
    if isinstance(item, np.ndarray):
        return f"id:{id}"
    return os.path.normcase(os.path.realpath(item))


def check_no_leak(splits: dict[str, ImageRecords]) -> None:
    """Fail when the same file (after resolving links and ``..``) appears in two splits.

    Raises:
        DataError: naming each shared file (up to 20), its ids and both splits.
    """
    where: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name, recs in splits.items():
        seen_here: set[str] = set()
        for item, id in zip(recs.items, recs.ids):
            key = _identity(item, id)
            if key not in seen_here:
                seen_here.add(key)
                where[key].append((name, id))
    leaks = [(k, v) for k, v in where.items() if len(v) > 1]
    if leaks:
        lines = [
            f"  - {k.removeprefix('id:')}: " + ", ".join(f"{s} ({i})" for s, i in v) for k, v in leaks[:MAX_LISTED]
        ]
        if len(leaks) > MAX_LISTED:
            lines.append(f"  ... and {len(leaks) - MAX_LISTED} more")
        raise DataError(
            f"{len(leaks)} image(s) appear in more than one split, which would leak test data into training:\n"
            + "\n".join(lines) + "\nFix: list each file once (remove duplicate rows or links), then split again."
        )


def split_identity(splits: dict[str, ImageRecords]) -> dict[str, object]:
    """A fingerprint of which image is in which split with which label, stored with a run.

    A resumed run (or a sweep deciding a run is finished) compares it with the current split: the same
    config can give another split when the dataset's files changed, and a changed split can move test
    images into training. Hashes the records' ids and class names, not pixels (cheap for any size).

    Returns:
        ``{"sha256": hex digest, "sizes": {"train": n, "val": n, "test": n}}``.
    """
    h = hashlib.sha256()
    for name in SPLIT_NAMES:
        recs = splits.get(name)
        h.update(f"[{name}]\n".encode())
        if recs is None:
            continue
        for id, label in zip(recs.ids, recs.labels):
            h.update(f"{id}\t{recs.classes[int(label)]}\n".encode())
    return {"sha256": h.hexdigest(), "sizes": {name: len(splits[name]) if name in splits else 0 for name in SPLIT_NAMES}}


def split_differences(stored: dict[str, object] | None, current: dict[str, object]) -> list[str]:
    """[] when two :func:`split_identity` values match (or none was stored), else one line saying how they differ."""
    if not isinstance(stored, dict) or stored.get("sha256") == current["sha256"]:
        return []
    sizes = lambda s: "/".join(str((s.get("sizes") or {}).get(n, "?")) for n in SPLIT_NAMES)  # noqa: E731
    return [f"data split: {sizes(stored)} train/val/test images (sha256 {str(stored.get('sha256'))[:12]}) in the stored "
            f"run, {sizes(current)} (sha256 {str(current['sha256'])[:12]}) now: the dataset's files or labels changed"]


def describe_splits(splits: dict[str, ImageRecords]) -> str:
    """A plain-text table of images per class (rows) and split (columns), with totals."""
    names = [s for s in SPLIT_NAMES if s in splits] + [s for s in splits if s not in SPLIT_NAMES]
    if not names:
        return "(no splits)"
    classes = next(iter(splits.values())).classes
    counts = {s: splits[s].class_counts() for s in names}
    width = max([len("class"), len("total")] + [len(c) for c in classes])
    cols = [max(len(s), len(str(len(splits[s])))) for s in names]
    header = "class".ljust(width) + "".join(f"  {s:>{w}}" for s, w in zip(names, cols))
    lines = [header, "-" * len(header)]
    for c in classes:
        lines.append(c.ljust(width) + "".join(f"  {counts[s].get(c, 0):>{w}}" for s, w in zip(names, cols)))
    lines.append("-" * len(header))
    lines.append("total".ljust(width) + "".join(f"  {len(splits[s]):>{w}}" for s, w in zip(names, cols)))
    return "\n".join(lines)
