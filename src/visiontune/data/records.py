"""The in-memory description of a labeled image dataset, before any image is decoded.

An :class:`ImageRecords` is a list of image references (file paths or in-memory uint8 arrays) with
integer labels, human-readable ids and, when the source fixes one, an explicit split per image. Every
loader in :mod:`visiontune.data` returns one; splitting, leak checks and the torch ``Dataset`` work on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from visiontune.errors import DataError

SPLIT_NAMES = ("train", "val", "test")
"""The split names an explicit split may use, in the order they are reported."""


@dataclass
class ImageRecords:
    """Labeled image references: what a dataset is, without decoding any image.

    Attributes:
        items: per image, a file path or an in-memory uint8 image (HxW or HxWxC).
        labels: class index per image (int64), indexing ``classes``.
        ids: per image, a human-readable id used in error messages and leak checks (the path as the
            user wrote it, ``"fashion-mnist:train:123"``, ``"manifest.csv row 17: a.png"``).
        classes: class names in index order.
        splits: explicit split per image ("train" / "val" / "test") when the source defines one
            (a manifest's split column, an official train/test split), else None.
        source: where the records came from, for reports and messages.
        channels: None for photos (decoded to RGB); N for multi-band arrays of N bands
            (``data.channels``, read by :func:`visiontune.data.bands.read_bands`).
    """

    items: list[str | np.ndarray]
    labels: np.ndarray
    ids: list[str]
    classes: list[str]
    splits: list[str] | None = None
    source: str = ""
    channels: int | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        n = len(self.items)
        lengths = {"labels": len(self.labels), "ids": len(self.ids)}
        if self.splits is not None:
            lengths["splits"] = len(self.splits)
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise ValueError(f"ImageRecords from {self.source!r}: {n} items but lengths {bad}")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(
                f"ImageRecords from {self.source!r}: labels must lie in [0, {len(self.classes)}), "
                f"got range [{self.labels.min()}, {self.labels.max()}]"
            )
        if self.splits is not None:
            unknown = sorted(set(self.splits) - set(SPLIT_NAMES))
            if unknown:
                raise ValueError(f"ImageRecords from {self.source!r}: unknown split names {unknown}")

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageRecords:
        """The records at ``indices`` (in that order), with the same classes and source."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return ImageRecords(
            items=[self.items[i] for i in idx],
            labels=self.labels[idx],
            ids=[self.ids[i] for i in idx],
            classes=list(self.classes),
            splits=None if self.splits is None else [self.splits[i] for i in idx],
            source=self.source, channels=self.channels,
        )

    def class_counts(self) -> dict[str, int]:
        """Number of images per class name, in class order (classes without images count 0)."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, counts)}

    def with_classes(self, classes: Sequence[str]) -> ImageRecords:
        """The same images with labels re-indexed into ``classes`` (e.g. a trained run's label order).

        Raises:
            DataError: a class present in these records is not in ``classes`` (names the first
                image of that class and the known labels).
        """
        classes = [str(c) for c in classes]
        if classes == list(self.classes):
            return self
        index = {c: i for i, c in enumerate(classes)}
        present = np.unique(self.labels)
        missing = [self.classes[k] for k in present if self.classes[k] not in index]
        if missing:
            first = {c: self.ids[int(np.flatnonzero(self.labels == self.classes.index(c))[0])] for c in missing}
            where = "; ".join(f"{c!r} (e.g. {first[c]})" for c in missing[:10])
            raise DataError(
                f"{self.source}: label(s) {where} are not among the known labels {classes}. "
                f"Fix: relabel or remove those images, or use data/classes that include them."
            )
        mapping = np.array([index.get(c, -1) for c in self.classes], dtype=np.int64)
        return ImageRecords(
            items=self.items, labels=mapping[self.labels], ids=self.ids, classes=classes,
            splits=self.splits, source=self.source, channels=self.channels,
        )


def sort_labels(labels: Sequence[str]) -> list[str]:
    """Sorted unique labels; numerically when every label is an integer, so "10" follows "9"."""
    unique = set(labels)
    if unique and all(_is_int(s) for s in unique):
        return sorted(unique, key=lambda s: (int(s), s))
    return sorted(unique)


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True
