"""Unlabeled images for pretraining: finding them, multi-band arrays, and DINOv2's multi-crop views.

Sources: a built-in dataset or CSV manifest (labels never read), or a folder searched recursively
(flat or with subfolders) for images or, with ``data.channels=C``, for multi-band ``.npy`` /
``.tif`` arrays (HxWxC or CxHxW). ``data.exclude_eval_of`` drops the val/test images of a run
config's split, so a later probe on that split is evaluated on images pretraining never saw.

Each image yields two global crops and ``local_number`` local crops (DINOv2's augmentations:
random resized crop, flip, colour jitter, grayscale, blur, solarisation; geometric only for
multi-band data). Every sample's augmentation is seeded by (run seed, position in the sample
stream), so the crops are the same with any number of DataLoader workers and after a resume.

The transforms are torchvision's; the multi-band reader is :mod:`visiontune.data.bands` (shared with fine-tuning).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from visiontune.errors import ConfigError, DataError
from visiontune.config import load_config
from visiontune.data import ImageRecords, load_image, load_records, make_splits, validate_images
from visiontune.data import bands
from visiontune.data.bands import ARRAY_EXTENSIONS, check_arrays, load_bands
from visiontune.data.sources import IMAGE_EXTENSIONS
from visiontune.registry import DATASETS


@dataclass
class UnlabeledImages:
    """The pretraining pool: image references, their ids, and what was left out.

    Attributes:
        items: file paths or in-memory arrays.
        ids: human-readable ids (for lineage and messages).
        source: where they came from.
        excluded: how many images ``exclude_eval_of`` removed.
        multiband: items are multi-band arrays (read with :func:`load_array`).
        excluded_from: what was held out (for the lineage record), or None.
    """

    items: list[str | np.ndarray]
    ids: list[str]
    source: str
    excluded: int = 0
    multiband: bool = False
    excluded_from: str | None = None

    def __len__(self) -> int:
        return len(self.items)


def _walk(folder: str, extensions: tuple[str, ...]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if not f.startswith(".") and f.lower().endswith(extensions))
    return found


def _identity(item: str | np.ndarray, id: str) -> str:
    return f"id:{id}" if isinstance(item, np.ndarray) else os.path.normcase(os.path.realpath(item))


def heldout_identities(run_config: str) -> tuple[set[str], str]:
    """Files (or in-memory ids) in the val and test splits of a fine-tuning run config.

    Returns:
        (identities, a one-line description for the lineage record).
    """
    cfg = load_config(run_config)
    records = load_records(cfg.data.dataset, root=cfg.data.root, channels=cfg.data.channels)
    splits = make_splits(records, cfg.data)
    held = {_identity(it, i) for s in ("val", "test") for it, i in zip(splits[s].items, splits[s].ids)}
    return held, f"val+test of {run_config} ({cfg.data.dataset}, seed {cfg.data.seed}: {len(held)} images)"


def load_unlabeled(
    dataset: str, root: str | None = None, channels: int | None = None, exclude_eval_of: str | None = None,
    max_images: int | None = None, seed: int = 0,
) -> UnlabeledImages:
    """Collect the unlabeled pretraining images (every file checked up front).

    Args:
        dataset: built-in name or CSV manifest (labels ignored), or a folder searched recursively.
        root: a built-in dataset's folder (as ``data.root``).
        channels: None for RGB images; C for multi-band arrays (folder only).
        exclude_eval_of: a run config whose val/test images are removed.
        max_images: keep a seeded random subset of at most this many.
        seed: seed of that subset.

    Raises:
        DataError: nothing found, unreadable files, arrays of the wrong band count.
        ConfigError: a multi-band source that is not a folder.
    """
    path = os.path.expanduser(dataset)
    is_builtin = dataset in DATASETS and "/" not in dataset and os.sep not in dataset
    if channels is not None:
        if is_builtin or not os.path.isdir(path):
            raise ConfigError(
                f"data.channels={channels} reads multi-band arrays from a folder, but data.dataset={dataset!r} is not "
                f"one; point it at a folder of {'/'.join(ARRAY_EXTENSIONS)} files, or set data.channels=null for images"
            )
        files = _walk(path, ARRAY_EXTENSIONS)
        if not files:
            raise DataError(f"folder {dataset} holds no {'/'.join(ARRAY_EXTENSIONS)} files. Fix: add arrays or check data.dataset.")
        check_arrays(files, channels)
        pool = UnlabeledImages(list(files), [os.path.relpath(f, path) for f in files], f"array folder {dataset}", multiband=True)
    elif is_builtin or os.path.isfile(path):
        records = load_records(dataset, root=root)
        pool = UnlabeledImages(list(records.items), list(records.ids), records.source)
    elif os.path.isdir(path):
        files = _walk(path, IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"folder {dataset} holds no image files ({', '.join(IMAGE_EXTENSIONS)}). Fix: add images or check data.dataset.")
        records = ImageRecords(items=list(files), labels=np.zeros(len(files)), ids=[os.path.relpath(f, path) for f in files],
                               classes=["unlabeled"], source=f"image folder {dataset}")
        validate_images(records)
        pool = UnlabeledImages(list(files), list(records.ids), records.source)
    else:
        load_records(dataset, root=root)  # raises the standard "neither built-in, folder nor CSV" message
        raise DataError(f"data.dataset={dataset!r} cannot be read")  # pragma: no cover - load_records raised
    if exclude_eval_of:
        held, desc = heldout_identities(exclude_eval_of)
        keep = [k for k, (it, i) in enumerate(zip(pool.items, pool.ids)) if _identity(it, i) not in held]
        pool = UnlabeledImages([pool.items[k] for k in keep], [pool.ids[k] for k in keep], pool.source,
                               excluded=len(pool) - len(keep), multiband=pool.multiband, excluded_from=desc)
    if max_images is not None and len(pool) > max_images:
        keep = np.sort(np.random.default_rng([seed, 7]).permutation(len(pool))[:max_images])
        pool = UnlabeledImages([pool.items[k] for k in keep], [pool.ids[k] for k in keep], pool.source,
                               excluded=pool.excluded, multiband=pool.multiband, excluded_from=pool.excluded_from)
    if len(pool) < 2:
        raise DataError(f"{pool.source}: {len(pool)} image(s) left for pretraining; at least 2 are needed.")
    return pool


# ----------------------------------------------------------------------------- multi-band arrays


def band_statistics(items: Sequence[str], channels: int, max_files: int = 64, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-band mean and std of the pool (:func:`visiontune.data.bands.band_statistics` over up to 64 arrays)."""
    return bands.band_statistics(items, channels, max_files=max_files, seed=seed)


# ----------------------------------------------------------------------------- multi-crop


class MultiCrop:
    """Two global crops and ``local_number`` local crops of one image, normalised.

    Args:
        global_size: global crop side.
        local_size: local crop side.
        local_number: local crops per image.
        global_scale: area range of global crops.
        local_scale: area range of local crops.
        mean: per-channel mean.
        std: per-channel std.
        photometric: DINOv2's colour jitter / grayscale / blur / solarisation (RGB only).
        multiband: inputs are ``[C, H, W]`` float tensors instead of PIL images.
    """

    def __init__(
        self, global_size: int, local_size: int, local_number: int, global_scale: Sequence[float],
        local_scale: Sequence[float], mean: Sequence[float], std: Sequence[float], photometric: bool = True,
        multiband: bool = False,
    ):
        from torchvision.transforms import v2 as T

        self.local_number = local_number
        inter = T.InterpolationMode.BICUBIC

        def geometric(size: int, scale: Sequence[float]) -> list[Any]:
            return [T.RandomResizedCrop(size, scale=tuple(scale), interpolation=inter, antialias=True), T.RandomHorizontalFlip()]

        if multiband:
            to_tensor: list[Any] = [T.Normalize(list(mean), list(std))]
            jitter: list[Any] = []
            blur = lambda p: []  # noqa: E731
            solarize: list[Any] = []
        else:
            to_tensor = [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
            jitter = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)] if photometric else []

            def blur(p: float) -> list[Any]:
                return [PILGaussianBlur(p)] if photometric and p > 0 else []

            solarize = [T.RandomSolarize(threshold=128, p=0.2)] if photometric else []
        # DINOv2: the first global crop is always blurred, the second rarely and sometimes solarised.
        self.global1 = T.Compose(geometric(global_size, global_scale) + jitter + blur(1.0) + to_tensor)
        self.global2 = T.Compose(geometric(global_size, global_scale) + jitter + blur(0.1) + solarize + to_tensor)
        self.local = T.Compose(geometric(local_size, local_scale) + jitter + blur(0.5) + to_tensor)

    def __call__(self, img: Image.Image | torch.Tensor) -> list[torch.Tensor]:
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.local_number)]


class PILGaussianBlur:
    """With probability ``p``, blur a PIL image with a radius drawn uniformly from ``radius`` (as DINOv2).

    PIL's filter rather than torchvision's tensor blur: on a busy CPU a multi-threaded conv on one small
    image costs ~100 ms, PIL's ~1 ms.
    """

    def __init__(self, p: float, radius: tuple[float, float] = (0.1, 2.0)):
        self.p = p
        self.radius = radius

    def __call__(self, img: Image.Image) -> Image.Image:
        from PIL import ImageFilter

        if float(torch.rand(())) >= self.p:
            return img
        lo, hi = self.radius
        return img.filter(ImageFilter.GaussianBlur(radius=lo + (hi - lo) * float(torch.rand(()))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius={self.radius})"


class CropDataset(Dataset):
    """``key -> list of crops`` where ``key = epoch * n + index`` (see :class:`StreamSampler`).

    The augmentation RNG is seeded from (seed, key), so a sample's crops do not depend on worker
    processes, batch boundaries or resuming.
    """

    def __init__(self, pool: UnlabeledImages, transform: Callable[[Any], list[torch.Tensor]], seed: int,
                 channels: int | None = None):
        self.pool = pool
        self.transform = transform
        self.seed = seed
        self.channels = channels

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, key: int) -> list[torch.Tensor]:
        i = key % len(self.pool)
        item = self.pool.items[i]
        img = load_bands(str(item), int(self.channels)) if self.pool.multiband else load_image(item, self.pool.ids[i])
        state = int(np.random.SeedSequence([self.seed, key]).generate_state(1)[0])
        # In the main process, torch's thread pool would split each tiny crop op over all cores; on a
        # busy machine the synchronisation costs ~50x the work. DataLoader workers run single-threaded anyway.
        threads = torch.get_num_threads()
        single = torch.utils.data.get_worker_info() is None and threads > 1
        if single:
            torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(state)
                return self.transform(img)
        finally:
            if single:
                torch.set_num_threads(threads)


class StreamSampler(Sampler[int]):
    """An endless stream of shuffled epochs, starting at any position (for exact resume).

    Position ``p`` of the stream is image ``perm_e[p % n]`` of epoch ``e = p // n``, where each
    epoch's permutation is seeded by (seed, e). Yields keys ``e * n + index``.
    """

    def __init__(self, n: int, seed: int, start: int = 0):
        self.n = n
        self.seed = seed
        self.start = start

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 3, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[int]:
        pos = self.start
        while True:
            epoch, offset = divmod(pos, self.n)
            perm = self._perm(epoch)
            for j in range(offset, self.n):
                yield epoch * self.n + int(perm[j])
            pos = (epoch + 1) * self.n

    def __len__(self) -> int:  # a DataLoader asks; the stream itself is endless
        return self.n


def collate_crops(batch: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """``[[g1, g2, l1, ...] per image]`` -> ``[G1 [B,C,H,W], G2, L1, ...]``."""
    return [torch.stack(views) for views in zip(*batch)]
