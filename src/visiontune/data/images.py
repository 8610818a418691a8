"""Decoding images to RGB, checking that every file of a dataset is usable, and the torch ``Dataset``.

All decoding goes through :func:`load_image`, so training, evaluation and serving see the same pixels
for the same file: EXIF orientation applied, grayscale / palette / CMYK converted to RGB, transparency
composited onto white (as a browser shows it), and 16-bit or float images scaled to 8 bits (PIL's own ``convert("RGB")`` would
clip 16-bit values at 255 and turn most of such an image white).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from visiontune.data.records import ImageRecords
from visiontune.errors import DataError

MAX_LISTED = 20
"""How many bad files an error lists before summarising the rest as "and N more"."""


def load_image(item: str | np.ndarray, id: str | None = None) -> Image.Image:
    """Decode one image reference into an 8-bit RGB PIL image.

    Args:
        item: a file path, or an in-memory uint8 image (HxW, HxWx1, HxWx3 or HxWx4).
        id: the human-readable id used in error messages (defaults to the path).

    Raises:
        DataError: the file is missing or cannot be decoded, or the array has an unusable
            shape / dtype; the message names the image and the fix.
    """
    if isinstance(item, np.ndarray):
        return _array_to_rgb(item, id or "in-memory image")
    path = os.fspath(item)
    name = id or path
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except FileNotFoundError:
        raise DataError(f"image {name} does not exist ({path}). Fix: restore the file or remove it from the dataset.") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot decode image {name}{_path_note(name, path)}: {exc}. "
            f"Fix: re-export or delete the file (or remove its manifest row)."
        ) from exc


def _path_note(name: str, path: str) -> str:
    return "" if name == path else f" ({path})"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see the module docstring for the choices)."""
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _array_to_rgb(np.asarray(img), "image")
    if img.mode == "P":
        # A palette may carry transparency; going through RGBA keeps it instead of PIL warning and dropping it.
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _array_to_rgb(arr: np.ndarray, name: str) -> Image.Image:
    """An HxW / HxWxC array -> 8-bit RGB PIL image; wider integer and float ranges are scaled to 0..255."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or a.size == 0:
        raise DataError(
            f"image {name} has shape {a.shape}; expected HxW, HxWx1, HxWx3 or HxWx4. "
            f"Fix: pass images as uint8 arrays (height, width[, channels])."
        )
    if a.dtype != np.uint8:
        if a.dtype == np.bool_:
            a = a.astype(np.uint8) * 255
        elif np.issubdtype(a.dtype, np.integer):
            # uint16 is a 16-bit source (PNG/TIFF, PIL "I;16"): scale its full range. Wider ints (PIL
            # "I") do not say their bit depth, so only values above 255 are taken as 16-bit data.
            wide = (a.dtype.kind == "u" and a.dtype.itemsize == 2) or int(a.max()) > 255
            a = a.astype(np.float64) / 257.0 if wide else a.astype(np.float64)
            a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        elif np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all():
                raise DataError(f"image {name} contains NaN or infinite pixels. Fix: clean or re-export the image.")
            scale = 255.0 if a.max() <= 1.0 else 1.0
            a = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        else:
            raise DataError(f"image {name} has dtype {a.dtype}; expected uint8. Fix: convert it to uint8 (0..255).")
    img = Image.fromarray(np.ascontiguousarray(a))
    return to_rgb(img) if img.mode != "RGB" else img


def _check_file(path: str, decode: bool) -> str | None:
    """The reason ``path`` is unusable, or None when it is a readable image."""
    try:
        if not os.path.isfile(path):
            return "file does not exist" if not os.path.exists(path) else "not a regular file"
        if os.path.getsize(path) == 0:
            return "file is empty (0 bytes)"
        with Image.open(path) as img:
            if decode:
                img.load()
            else:
                # verify() checks structure and checksums without decoding pixels; it leaves the
                # image unusable, which is fine because the handle is discarded.
                img.verify()
    except UnidentifiedImageError:
        return "not an image PIL can identify (wrong extension or corrupt header)"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def validate_images(records: ImageRecords, decode: bool = False, workers: int | None = None) -> None:
    """Check that every image of ``records`` is usable, reporting *all* bad ones at once.

    File paths must exist and open as images (PIL open + ``verify``, which reads the file but does
    not decode pixels; ``decode=True`` decodes fully and also catches truncated JPEGs). In-memory
    arrays must have an image shape and dtype. Files are checked on a thread pool: the work is
    I/O and zlib/CRC, which release the GIL.

    Args:
        records: the records to check.
        decode: decode every image completely (slower, stricter).
        workers: threads to use (default: 4 per CPU core, at most 32).

    Raises:
        DataError: listing up to 20 bad images with the reason, then "and N more", and the fix.
    """
    problems: list[tuple[str, str]] = []
    paths = [(i, os.fspath(it)) for i, it in enumerate(records.items) if not isinstance(it, np.ndarray)]
    for i, it in enumerate(records.items):
        if isinstance(it, np.ndarray):
            a = it[:, :, 0] if it.ndim == 3 and it.shape[2] == 1 else it
            if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or a.size == 0:
                problems.append((records.ids[i], f"array of shape {it.shape} is not an image"))
    if paths:
        n_workers = workers or min(32, 4 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            reasons = list(pool.map(lambda p: _check_file(p, decode), [p for _, p in paths], chunksize=16))
        for (i, path), reason in zip(paths, reasons):
            if reason is not None:
                problems.append((records.ids[i] + _path_note(records.ids[i], path), reason))
    if problems:
        lines = [f"  - {name}: {reason}" for name, reason in problems[:MAX_LISTED]]
        if len(problems) > MAX_LISTED:
            lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
        raise DataError(
            f"{len(problems)} of {len(records)} images in {records.source or 'the dataset'} are unusable:\n"
            + "\n".join(lines)
            + "\nFix: replace or delete these files (or remove their manifest rows); visiontune does not "
            "skip bad images silently."
        )


def _default_transform(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float CHW tensor in [0, 1] (used when no transform is given)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


class ImageDataset(torch.utils.data.Dataset):
    """A torch ``Dataset`` over :class:`ImageRecords`: ``(transform(rgb_image), label)``.

    Args:
        records: the images and labels.
        transform: applied to the RGB PIL image (e.g. the backbone's timm eval transform); None gives
            a float CHW tensor in [0, 1].
    """

    def __init__(self, records: ImageRecords, transform: Callable[[Image.Image], Any] | None = None):
        self.records = records
        self.transform = transform or _default_transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        r = self.records
        img = load_image(r.items[index], r.ids[index])
        return self.transform(img), int(r.labels[index])
