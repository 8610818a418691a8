"""Predicting on files and folders (``visiontune predict``): collecting inputs and writing results.

Folders are searched recursively for image files (the extensions image folders use,
:data:`visiontune.data.IMAGE_EXTENSIONS`; hidden files and folders skipped); a file named explicitly
is always tried, whatever its extension. Results come as a table, JSON or CSV, one entry per input in
input order, with an ``error`` instead of predictions for an input that could not be read.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from visiontune.infer.predictor import PredictionResult
from visiontune.data import IMAGE_EXTENSIONS
from visiontune.atomic import atomic_write, check_writable
from visiontune.distributed import is_main
from visiontune.errors import ConfigError

FORMATS = ("table", "json", "csv")
TABLE_SUFFIXES = (".csv",)
"""What ``predict --output`` / ``eval --predictions`` write. Parquet needs pyarrow, which is not in this build's lock."""


EVAL_HEADER = ["file", "label", "predicted", "score"]
"""``eval --predictions``' columns; ``predict --output`` writes :func:`prediction_header`'s."""


def check_table_path(path: str | os.PathLike) -> Path:
    """``path`` if it names a file this build can write predictions to (CSV), else a ConfigError naming the fix.

    Checked before any work: the folder must be writable, and an existing file is replaced only when it is a
    predictions table visiontune wrote (a user's CSV of the same name is never overwritten).
    """

    p = Path(path)
    if p.suffix.lower() == ".parquet":
        raise ConfigError(f"{str(p)!r}: Parquet output needs pyarrow, which this build does not include "
                          "(requirements/lock.txt); write a .csv file instead")
    if p.suffix.lower() not in TABLE_SUFFIXES:
        raise ConfigError(f"{str(p)!r}: predictions are written as CSV; name the file *.csv")
    if p.is_dir():
        raise ConfigError(f"{str(p)!r} is a folder; name a .csv file to write")
    if p.exists() or p.is_symlink():
        if not _is_predictions_table(p):
            raise ConfigError(f"{str(p)!r} exists and is not a visiontune predictions file (its first line is not "
                              "the header predict or eval writes); choose another file name (nothing was changed)")
    # Process 0 alone writes the table (under a launcher), so it alone tries the folder: the others write nothing.
    return check_writable(p, "the predictions file") if is_main() else p


def _is_predictions_table(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    try:
        with open(path, encoding="utf-8", newline="") as f:
            first = f.readline(4096).rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return False
    # The whole header, not its start: a user's own "file,label" table (a common layout) is not ours.
    columns = first.split(",")
    top_k = (len(columns) - 2) // 2
    return columns == EVAL_HEADER or (top_k >= 1 and columns == prediction_header(top_k))


def write_table(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[object]]) -> int:
    """Stream ``rows`` into a CSV file at ``path`` (atomically: the file appears complete or not at all).

    Rows are written as they come, so a generator of predictions is never held in memory.

    Returns:
        The number of rows written.
    """

    p = check_table_path(path)
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            for row in rows:
                w.writerow(row)
                count += 1

    atomic_write(p, write)
    return count


def prediction_row(r: PredictionResult, top_k: int) -> list[str]:
    """One CSV row of :func:`format_results`' csv layout: file, label/score pairs, error."""
    cells: list[str] = []
    for i in range(top_k):
        p = r.predictions[i] if r.predictions and i < len(r.predictions) else None
        cells += [p["label"], f"{p['score']:.6f}"] if p else ["", ""]
    return [r.source, *cells, r.error or ""]


def prediction_header(top_k: int) -> list[str]:
    return ["file", *[c for i in range(1, top_k + 1) for c in (f"label_{i}", f"score_{i}")], "error"]


def collect_images(
    inputs: Sequence[str | os.PathLike], extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
) -> tuple[list[str], list[PredictionResult]]:
    """Expand files and folders into image paths (sorted per folder); ``extensions`` are what a folder's files must
    end with (a multi-band run's: ``visiontune.data.bands.ARRAY_EXTENSIONS``).

    Returns:
        ``(paths to predict, problems)``: a missing path or a folder without images becomes a
        :class:`PredictionResult` with an error rather than stopping the others.
    """
    paths: list[str] = []
    problems: list[PredictionResult] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found.extend(os.path.join(root, f) for f in sorted(files)
                             if not f.startswith(".") and f.lower().endswith(extensions)
                             and os.path.isfile(os.path.join(root, f)))  # a FIFO named x.png would block the reader
            if not found:
                problems.append(PredictionResult(str(p), error=f"folder holds no image files ({', '.join(extensions)})"))
            paths.extend(found)
        elif p.exists() and not p.is_file():
            problems.append(PredictionResult(str(p), error="not a regular file (a FIFO, socket or device); pass image files"))
        elif p.exists():
            paths.append(str(p))
        else:
            problems.append(PredictionResult(str(p), error="no such file or folder"))
    return paths, problems


def format_results(results: Iterable[PredictionResult], fmt: str, top_k: int) -> str:
    """Render results as ``table`` (aligned text), ``json`` (a list) or ``csv`` (one row per input).

    CSV columns: ``file``, then ``label_1, score_1, ... label_k, score_k``, then ``error``.
    """
    results = list(results)
    if fmt == "json":
        return json.dumps(
            [{"file": r.source, "predictions": r.predictions} if r.error is None else {"file": r.source, "error": r.error}
             for r in results],
            indent=1,
        )
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(prediction_header(top_k))
        for r in results:
            writer.writerow(prediction_row(r, top_k))
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    width = max([len("file"), *(len(r.source) for r in results)])
    lines = [f"{'file':<{width}}  predictions"]
    for r in results:
        if r.error is not None:
            lines.append(f"{r.source:<{width}}  ERROR: {r.error}")
        else:
            lines.append(f"{r.source:<{width}}  " + "  ".join(f"{p['label']} {p['score']:.3f}" for p in r.predictions or []))
    return "\n".join(lines)
