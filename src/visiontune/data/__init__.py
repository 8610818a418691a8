"""Datasets: image folders, CSV manifests and built-in datasets; stratified few-shot splits; decoding.

``load_records`` turns ``data.dataset`` into :class:`ImageRecords` (references + labels, every file
checked), ``make_splits`` cuts them into train / val / test, and :class:`ImageDataset` decodes them
for a ``DataLoader``. Importing this package registers the built-in datasets in ``DATASETS``.
"""

from visiontune.data import builtin as _builtin  # noqa: F401  (registers the built-in datasets)
from visiontune.data.builtin import read_idx
from visiontune.data.images import ImageDataset, ImageLimits, ImageTooLargeError, decode_image, load_image, validate_images
from visiontune.data.records import SPLIT_NAMES, ImageRecords
from visiontune.data.sources import IMAGE_EXTENSIONS, load_folder, load_manifest, load_records
from visiontune.data.splits import SplitConfig, SplitSpec, check_no_leak, describe_splits, make_splits

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLIT_NAMES",
    "ImageDataset",
    "ImageLimits",
    "ImageTooLargeError",
    "ImageRecords",
    "SplitConfig",
    "SplitSpec",
    "check_no_leak",
    "decode_image",
    "describe_splits",
    "load_folder",
    "load_image",
    "load_manifest",
    "load_records",
    "make_splits",
    "read_idx",
    "validate_images",
]
