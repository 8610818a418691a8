"""Turning ``data.dataset`` (a built-in name, an image folder or a CSV manifest) into ImageRecords.

Class order, for folders and manifests alike, is the sorted set of class names (numerically when every
name is an integer, so "10" follows "9"), like torchvision's ``ImageFolder``: it does not depend on
the order files were listed or rows were written. A run stores this order in ``labels.json``; pass it
back as ``classes`` to evaluate on new data with the same label indices.

Every file a folder or manifest names is checked before training starts (:func:`validate_images`),
and all problems are reported together: nothing is skipped silently.
"""

from __future__ import annotations

import csv
import difflib
import os
from typing import Sequence, TextIO

import numpy as np

from visiontune.data.bands import ARRAY_EXTENSIONS, check_arrays
from visiontune.data.images import MAX_LISTED, ImageLimits, validate_images
from visiontune.data.records import SPLIT_NAMES, ImageRecords, sort_labels
from visiontune.errors import ConfigError, DataError
from visiontune.registry import DATASETS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
"""File extensions (case-insensitive) an image folder's files must have to count as images."""

SPLIT_ALIASES = {"train": "train", "val": "val", "test": "test", "valid": "val", "validation": "val"}
"""Accepted spellings of a manifest's split column (case-insensitive)."""

MANIFEST_COLUMNS = ("path", "label")
"""Required manifest columns; ``split`` is optional and further columns are ignored."""


def load_records(
    dataset: str, root: str | None = None, classes: Sequence[str] | None = None, limits: ImageLimits | None = None,
    channels: int | None = None,
) -> ImageRecords:
    """Load a dataset's image references and labels (no image is decoded, every file is checked).

    Args:
        dataset: a built-in name (``visiontune list datasets``), a folder with one subfolder per
            class (searched recursively for image files; hidden files and folders ignored), or a
            CSV manifest with header ``path,label[,split]`` (paths relative to the CSV's folder).
            A built-in name wins over a folder of the same name; write ``./name`` for the folder.
        root: for a built-in dataset, the folder holding its files (overrides the default); for a
            manifest, the folder relative paths start from. Not used with an image folder.
        classes: fix the class list and order (e.g. a trained run's ``labels.json``); a label
            outside it is an error. Classes without images are allowed.
        limits: the decoding size guard every file must pass (``data.max_pixels`` / ``data.max_aspect``).
        channels: None for photos; N (``data.channels``) for multi-band ``.npy`` / ``.tif`` arrays of N bands
            (a folder or manifest; every file's band count, dtype and size checked from its header).

    Raises:
        DataError: unknown dataset, empty or malformed folder / manifest, unreadable images.
        ConfigError: ``root`` given with an image folder, or a ``classes`` list with duplicates.
    """
    if classes is not None:
        classes = [str(c) for c in classes]
        dupes = sorted({c for c in classes if classes.count(c) > 1})
        if dupes or not classes:
            raise ConfigError(f"the class list {classes} is empty or repeats {dupes}; give each class once")
    if not dataset:
        raise ConfigError(f"data.dataset is empty; set it to a built-in name ({', '.join(DATASETS.names())}), "
                          "an image folder or a CSV manifest")
    if dataset in DATASETS and "/" not in dataset and os.sep not in dataset:
        if channels is not None:
            raise ConfigError(
                f"data.channels={channels} reads multi-band arrays, but data.dataset={dataset!r} is a built-in dataset "
                f"of photos; point data.dataset at a folder or CSV manifest of {'/'.join(ARRAY_EXTENSIONS)} files, or "
                "set data.channels=null"
            )
        records = DATASETS.get(dataset)(root)
        if classes is not None:
            records = records.with_classes(classes)
    else:
        path = os.path.expanduser(dataset)
        if os.path.isdir(path):
            if root is not None:
                raise ConfigError(
                    f"data.root={root!r} is set but data.dataset={dataset!r} is an image folder, which needs no "
                    f"root; remove data.root"
                )
            records = load_folder(path, classes, limits, channels)
        elif os.path.isfile(path):
            if not path.lower().endswith(".csv"):
                raise DataError(
                    f"data.dataset={dataset!r} is a file but not a CSV manifest (.csv). Fix: point it at a "
                    f"folder with one subfolder per class, or at a CSV with header 'path,label[,split]'."
                )
            records = load_manifest(path, base=root, classes=classes, limits=limits, channels=channels)
        else:
            close = difflib.get_close_matches(dataset, DATASETS.names(), n=2)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise DataError(
                f"data.dataset={dataset!r} is neither a built-in dataset, an existing folder nor a CSV file "
                f"(resolved to {os.path.abspath(path)}).{hint} Built-in datasets: {', '.join(DATASETS.names())}."
            )
    if len(records) == 0:
        raise DataError(f"{records.source} contains no images. Fix: add images, or check data.dataset.")
    return records


def load_folder(
    path: str, classes: Sequence[str] | None = None, limits: ImageLimits | None = None, channels: int | None = None,
) -> ImageRecords:
    """Records from ``path/<class>/**/<image>``; class order = sorted subfolder names (see module doc).

    With ``channels``, the files are ``.npy`` / ``.tif`` arrays of that many bands instead of images.

    Raises:
        DataError: no class subfolders, empty class folders, a folder not in ``classes``, bad images.
    """
    root = os.path.abspath(path)
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    extensions = IMAGE_EXTENSIONS if channels is None else ARRAY_EXTENSIONS
    if not subdirs:
        loose = [e.name for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(extensions)]
        found = f"it holds {len(loose)} image files directly" if loose else "it is empty or holds no folders"
        raise DataError(
            f"image folder {path} has no class subfolders ({found}). Fix: put the images in one subfolder "
            f"per class ({os.path.join(path, '<class>', '<image>.png')}), or describe them in a CSV manifest."
        )
    if classes is not None:
        unknown = [d for d in subdirs if d not in classes]
        if unknown:
            raise DataError(
                f"image folder {path}: class folder(s) {unknown} are not among the known labels {list(classes)}. "
                f"Fix: rename or remove those folders, or use data that matches the trained classes."
            )
        class_names = list(classes)
    else:
        class_names = sort_labels(subdirs)
    items: list[str | np.ndarray] = []
    ids: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for name in sort_labels(subdirs):
        files, ignored = _list_images(os.path.join(root, name), extensions)
        if not files:
            note = f" ({ignored} non-image files ignored)" if ignored else ""
            empty.append(os.path.join(path, name) + note)
        items.extend(os.path.join(root, name, f) for f in files)
        ids.extend(os.path.join(path, name, f) for f in files)
        labels.extend([class_names.index(name)] * len(files))
    if empty:
        raise DataError(
            f"image folder {path}: class folder(s) without {'images' if channels is None else 'arrays'}: "
            f"{', '.join(empty)}. Fix: add files ({'/'.join(e.lstrip('.') for e in extensions)}) or remove the folder"
            + ("; for multi-band .npy/.tif arrays set data.channels to their band count." if channels is None else ".")
        )
    records = ImageRecords(
        items=items, labels=np.array(labels, dtype=np.int64), ids=ids, classes=class_names,
        splits=None, source=f"{'image' if channels is None else f'{channels}-band array'} folder {path}", channels=channels,
    )
    _validate(records, limits)
    return records


def _validate(records: ImageRecords, limits: ImageLimits | None) -> None:
    """Every file usable: decoded (photos) or its header checked (multi-band arrays); all problems at once."""
    if records.channels is None:
        validate_images(records, limits=limits)
    else:
        check_arrays(records.items, records.channels, records.ids, limits)


def _list_images(folder: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> tuple[list[str], int]:
    """Files with ``extensions`` under ``folder`` (relative, sorted, hidden skipped) and how many others were ignored."""
    found: list[str] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        # Pruning in place stops os.walk from entering hidden folders (.ipynb_checkpoints, .git).
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, folder)
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            if f.lower().endswith(extensions):
                found.append(f if rel == "." else os.path.join(rel, f))
            else:
                ignored += 1
    return found, ignored


def load_manifest(
    path: str, base: str | None = None, classes: Sequence[str] | None = None, limits: ImageLimits | None = None,
    channels: int | None = None,
) -> ImageRecords:
    """Records from a CSV manifest with header ``path,label[,split]``.

    Rows are named by their line number in the file ("manifest.csv row 17"; the header is row 1).
    Blank lines are skipped; extra columns are ignored. ``split`` values are train / val / test
    (also "valid", "validation"), case-insensitive. A file listed twice is an error, since the copy
    would either leak between splits or silently double its weight.

    Args:
        path: the CSV file.
        base: folder that relative paths start from (default: the CSV's folder).
        classes: fixed class list/order; a label outside it is an error.
        limits: the decoding size guard every file must pass.
        channels: None for images; N for multi-band arrays of N bands.

    Raises:
        DataError: missing columns, empty fields, unknown split or label, missing or duplicate
            files (all rows reported at once), no rows, undecodable images.
    """
    name = os.path.basename(path)
    base_dir = os.path.abspath(os.path.expanduser(base)) if base else os.path.dirname(os.path.abspath(path))
    try:
        # utf-8-sig drops the byte-order mark spreadsheet programs write before the header.
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = _read_csv(f, name)
    except UnicodeDecodeError as exc:
        raise DataError(f"manifest {path} is not UTF-8 text ({exc}). Fix: save it as UTF-8 CSV.") from None
    header, body = rows
    cols = [h.strip().lower() for h in header]
    missing = [c for c in MANIFEST_COLUMNS if c not in cols]
    if missing:
        raise DataError(
            f"manifest {path}: missing column(s) {missing}; the header is {header}. Fix: the first line must "
            f"be 'path,label' or 'path,label,split'."
        )
    ipath, ilabel = cols.index("path"), cols.index("label")
    isplit = cols.index("split") if "split" in cols else None
    if not body:
        raise DataError(f"manifest {path} has a header but no rows. Fix: add one row per image.")

    problems: list[str] = []
    items: list[str | np.ndarray] = []
    ids: list[str] = []
    labels: list[str] = []
    splits: list[str] = []
    seen: dict[str, tuple[int, str]] = {}
    for line, row in body:
        where = f"row {line}"
        if len(row) < len(cols):
            problems.append(f"{where}: {len(row)} fields, the header has {len(cols)} ({','.join(row)})")
            continue
        rel, label = row[ipath].strip(), row[ilabel].strip()
        if not rel or not label:
            problems.append(f"{where}: empty {'path' if not rel else 'label'}")
            continue
        split = None
        if isplit is not None:
            raw = row[isplit].strip()
            split = SPLIT_ALIASES.get(raw.lower())
            if split is None:
                problems.append(f"{where}: split {raw!r} is not one of {', '.join(SPLIT_NAMES)}")
                continue
        if classes is not None and label not in classes:
            problems.append(f"{where}: label {label!r} is not among the known labels {list(classes)}")
            continue
        full = os.path.normpath(os.path.join(base_dir, os.path.expanduser(rel)))
        if not os.path.isfile(full):
            problems.append(f"{where}: file {rel} does not exist ({full})")
            continue
        key = os.path.normcase(os.path.realpath(full))
        if key in seen:
            first_line, first_split = seen[key]
            both = f" (splits {first_split} and {split})" if split is not None else ""
            problems.append(f"{where}: file {rel} is already listed in row {first_line}{both}")
            continue
        seen[key] = (line, split or "")
        items.append(full)
        ids.append(f"{name} {where}: {rel}")
        labels.append(label)
        if split is not None:
            splits.append(split)
    if problems:
        listed = [f"  - {p}" for p in problems[:MAX_LISTED]]
        if len(problems) > MAX_LISTED:
            listed.append(f"  ... and {len(problems) - MAX_LISTED} more")
        raise DataError(
            f"manifest {path}: {len(problems)} bad row(s) of {len(body)}:\n" + "\n".join(listed)
            + f"\nFix: correct or delete these rows (relative paths start at {base_dir})."
        )
    class_names = list(classes) if classes is not None else sort_labels(labels)
    index = {c: i for i, c in enumerate(class_names)}
    records = ImageRecords(
        items=items, labels=np.array([index[lb] for lb in labels], dtype=np.int64), ids=ids,
        classes=class_names, splits=splits if isplit is not None else None, source=f"manifest {path}", channels=channels,
    )
    _validate(records, limits)
    return records


def _read_csv(f: TextIO, name: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, fields)]) skipping blank lines; raises DataError on malformed CSV."""
    reader = csv.reader(f)
    header: list[str] | None = None
    body: list[tuple[int, list[str]]] = []
    try:
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if header is None:
                header = row
            else:
                body.append((reader.line_num, row))
    except csv.Error as exc:
        raise DataError(f"manifest {name}: malformed CSV near line {reader.line_num}: {exc}") from None
    if header is None:
        raise DataError(f"manifest {name} is empty. Fix: write a header 'path,label[,split]' and one row per image.")
    return header, body
