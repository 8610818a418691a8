"""Decoding images to RGB, checking that every file of a dataset is usable, and the torch ``Dataset``.

All decoding goes through :func:`decode_image` (training, evaluation, ``visiontune predict``, the
predictor API and the HTTP service alike), so every entry point sees the same pixels for the same file
and has the same guard against hostile or broken files:

* **size, from the header, before any pixel is decoded** (PIL's ``Image.open`` is lazy). A 140 KB PNG
  can claim 12,000 x 12,000 pixels (under PIL's own bomb limit) and cost gigabytes to decode, and a
  1 x 60,000 strip makes the resize to the network's input (shorter side -> e.g. 256 px) allocate
  billions of pixels. So images above :class:`ImageLimits` ``max_pixels`` or ``max_aspect`` are refused
  with :class:`ImageTooLargeError`, which names the limit and the setting that raises it. A JPEG (or
  JPEG 2000) above the pixel limit is first decoded reduced (1/2, 1/4 or 1/8 scale, which those codecs
  do natively and cheaply) and only refused if even that does not fit; images within the limits are
  never reduced, so they decode to exactly the pixels they always did.
* **any decoder failure is that file's error**: PIL plugins raise more than ``OSError`` (a fuzzed DDS
  raises ``NotImplementedError``), so every exception of the decoder becomes a :class:`DataError`
  naming the file; callers that skip bad inputs (predict, the service) then skip only that one.

Pixels: EXIF orientation applied, grayscale / palette / CMYK converted to RGB, transparency
composited onto white (as a browser shows it), and 16-bit or float images scaled to 8 bits (PIL's
own ``convert("RGB")`` would clip 16-bit values at 255 and turn most of such an image white).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from visiontune.data.records import ImageRecords
from visiontune.errors import ConfigError, DataError

MAX_LISTED = 20
"""How many bad files an error lists before summarising the rest as "and N more"."""

DEFAULT_MAX_PIXELS = 40_000_000
"""Default largest decoded image (width x height): 40 MP covers 8K frames and most camera photos
(JPEGs beyond it are decoded at reduced scale anyway); one such RGB image is ~120 MB decoded."""

DEFAULT_MAX_ASPECT = 20.0
"""Default largest ratio of an image's longer to its shorter side. The eval transform resizes the
shorter side to about the network's input size, so the resized image has ``aspect x size^2`` pixels:
a 1 x 60,000 strip at a 256 px resize would be 15 million pixels wide (12 GB as RGB floats)."""

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, np.ndarray, Image.Image]
"""What :func:`decode_image` accepts: a file path, encoded file bytes, a uint8 array or a PIL image."""


class ImageTooLargeError(DataError):
    """An image exceeds :class:`ImageLimits` (too many pixels, or too elongated); the HTTP service answers 413."""


@dataclass(frozen=True)
class ImageLimits:
    """How large an image :func:`decode_image` agrees to decode, and how the user raises the limits.

    Args:
        max_pixels: most pixels (width x height) decoded per image.
        max_aspect: largest longer-side / shorter-side ratio.
        pixels_setting: how the caller's user raises ``max_pixels`` (``--max-pixels``,
            ``data.max_pixels`` ...), named in the error so the message says the fix.
        aspect_setting: the same for ``max_aspect``.

    Raises:
        ConfigError: a limit below 1, naming the setting.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = DEFAULT_MAX_ASPECT
    pixels_setting: str = "max_pixels"
    aspect_setting: str = "max_aspect"

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, (int, np.integer)) or self.max_pixels < 1:
            problems.append(f"{self.pixels_setting}={self.max_pixels!r} is invalid; use an integer >= 1 "
                            f"(default {DEFAULT_MAX_PIXELS:,})")
        if isinstance(self.max_aspect, bool) or not isinstance(self.max_aspect, (int, float)) or not self.max_aspect >= 1:
            problems.append(f"{self.aspect_setting}={self.max_aspect!r} is invalid; "
                            f"use a number >= 1 (default {DEFAULT_MAX_ASPECT:g})")
        if problems:
            raise ConfigError(problems)

    def check(self, size: tuple[int, int], name: str) -> None:
        """Refuse an image of ``size`` (width, height) beyond the limits.

        Raises:
            ImageTooLargeError: naming the image, its size, the limit and the setting.
        """
        w, h = int(size[0]), int(size[1])
        if w < 1 or h < 1:
            raise DataError(f"{name} has size {w} x {h}; an image needs at least one pixel. Re-export the image.")
        aspect = max(w, h) / min(w, h)
        if aspect > self.max_aspect:
            raise ImageTooLargeError(
                f"{name} is {w} x {h} pixels, an aspect ratio of {aspect:.4g}:1, beyond the limit of "
                f"{self.max_aspect:g}:1 ({self.aspect_setting}): resizing it to the network's input would take "
                f"about {aspect:.0f} times the memory of a square image. Crop it into pieces, or raise "
                f"{self.aspect_setting} if such images are expected"
            )
        if w * h > self.max_pixels:
            raise ImageTooLargeError(
                f"{name} is {w} x {h} = {w * h:,} pixels, over the limit of {self.max_pixels:,} decoded pixels "
                f"({self.pixels_setting}). Downscale the image, "
                f"or raise {self.pixels_setting} if such images are expected"
            )


DEFAULT_LIMITS = ImageLimits()


def decode_image(
    item: ImageSource, name: str | None = None, limits: ImageLimits | None = None, *, keep_gray: bool = False,
    smallest: bool = False,
) -> Image.Image:
    """Decode one image into an 8-bit RGB PIL image, guarded by ``limits`` (see the module docstring).

    The one decoding function of visiontune: datasets, the predictor, ``predict`` and the service call
    it, so the size guard and the "one bad file is that file's error" rule hold everywhere.

    Args:
        item: a file path, encoded file bytes, an in-memory image array (HxW, HxWx1, HxWx3 or HxWx4;
            8/16-bit, bool or float) or a PIL image.
        name: how errors name the image (defaults to the path, or "image").
        limits: the size guard (default :data:`DEFAULT_LIMITS`).
        keep_gray: return plain 8-bit gray images as ``L`` rather than RGB (the decoded-image cache
            stores them with one channel; replicating the bands gives exactly the RGB result).
        smallest: decode a JPEG at 1/8 scale (the up-front dataset check: every byte of the file is
            still parsed, so truncation and corruption are found, at a fraction of the cost).

    Raises:
        ImageTooLargeError: the image exceeds ``limits``.
        DataError: missing file, empty data, not an image, or any decoder failure; names the image.
        TypeError: an unsupported input type.
    """
    limits = limits or DEFAULT_LIMITS
    if isinstance(item, np.ndarray):
        return _checked_array(item, name or "in-memory image", limits, keep_gray)
    if isinstance(item, Image.Image):
        label = name or "image"
        limits.check(item.size, f"image {label}")
        try:
            return to_rgb(item) if not (keep_gray and item.mode == "L") else _loaded(item)
        except DataError:
            raise
        except Exception as exc:  # any decoder failure is this image's error
            raise DataError(f"cannot decode image {label}: {type(exc).__name__}: {exc}. Fix: re-export the image.") from exc
    if isinstance(item, (bytes, bytearray, memoryview)):
        label = name or "image bytes"
        if not item:
            raise DataError(f"{label} is empty (0 bytes); send the image file's contents")
        source: Any = io.BytesIO(bytes(item))
        where = label
    elif isinstance(item, (str, os.PathLike)):
        source = os.fspath(item)
        label = name or source
        where = f"image {label}"
        if os.path.exists(source) and not os.path.isfile(source):
            # A FIFO, socket or device named x.png: opening it would block forever or read without end.
            raise DataError(f"image {label} is not a regular file ({source}); pass image files only")
    else:
        raise TypeError(
            f"cannot decode a {type(item).__name__}; pass a file path, encoded image bytes, a PIL image or a "
            "uint8 numpy array (HxW or HxWxC)"
        )
    try:
        with Image.open(source) as img:
            reduced = _reduce_to_fit(img, limits, smallest)
            limits.check(img.size, where + reduced)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _loaded(img) if keep_gray and img.mode == "L" else to_rgb(img)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"image {label} does not exist ({source}). Fix: restore the file or remove it from the dataset.") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            f"{where} is beyond PIL's own decompression-bomb limit ({exc}), which applies whatever "
            f"{limits.pixels_setting} says; downscale the image"
        ) from exc
    except Exception as exc:  # PIL plugins raise many types; each is this image's problem
        raise _decode_error(exc, item, label, source) from exc


def _decode_error(exc: Exception, item: Any, label: str, source: Any) -> DataError:
    """The DataError for a decoder failure: names the image, what the decoder said, and the fix."""
    # OSError-family messages already read as a reason ("image file is truncated"); other types
    # (NotImplementedError from a fuzzed DDS, struct.error ...) keep their name so the cause is clear.
    said = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
    if isinstance(item, (bytes, bytearray, memoryview)):
        if isinstance(exc, UnidentifiedImageError):
            return DataError(f"{label} is not an image PIL can decode ({len(item)} bytes starting {bytes(item[:8])!r}); "
                             "send a PNG, JPEG, BMP, TIFF, WebP or GIF file")
        return DataError(f"cannot decode {label}: {said}; re-export the image")
    return DataError(f"cannot decode image {label}{_path_note(label, source)}: {said}. "
                     "Fix: re-export or delete the file (or remove its manifest row).")


def _loaded(img: Image.Image) -> Image.Image:
    img.load()
    return img


def _reduce_to_fit(img: Image.Image, limits: ImageLimits, smallest: bool) -> str:
    """Ask the JPEG / JPEG 2000 decoder for a reduced scale when the full image is over the pixel limit.

    Images within the limit are left alone, so their pixels never change. ``smallest`` asks for the
    smallest JPEG scale (1/8) regardless: the caller only wants to know that the file decodes.

    Returns:
        A note for error messages (" (decoded at 1/8 scale)"), or "" when nothing was reduced.
    """
    w, h = img.size
    if w < 1 or h < 1 or (w * h <= limits.max_pixels and not smallest):
        return ""
    if img.format == "JPEG":
        for s in (2, 4, 8):
            if s == 8 or (not smallest and -(-w // s) * -(-h // s) <= limits.max_pixels):
                # draft picks the largest scale whose result is at least the requested size.
                img.draft(None, (max(1, w // s), max(1, h // s)))
                return f" (decoded at 1/{s} scale)" if img.size != (w, h) else ""
    elif img.format == "JPEG2000" and not smallest:
        for k in range(1, 6):  # 2^k reduction; codestreams have 6 resolution levels by default
            if -(-w >> k) * -(-h >> k) <= limits.max_pixels:
                img.reduce = k  # type: ignore[assignment,method-assign]
                img.load()  # applies the reduction (and sets the reduced size)
                return f" (decoded at 1/{1 << k} scale)"
    return ""


def load_image(item: str | os.PathLike[str] | np.ndarray, id: str | None = None, limits: ImageLimits | None = None) -> Image.Image:
    """Decode one dataset image (a path or an array) into 8-bit RGB: :func:`decode_image` with a dataset's wording.

    Args:
        item: a file path, or an in-memory image (HxW, HxWx1, HxWx3 or HxWx4).
        id: the human-readable id used in error messages (defaults to the path).
        limits: the size guard (default :data:`DEFAULT_LIMITS`).

    Raises:
        DataError: the file is missing or cannot be decoded, exceeds ``limits``, or the array has an
            unusable shape / dtype; the message names the image and the fix.
    """
    return decode_image(item, id, limits)


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


class ToRGB:
    """Convert any PIL image to 8-bit RGB so every backbone sees 3 channels.

    The same conversion as dataset loading (:func:`to_rgb`: gray replicated,
    16-bit scaled rather than clipped, transparency composited), so a PIL image handed straight to a
    transform is preprocessed exactly as one read from disk.
    """

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_rgb(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _checked_array(arr: np.ndarray, name: str, limits: ImageLimits, keep_gray: bool) -> Image.Image:
    """An in-memory image through the same size guard as files, then to RGB (or ``L`` with ``keep_gray``)."""
    a = np.asarray(arr)
    if a.ndim in (2, 3) and a.size:
        limits.check((a.shape[1], a.shape[0]), f"image {name}")
    if keep_gray and a.dtype == np.uint8 and a.ndim == 2 and a.size:
        return Image.fromarray(np.ascontiguousarray(a), mode="L")
    return _array_to_rgb(a, name)


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


def _check_file(path: str, decode: bool, limits: ImageLimits) -> str | None:
    """The reason ``path`` is unusable, or None when it is a readable image within ``limits``."""
    if not os.path.isfile(path):
        return "file does not exist" if not os.path.exists(path) else "not a regular file"
    if os.path.getsize(path) == 0:
        return "file is empty (0 bytes)"
    try:
        if decode:
            decode_image(path, limits=limits, smallest=True)
        else:
            with Image.open(path) as img:
                limits.check(img.size, f"image {path}")
                # verify() checks structure and checksums without decoding pixels; it leaves the
                # image unusable, which is fine because the handle is discarded.
                img.verify()
    except ImageTooLargeError as exc:
        return str(exc)
    except Exception as exc:  # any failure of one file is that file's problem
        cause = (exc.__cause__ or exc.__context__) if isinstance(exc, DataError) else exc
        if isinstance(cause, UnidentifiedImageError) or isinstance(exc, UnidentifiedImageError):
            return "not an image PIL can identify (wrong extension or corrupt header)"
        if cause is None:
            return str(exc)
        return f"{type(cause).__name__}: {cause}"
    return None


def validate_images(
    records: ImageRecords, decode: bool = True, workers: int | None = None, limits: ImageLimits | None = None,
) -> None:
    """Check that every image of ``records`` is usable, reporting *all* bad ones at once.

    File paths must exist and decode through :func:`decode_image` within ``limits``. The decode is
    complete but cheap: a JPEG is decoded at 1/8 scale, which still parses every byte, so a file
    missing its last bytes is found here rather than in the test pass after all epochs.
    ``decode=False`` only reads headers and structure (PIL ``verify``: faster, misses truncation).
    In-memory arrays must have an image shape and dtype and fit ``limits``. Files are checked on a
    thread pool: decoding, I/O and zlib release the GIL.

    Args:
        records: the records to check.
        decode: decode every image (default; see above).
        workers: threads to use (default: 4 per CPU core, at most 32).
        limits: the size guard the images must pass (default :data:`DEFAULT_LIMITS`).

    Raises:
        DataError: listing up to 20 bad images with the reason, then "and N more", and the fix.
    """
    limits = limits or DEFAULT_LIMITS
    problems: list[tuple[str, str]] = []
    paths = [(i, os.fspath(it)) for i, it in enumerate(records.items) if not isinstance(it, np.ndarray)]
    for i, it in enumerate(records.items):
        if isinstance(it, np.ndarray):
            a = it[:, :, 0] if it.ndim == 3 and it.shape[2] == 1 else it
            if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or a.size == 0:
                problems.append((records.ids[i], f"array of shape {it.shape} is not an image"))
                continue
            try:
                limits.check((a.shape[1], a.shape[0]), f"image {records.ids[i]}")
            except ImageTooLargeError as exc:
                problems.append((records.ids[i], str(exc)))
    if paths:
        n_workers = workers or min(32, 4 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            reasons = list(pool.map(lambda p: _check_file(p, decode, limits), [p for _, p in paths], chunksize=16))
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
        limits: the decoding size guard (default :data:`DEFAULT_LIMITS`).
    """

    def __init__(
        self, records: ImageRecords, transform: Callable[[Image.Image], Any] | None = None, limits: ImageLimits | None = None,
    ):
        self.records = records
        self.transform = transform or _default_transform
        self.limits = limits or DEFAULT_LIMITS

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        r = self.records
        img = decode_image(r.items[index], r.ids[index], self.limits)
        return self.transform(img), int(r.labels[index])
