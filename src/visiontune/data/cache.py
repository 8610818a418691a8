"""Decoded-image cache and a gray-aware transform path: the same pixels as :class:`ImageDataset`, cheaper.

A training epoch re-reads and re-decodes every image, and an evaluation resizes each one in RGB. Two
things are done here instead, both giving tensors *identical* to ``ImageDataset(records, transform)``
(tests pin the equality):

* :class:`DecodedImages` decodes each image once (a thread pool: PIL releases the GIL while it
  decodes) and keeps it as a uint8 array, so later epochs skip file reads and PNG/JPEG decoding.
  Images are kept at their decoded resolution, not pre-resized: a random-resized crop of a
  pre-shrunk image would be blurrier than one of the original, so caching at the network's input size
  would change what the model sees. Gray images are stored with one channel (a third of the memory).
* Gray images (8-bit ``L``, the common case for industrial, medical and remote-sensing data) run the
  geometric part of the transform (crop, resize, flip) on the single channel and are replicated to RGB
  afterwards. PIL resamples every band with the same fixed-point filter, so this equals resizing the
  replicated RGB image, at about half the cost; the random crop/flip parameters depend only on the
  image size, so the random streams are consumed identically too.

Written by hand because torchvision/timm datasets decode on every access and have no notion of
"this image is gray, resize one band". Memory is bounded by ``budget_mb``: images beyond it are
decoded on access as before.
"""

from __future__ import annotations

import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from visiontune.data.bands import BandDataset
from visiontune.data.images import ImageLimits, ToRGB, _default_transform, decode_image
from visiontune.data.records import ImageRecords

DEFAULT_BUDGET_MB = 2048
"""Decoded images kept per dataset split at most (MiB); the rest are decoded on access."""


def decode_compact(item: str | np.ndarray, id: str | None = None, limits: ImageLimits | None = None) -> Image.Image:
    """Decode like :func:`~visiontune.data.images.load_image`, but keep 8-bit gray images as ``L``.

    The same :func:`~visiontune.data.images.decode_image` (size guard, error per file); anything
    that is not plain 8-bit gray comes back as the RGB image ``load_image`` returns, so the RGB
    replication of the returned image is exactly what ``load_image`` gives.
    """
    return decode_image(item, id, limits, keep_gray=True)


# Transforms that only move/resample pixels (the same filter on every band), so they commute with
# gray -> RGB replication. Anything else (colour jitter, normalisation...) runs after replication.
def _geometric_types() -> tuple[type, ...]:
    from timm.data.transforms import CenterCropOrPad, RandomResizedCropAndInterpolation, ResizeKeepRatio

    return (
        RandomResizedCropAndInterpolation, ResizeKeepRatio, CenterCropOrPad, T.RandomResizedCrop, T.Resize,
        T.CenterCrop, T.RandomCrop, T.RandomHorizontalFlip, T.RandomVerticalFlip,
    )


class GrayAwareTransform:
    """Wrap a visiontune transform (``Compose([ToRGB(), ...])``) to process gray images on one band.

    RGB images go through the original transform unchanged. Gray (``L``) images run the leading
    geometric steps in ``L``, then the RGB conversion, then the rest: the output is identical.

    Args:
        transform: the transform to wrap; when it is not a ``Compose`` starting with ``ToRGB`` the
            wrapper simply converts gray images to RGB first (still exact).
    """

    def __init__(self, transform: Callable[[Image.Image], Any] | None):
        self.transform = transform or _default_transform
        self.gray_steps: list[Any] = []
        self.rgb_steps: list[Any] | None = None
        ops = getattr(transform, "transforms", None)
        if isinstance(transform, T.Compose) and ops and isinstance(ops[0], ToRGB):
            geometric = _geometric_types()
            i = 1
            while i < len(ops) and isinstance(ops[i], geometric):
                i += 1
            self.gray_steps, self.rgb_steps = list(ops[1:i]), list(ops[i:])

    def __call__(self, img: Image.Image) -> Any:
        if img.mode != "L":
            return self.transform(img)
        if self.rgb_steps is None:
            return self.transform(img.convert("RGB"))
        for op in self.gray_steps:
            img = op(img)
        img = img.convert("RGB")
        for op in self.rgb_steps:
            img = op(img)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


class DecodedImages:
    """Every image of ``records`` decoded once into uint8 arrays (``HxW`` for gray, ``HxWx3`` otherwise).

    Args:
        records: the images.
        budget_mb: stop keeping images once this much is held; the rest are decoded on access.
        workers: decoding threads (default: the CPU count, at most 8).
        limits: the decoding size guard (default: :data:`~visiontune.data.images.DEFAULT_LIMITS`).
    """

    def __init__(
        self, records: ImageRecords, budget_mb: float = DEFAULT_BUDGET_MB, workers: int | None = None,
        limits: ImageLimits | None = None,
    ):
        # The lists, not the records object: the shared store must not keep ``records`` alive (it is
        # dropped from the shared table when ``records`` is collected), and must pickle for workers.
        self.items, self.ids = records.items, records.ids
        self.budget_bytes = int(budget_mb * 2**20)
        self.arrays: list[np.ndarray | None] = [None] * len(records)
        self.nbytes = 0
        self.filled = False
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.limits = limits

    def fill(self) -> DecodedImages:
        """Decode every image (once; later calls return at once). Returns self."""
        if self.filled:
            return self

        def decode(i: int) -> np.ndarray:
            return np.asarray(decode_compact(self.items[i], self.ids[i], self.limits))

        # Decoding in chunks keeps at most one chunk beyond the budget in memory.
        chunk = max(1, 4 * self.workers)
        full = False
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for start in range(0, len(self.items), chunk):
                idx = range(start, min(len(self.items), start + chunk))
                for i, arr in zip(idx, pool.map(decode, idx)):
                    if self.nbytes + arr.nbytes > self.budget_bytes:
                        full = True  # over budget: the rest is decoded on access
                        break
                    self.arrays[i] = arr
                    self.nbytes += arr.nbytes
                if full:
                    break
        self.filled = True
        return self

    @property
    def cached(self) -> int:
        """How many images are held decoded."""
        return sum(a is not None for a in self.arrays)

    def image(self, index: int) -> Image.Image:
        """Image ``index`` as a PIL image (``L`` for gray, else ``RGB``), from memory when cached."""
        arr = self.arrays[index]
        if arr is None:
            return decode_compact(self.items[index], self.ids[index], self.limits)
        return Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB")


class CachedImageDataset(torch.utils.data.Dataset):
    """Drop-in for :class:`~visiontune.data.ImageDataset` (same ``(tensor, label)`` items, same values).

    Args:
        records: the images and labels.
        transform: the transform ``ImageDataset`` would apply (wrapped in :class:`GrayAwareTransform`).
        store: decoded images to read from; None decodes on every access (still with the gray path).
        limits: the decoding size guard for images decoded on access.
    """

    def __init__(
        self, records: ImageRecords, transform: Callable[[Image.Image], Any] | None = None, store: DecodedImages | None = None,
        limits: ImageLimits | None = None,
    ):
        self.records = records
        self.transform = GrayAwareTransform(transform)
        self.store = store
        self.limits = limits

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        r = self.records
        img = self.store.image(index) if self.store is not None else decode_compact(r.items[index], r.ids[index], self.limits)
        return self.transform(img), int(r.labels[index])


_STORES: dict[int, DecodedImages] = {}


def decoded_images(records: ImageRecords, budget_mb: float = DEFAULT_BUDGET_MB, limits: ImageLimits | None = None) -> DecodedImages:
    """The (filled) :class:`DecodedImages` of ``records``, shared by every dataset built on the same object.

    A run builds several datasets over its training split (probe head init, training, augmented views);
    they all read one store, which is released when ``records`` is garbage collected.
    """
    key = id(records)
    store = _STORES.get(key)
    if store is None or store.items is not records.items or store.limits != limits:
        store = DecodedImages(records, budget_mb, limits=limits)
        _STORES[key] = store
        weakref.finalize(records, _STORES.pop, key, None)
    return store.fill()


def image_dataset(
    records: ImageRecords, transform: Callable[[Image.Image], Any] | None, cache: bool = True,
    budget_mb: float = DEFAULT_BUDGET_MB, limits: ImageLimits | None = None,
) -> CachedImageDataset | BandDataset:
    """The dataset the training loop uses: decoded once when ``cache`` (split read every epoch), else per access.

    Args:
        records: the split.
        transform: image -> tensor (e.g. :func:`~visiontune.backbones.build_transform`).
        cache: keep decoded images in memory (for splits read more than once: train, val).
        budget_mb: memory bound of the decoded store.
        limits: the decoding size guard (``data.max_pixels`` / ``data.max_aspect`` of a run).

    Multi-band records (``records.channels`` set) give a :class:`~visiontune.data.bands.BandDataset` (arrays kept
    in memory when ``cache``).
    """
    if records.channels is not None:
        return BandDataset(records, transform, cache, limits)
    store = decoded_images(records, budget_mb, limits) if cache else None
    return CachedImageDataset(records, transform, store, limits)
