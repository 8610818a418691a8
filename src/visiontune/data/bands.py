"""Multi-band (multispectral) images: reading ``.npy`` / ``.tif`` arrays, checking them, per-band statistics,
and the N-band transform.

With ``data.channels=N`` a dataset's files are arrays of N bands (``HxWxN`` or ``NxHxW``; a multi-page
TIFF with one page per band; any integer or float dtype) instead of photos. Every entry point reads them
through :func:`read_bands`: training, evaluation, ``visiontune predict``, the predictor API, the HTTP
service's uploads and ``visiontune pretrain``. It applies the same guards as :func:`~visiontune.data.
images.decode_image` does for photos: the size from the header first (:class:`~visiontune.data.images.
ImageLimits`, so a 100,000 x 100,000 array header is refused before any pixel is read), then the band
count, the dtype (integers and floats only: bool, complex, object or text arrays are refused), and NaN /
infinite values, each as a :class:`~visiontune.errors.DataError` naming the file and the fix. Nothing
user-supplied is unpickled (``np.load(allow_pickle=False)``).

Values are kept as they are stored (reflectance, digital numbers...) and normalised per band with a
mean and standard deviation (``data.band_mean`` / ``data.band_std``): by default computed from the
training split (:func:`band_statistics`) and written into the run's ``config.yaml``, so evaluation,
prediction, the service and the ONNX export normalise with the same numbers. ``data.bands`` selects
and orders bands (``[3, 2, 1]`` feeds Sentinel-2's red, green and blue to an RGB backbone).

Augmentation (:class:`BandTransform`) is geometric only (random resized crop, horizontal flip) as
TorchGeo does for multispectral data: colour jitter, grayscale or solarisation assume RGB photos.
The transforms are torchvision's; written here are the reader, the checks and the bookkeeping.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from visiontune.data.images import DEFAULT_LIMITS, MAX_LISTED, ImageDataset, ImageLimits, decode_image
from visiontune.errors import DataError

ARRAY_EXTENSIONS = (".npy", ".tif", ".tiff")
"""File types read as multi-band arrays when ``data.channels`` is set."""

MAX_STAT_FILES = 512
"""Training files read (a seeded subset beyond this) to compute the per-band statistics."""

_NPY_MAGIC = b"\x93NUMPY"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _tifffile() -> Any:
    try:
        import tifffile
    except ImportError as e:
        raise DataError(
            "reading .tif arrays needs the tifffile package: pip install 'visiontune[multispectral]' (or tifffile), "
            "or save the bands as .npy"
        ) from e
    return tifffile


def band_axis(shape: tuple[int, ...], channels: int) -> int | None:
    """0 for CxHxW, 2 for HxWxC, -1 for a single-band HxW; None when the shape does not fit."""
    if len(shape) == 2 and channels == 1:
        return -1
    if len(shape) == 3:
        if shape[2] == channels:
            return 2
        if shape[0] == channels:
            return 0
    return None


def _kind(item: Any) -> str:
    """``npy`` or ``tif`` for a path or encoded bytes (by extension, then by magic bytes)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        head = bytes(item[:8])
    else:
        low = os.fspath(item).lower()
        if low.endswith(".npy"):
            return "npy"
        if low.endswith((".tif", ".tiff")):
            return "tif"
        try:
            with open(item, "rb") as f:
                head = f.read(8)
        except OSError:
            head = b""
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head[:4] in _TIFF_MAGICS:
        return "tif"
    return "unknown"


def _pages_are_bands(tif: Any, channels: int) -> bool:
    """A multi-page TIFF whose pages tifffile did not group into one series: one 2-D page per band."""
    pages = tif.pages
    return (channels > 1 and len(tif.series) > 1 and len(pages) == channels
            and all(len(p.shape) == 2 and p.shape == pages[0].shape for p in pages))


def _open(item: Any) -> Any:
    return io.BytesIO(bytes(item)) if isinstance(item, (bytes, bytearray, memoryview)) else os.fspath(item)


def _header(item: Any, channels: int, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an array file or bytes, from its header only (no pixel data read)."""
    kind = _kind(item)
    if kind == "npy":
        src = _open(item)
        with open(src, "rb") if isinstance(src, str) else src as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)  # the header only; nothing unpickled
        return tuple(shape), np.dtype(dtype)
    if kind == "tif":
        with _tifffile().TiffFile(_open(item)) as tif:
            if _pages_are_bands(tif, channels):
                return (channels, *tif.pages[0].shape), np.dtype(tif.pages[0].dtype)
            return tuple(tif.series[0].shape), np.dtype(tif.series[0].dtype)
    raise DataError(f"{name} is neither a .npy nor a TIFF array; save the bands as {'/'.join(ARRAY_EXTENSIONS)}")


def _check_header(shape: tuple[int, ...], dtype: np.dtype, channels: int, name: str, limits: ImageLimits) -> int:
    """The band axis of a header that passes the dtype, band-count and size checks; DataError otherwise."""
    if dtype.kind not in "uif":
        raise DataError(f"{name} has dtype {dtype}; multi-band arrays must hold integers or floats. "
                        "Fix: re-export it as uint16 / int16 / float32 bands")
    axis = band_axis(shape, channels)
    if axis is None:
        raise DataError(f"{name} has shape {tuple(shape)}, with no axis of {channels} bands (expected HxWx{channels} or "
                        f"{channels}xHxW). Fix: re-export it, or set data.channels to its band count")
    h, w = (shape[0], shape[1]) if axis in (-1, 2) else (shape[1], shape[2])
    limits.check((w, h), name)
    return axis


def read_bands(item: Any, channels: int, name: str | None = None, limits: ImageLimits | None = None) -> np.ndarray:
    """One multi-band image as a ``[channels, H, W]`` array in its stored dtype, every check applied.

    Args:
        item: a ``.npy`` / ``.tif`` path, the file's bytes (an upload), or an in-memory array
            (``HxWxC`` or ``CxHxW``).
        channels: the band count it must have (``data.channels``).
        name: how errors name it (default: the path, or "array").
        limits: the size guard (default :data:`~visiontune.data.images.DEFAULT_LIMITS`).

    Raises:
        ImageTooLargeError: beyond ``limits``.
        DataError: unreadable, wrong band count, wrong dtype, NaN or infinite values; names the item.
    """
    limits = limits or DEFAULT_LIMITS
    if isinstance(item, np.ndarray):
        label = name or "in-memory array"
        a = item
        axis = _check_header(tuple(a.shape), a.dtype, channels, label, limits)
    else:
        if isinstance(item, (bytes, bytearray, memoryview)):
            label = name or "array bytes"
            if not item:
                raise DataError(f"{label} is empty (0 bytes); send the .npy or .tif file's contents")
        elif isinstance(item, (str, os.PathLike)):
            label = name or os.fspath(item)
            path = os.fspath(item)
            if not os.path.isfile(path):
                what = "does not exist" if not os.path.exists(path) else "is not a regular file"
                raise DataError(f"{label} {what} ({path}). Fix: restore the file or remove it from the dataset.")
        else:
            raise TypeError(f"cannot read a {type(item).__name__} as bands; pass a .npy/.tif path, its bytes or an array")
        try:
            shape, dtype = _header(item, channels, label)
            axis = _check_header(shape, dtype, channels, label, limits)
            a = _read_pixels(item, channels)
        except DataError:
            raise
        except Exception as exc:  # numpy / tifffile raise many types for corrupt files
            raise DataError(f"cannot read {label}: {type(exc).__name__}: {str(exc).rstrip('.')}. Fix: re-export the file.") from exc
        if tuple(a.shape) != tuple(shape):
            raise DataError(f"{label}: the data has shape {a.shape} but its header says {shape}; re-export the file")
    if axis == -1:
        a = a[None]
    elif axis == 2:
        a = np.moveaxis(a, 2, 0)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise DataError(f"{label} contains {bad} NaN or infinite value(s). Fix: fill the gaps (e.g. with 0 or the band's "
                        "median) or mask them out before training")
    return np.ascontiguousarray(a)


def _read_pixels(item: Any, channels: int) -> np.ndarray:
    if _kind(item) == "npy":
        return np.load(_open(item), allow_pickle=False)
    with _tifffile().TiffFile(_open(item)) as tif:
        if _pages_are_bands(tif, channels):
            return np.stack([p.asarray() for p in tif.pages])
        return tif.series[0].asarray()


def load_bands(item: Any, channels: int, name: str | None = None, limits: ImageLimits | None = None) -> torch.Tensor:
    """:func:`read_bands` as a float32 ``[channels, H, W]`` tensor."""
    return torch.from_numpy(read_bands(item, channels, name, limits).astype(np.float32, copy=False))


def check_arrays(
    files: Sequence[Any], channels: int, ids: Sequence[str] | None = None, limits: ImageLimits | None = None,
) -> None:
    """Check every array's band count, dtype and size from its header (no pixel data read); report all bad files.

    Raises:
        DataError: listing up to 20 bad files with the reason, and the fix.
    """
    limits = limits or DEFAULT_LIMITS
    problems = []
    for k, f in enumerate(files):
        label = ids[k] if ids is not None else os.fspath(f) if not isinstance(f, np.ndarray) else f"array {k}"
        try:
            if isinstance(f, np.ndarray):
                _check_header(tuple(f.shape), f.dtype, channels, label, limits)
            elif not os.path.isfile(f):
                problems.append(f"  - {label}: file does not exist")
                continue
            else:
                _check_header(*_header(f, channels, label), channels, label, limits)
        except DataError as e:
            if "tifffile" in str(e):
                raise
            problems.append(f"  - {e}")
        except Exception as e:  # numpy / tifffile raise many types for corrupt files
            problems.append(f"  - {label}: unreadable ({type(e).__name__}: {e})")
    if problems:
        more = [f"  ... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else []
        raise DataError(
            f"{len(problems)} of {len(files)} arrays are unusable with data.channels={channels}:\n"
            + "\n".join(problems[:MAX_LISTED] + more)
            + "\nFix: re-export them, or set data.channels to their band count; visiontune does not skip bad files."
        )


def band_statistics(
    items: Sequence[Any], channels: int, max_files: int = MAX_STAT_FILES, seed: int = 0,
    ids: Sequence[str] | None = None, limits: ImageLimits | None = None,
) -> tuple[list[float], list[float]]:
    """Per-band mean and std over every pixel of up to ``max_files`` arrays (a seeded subset beyond that)."""
    pick = np.sort(np.random.default_rng([seed, 11]).permutation(len(items))[:max_files])
    total = torch.zeros(channels, dtype=torch.float64)
    sq = torch.zeros(channels, dtype=torch.float64)
    n = 0
    for k in pick:
        x = torch.from_numpy(read_bands(items[k], channels, ids[k] if ids else None, limits)).double().flatten(1)
        total += x.sum(1)
        sq += (x * x).sum(1)
        n += x.shape[1]
    mean = total / max(n, 1)
    std = (sq / max(n, 1) - mean * mean).clamp(min=0).sqrt().clamp(min=1e-6)
    return mean.tolist(), std.tolist()


def band_config_problems(
    channels: int | None, band_mean: Sequence[float] | None, band_std: Sequence[float] | None,
    bands: Sequence[int] | None = None,
) -> list[str]:
    """Problems of the ``data.channels`` / ``data.bands`` / ``data.band_mean`` / ``data.band_std`` settings
    (fine-tuning and pretraining share them)."""
    out = []
    if channels is not None and channels < 1:
        out.append(f"data.channels={channels} must be >= 1 (or null for RGB images)")
    for key, v in (("band_mean", band_mean), ("band_std", band_std)):
        if v is None:
            continue
        if channels is None:
            out.append(f"data.{key} is set but data.channels is null; it only applies to multi-band arrays")
        elif len(v) != channels:
            out.append(f"data.{key} has {len(v)} values, data.channels={channels} needs one per band")
    if band_std is not None and any(s <= 0 for s in band_std):
        out.append("data.band_std values must be > 0")
    if bands is not None:
        if channels is None:
            out.append(f"data.bands={list(bands)} is set but data.channels is null; set data.channels to the files' "
                       "band count (e.g. data.channels=13 data.bands=[3,2,1])")
        elif not bands or any(not 0 <= b < channels for b in bands) or len(set(bands)) != len(bands):
            out.append(f"data.bands={list(bands)} must list distinct 0-based band indices in [0, {channels}) "
                       f"(data.channels={channels}), e.g. [3,2,1] for Sentinel-2's red, green, blue")
    return out


# ----------------------------------------------------------------------------- the N-band transform


@dataclass(frozen=True)
class BandSpec:
    """What a multi-band model's input is: the file's band count, the bands fed (in order), their statistics.

    Attributes:
        channels: bands per file (``data.channels``).
        bands: 0-based file bands fed to the model, in order (``data.bands``); None = all.
        mean: per-file-band mean (``channels`` values).
        std: per-file-band std.
    """

    channels: int
    bands: tuple[int, ...] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_chans(self) -> int:
        """Bands the model sees."""
        return len(self.bands) if self.bands is not None else self.channels

    def selected(self, values: Sequence[float]) -> list[float]:
        return [float(values[b]) for b in self.bands] if self.bands is not None else [float(v) for v in values]

    def to_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "bands": list(self.bands) if self.bands is not None else None,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BandSpec:
        bands = d.get("bands")
        return cls(int(d["channels"]), tuple(int(b) for b in bands) if bands is not None else None,
                   tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))


class SelectBands:
    """``[channels, H, W]`` -> the bands of ``bands`` in that order."""

    def __init__(self, bands: Sequence[int] | None):
        self.bands = list(bands) if bands is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.bands is None else x[self.bands]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bands={self.bands})"


class BandTransform:
    """A ``[channels, H, W]`` float tensor -> the normalised ``[in_chans, size, size]`` model input.

    Training: random resized crop (area ``crop_scale``..1) and horizontal flip; evaluation: resize the
    shorter side to ``size / crop_pct`` and centre-crop ``size`` (the RGB eval path's geometry). Then per-band
    normalisation with the selected bands' statistics.

    Args:
        spec: band count, selection and statistics.
        size: output side.
        train: random augmentation (else deterministic).
        crop_scale: smallest area a training crop keeps.
        interpolation: ``bilinear`` / ``bicubic`` / ``nearest`` (the backbone's).
        crop_pct: eval centre-crop fraction (the backbone's).
    """

    def __init__(self, spec: BandSpec, size: int, train: bool = False, crop_scale: float = 0.5,
                 interpolation: str = "bilinear", crop_pct: float | None = 1.0):
        from torchvision.transforms import v2 as T

        self.spec = spec
        self.size = int(size)
        self.train = train
        mode = {"bicubic": T.InterpolationMode.BICUBIC, "nearest": T.InterpolationMode.NEAREST}.get(
            str(interpolation), T.InterpolationMode.BILINEAR)
        if train:
            geometric: list[Any] = [T.RandomResizedCrop(self.size, scale=(crop_scale, 1.0), interpolation=mode, antialias=True),
                                    T.RandomHorizontalFlip()]
        else:
            resize = int(np.floor(self.size / float(crop_pct or 1.0)))
            geometric = [T.Resize(resize, interpolation=mode, antialias=True), T.CenterCrop(self.size)]
        self.transforms = [SelectBands(spec.bands), *geometric,
                           T.Normalize(spec.selected(spec.mean), spec.selected(spec.std))]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t(x)
        return x

    def decode(self, item: Any, name: str | None = None, limits: ImageLimits | None = None) -> torch.Tensor:
        """Read one input (path, bytes or array) for this transform: :func:`load_bands` with the spec's band count."""
        return load_bands(item, self.spec.channels, name, limits)

    def blank(self) -> torch.Tensor:
        """A small all-zero input (to ask the transform its output shape)."""
        return torch.zeros(self.spec.channels, 8, 8)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(t) for t in self.transforms)})"


def decode_for(transform: Any, item: Any, name: str | None = None, limits: ImageLimits | None = None) -> Any:
    """Decode ``item`` into what ``transform`` takes: bands for a :class:`BandTransform`, else an RGB image.

    The one switch between photos and multi-band arrays for the predictor, ``visiontune predict`` and the
    HTTP service (uploads of ``.npy`` / ``.tif`` arrays go through the same size guard as photos).
    """
    if isinstance(transform, BandTransform):
        return transform.decode(item, name, limits)
    return decode_image(item, name, limits)


def input_channels(preprocessing: Any) -> int | None:
    """Channels a model input has under an export's ``preprocessing`` record: 3 for photos, the bands fed for
    multi-band data; None when its ``bands`` entry is malformed."""
    bands = preprocessing.get("bands") if isinstance(preprocessing, dict) else None
    if bands is None:
        return 3
    try:
        spec = BandSpec.from_dict(bands)
    except (KeyError, TypeError, ValueError):
        return None
    ok = (spec.channels >= 1 and len(spec.mean) == len(spec.std) == spec.channels and all(s > 0 for s in spec.std)
          and (spec.bands is None or all(0 <= b < spec.channels for b in spec.bands)))
    return spec.in_chans if ok else None


def transform_channels(transform: Any) -> int | None:
    """The file band count a transform reads (None: photos)."""
    return transform.spec.channels if isinstance(transform, BandTransform) else None


def blank_input(transform: Any) -> Any:
    """A tiny input ``transform`` accepts (to read its output shape): zeros of its bands, or an 8x8 RGB image."""
    return transform.blank() if isinstance(transform, BandTransform) else Image.new("RGB", (8, 8))


class BandDataset(torch.utils.data.Dataset):
    """``(transform(bands), label)`` over multi-band records; arrays kept in memory (stored dtype) when ``cache``.

    Args:
        records: :class:`~visiontune.data.ImageRecords` with ``channels`` set.
        transform: a :class:`BandTransform`.
        cache: keep each array after its first read (training and validation splits are read every epoch).
        limits: the size guard.
    """

    def __init__(self, records: Any, transform: Any, cache: bool = False, limits: ImageLimits | None = None):
        if records.channels is None:
            raise ValueError("BandDataset needs multi-band records (records.channels set)")
        self.records = records
        self.transform = transform
        self.limits = limits
        self.arrays: list[np.ndarray | None] | None = [None] * len(records) if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        r = self.records
        a = self.arrays[index] if self.arrays is not None else None
        if a is None:
            a = read_bands(r.items[index], int(r.channels), r.ids[index], self.limits)
            if self.arrays is not None:
                self.arrays[index] = a
        return self.transform(torch.from_numpy(a.astype(np.float32, copy=False))), int(r.labels[index])


def records_dataset(records: Any, transform: Any, limits: ImageLimits | None = None) -> torch.utils.data.Dataset:
    """A read-once dataset over ``records``: :class:`~visiontune.data.ImageDataset` for photos, an uncached
    :class:`BandDataset` for multi-band arrays (evaluation, export checks)."""
    if records.channels is None:
        return ImageDataset(records, transform, limits)
    return BandDataset(records, transform, False, limits)
