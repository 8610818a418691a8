"""Built-in datasets, registered in ``visiontune.registry.DATASETS`` by name.

Each is a function ``(root) -> ImageRecords``; ``root`` (``data.root``) points at the dataset's files
when they are not in the default place. All three work offline:

- ``digits``: scikit-learn's 1,797 8x8 handwritten digits (ships with scikit-learn).
- ``elpv``: 2,624 300x300 electroluminescence images of solar cells with a defect probability
  (pip package ``elpv-dataset``; data CC BY-NC-SA 4.0). Real industrial inspection data.
- ``fashion-mnist``: 70,000 28x28 clothing images with the official 60k/10k train/test split
  (Debian package ``dataset-fashion-mnist``, or the four IDX files anywhere via ``data.root``).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct

import numpy as np

from visiontune.data.records import ImageRecords
from visiontune.errors import ConfigError, DataError
from visiontune.registry import DATASETS

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where the Debian package ``dataset-fashion-mnist`` installs the IDX files."""

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

ELPV_CLASSES = ["functional", "possibly-defective", "likely-defective", "defective"]
"""ELPV's defect probabilities 0, 1/3, 2/3 and 1, in that order."""

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); multi-byte values are big-endian.
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _no_root(name: str, root: str | None) -> None:
    if root is not None:
        raise ConfigError(f"data.root={root!r} is set, but the {name!r} dataset ships inside a Python package "
                          f"and takes no root; remove data.root")


@DATASETS.register("digits")
def digits(root: str | None = None) -> ImageRecords:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), scaled to uint8 0..255."""
    _no_root("digits", root)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are counts 0..16 of an original 4x4 block; scale them to the 8-bit range images use.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return ImageRecords(
        items=list(images), labels=bunch.target.astype(np.int64), ids=[f"digits:{i}" for i in range(len(images))],
        classes=[str(c) for c in bunch.target_names], splits=None, source="digits (scikit-learn load_digits)",
    )


@DATASETS.register("elpv")
def elpv(root: str | None = None) -> ImageRecords:
    """ELPV solar-cell defects: 2,624 electroluminescence images, 4 defect-probability classes.

    Images stay files (decoded lazily) rather than going through ``elpv_dataset.utils.load_dataset()``,
    which decodes all 2,624 images up front (about 7 s and 236 MB); the labels come from the same
    ``labels.csv`` that function reads (``images/cellNNNN.png  probability  type``). Ids keep the cell
    type (mono / poly), e.g. ``elpv:cell0001.png:mono``.

    Args:
        root: a folder holding ``labels.csv`` and ``images/`` (a clone of the ELPV repository's data);
            default: the installed ``elpv-dataset`` package.
    """
    if root is None:
        spec = importlib.util.find_spec("elpv_dataset")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("the 'elpv' dataset needs the pip package elpv-dataset. Fix: pip install elpv-dataset "
                            "(or set data.root to a folder with labels.csv and images/).")
        folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    else:
        folder = os.path.expanduser(root)
    labels_csv = os.path.join(folder, "labels.csv")
    if not os.path.isfile(labels_csv):
        raise DataError(f"ELPV labels file {labels_csv} not found. Fix: pip install elpv-dataset, or set data.root "
                        f"to a folder with labels.csv and images/.")
    items: list[str | np.ndarray] = []
    labels: list[int] = []
    ids: list[str] = []
    with open(labels_csv, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                rel, prob, cell_type = fields[0], float(fields[1]), fields[2]
            except (IndexError, ValueError):
                raise DataError(f"{labels_csv} line {line_no}: expected 'path probability type', got {line.strip()!r}") from None
            k = round(prob * 3)
            if not (0 <= k <= 3 and abs(prob * 3 - k) < 1e-3):
                raise DataError(f"{labels_csv} line {line_no}: defect probability {prob} is not 0, 1/3, 2/3 or 1")
            items.append(os.path.join(os.path.abspath(folder), rel))
            labels.append(k)
            ids.append(f"elpv:{os.path.basename(rel)}:{cell_type}")
    missing = [p for p in items[:: max(1, len(items) // 16)] if isinstance(p, str) and not os.path.isfile(p)]
    if missing:
        # A spot check: a broken install or wrong root misses all images, not one.
        raise DataError(f"ELPV images listed in {labels_csv} are missing (e.g. {missing[0]}). Fix: reinstall "
                        f"elpv-dataset or point data.root at a complete copy.")
    return ImageRecords(items=items, labels=np.array(labels, dtype=np.int64), ids=ids, classes=list(ELPV_CLASSES),
                        splits=None, source=f"elpv ({folder})")


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzip-compressed when the name ends in ``.gz``.

    Raises:
        DataError: unreadable file, bad magic number or type code, or a size that does not match the header.
    """
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}. Fix: re-download or reinstall the dataset files.") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (header bytes {data[:4].hex()}). Fix: use the original "
                        f"*-idx*-ubyte(.gz) files.")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file {path} is truncated inside its header. Fix: re-download it.")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != count * dtype.itemsize:
        raise DataError(f"IDX file {path}: header says shape {dims} ({count * dtype.itemsize} bytes) but the file "
                        f"holds {len(data) - header} bytes of data. Fix: re-download it.")
    return np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)


def _idx_path(folder: str, name: str) -> str | None:
    """The file ``name`` in ``folder``, or its uncompressed twin (without ``.gz``), or None."""
    for candidate in (name, name[: -len(".gz")]):
        p = os.path.join(folder, candidate)
        if os.path.isfile(p):
            return p
    return None


@DATASETS.register("fashion-mnist")
def fashion_mnist(root: str | None = None) -> ImageRecords:
    """Fashion-MNIST: 70,000 28x28 grayscale clothing images, 10 classes, official 60k/10k split.

    Args:
        root: folder with the four IDX files (``train-images-idx3-ubyte.gz`` ...; uncompressed
            copies work too); default ``/usr/share/datasets/fashion-mnist``.
    """
    folder = os.path.expanduser(root) if root is not None else FASHION_MNIST_DIR
    paths = {s: tuple(_idx_path(folder, n) for n in names) for s, names in FASHION_MNIST_FILES.items()}
    missing = [n for s, names in FASHION_MNIST_FILES.items() for n, p in zip(names, paths[s]) if p is None]
    if missing:
        raise DataError(
            f"Fashion-MNIST files missing in {folder}: {', '.join(missing)}. Fix: `apt-get install "
            f"dataset-fashion-mnist` (Debian/Ubuntu, installs to {FASHION_MNIST_DIR}) or set data.root to a folder "
            f"with the four IDX files."
        )
    items: list[str | np.ndarray] = []
    labels: list[np.ndarray] = []
    ids: list[str] = []
    splits: list[str] = []
    for split, (img_path, lbl_path) in paths.items():
        images, lbls = read_idx(str(img_path)), read_idx(str(lbl_path))
        if images.ndim != 3 or lbls.ndim != 1 or len(images) != len(lbls) or images.dtype != np.uint8:
            raise DataError(f"Fashion-MNIST {split} files disagree: images {images.shape} {images.dtype} in {img_path}, "
                            f"labels {lbls.shape} in {lbl_path}. Fix: reinstall the dataset files.")
        if len(lbls) and int(lbls.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{lbl_path}: label {int(lbls.max())} is outside 0..9. Fix: reinstall the dataset files.")
        items.extend(images)
        labels.append(lbls.astype(np.int64))
        ids.extend(f"fashion-mnist:{split}:{i}" for i in range(len(lbls)))
        splits.extend([split] * len(lbls))
    return ImageRecords(items=items, labels=np.concatenate(labels), ids=ids, classes=list(FASHION_MNIST_CLASSES),
                        splits=splits, source=f"fashion-mnist ({folder})")
