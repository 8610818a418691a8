"""What ``suggest`` writes: the picks as a manifest CSV with an empty label column, its sidecar, a contact sheet.

The CSV is a manifest :func:`visiontune.data.sources.load_manifest` reads once every label is filled
(``path,label`` first; ``rank``, ``reason`` and ``score`` are extra columns the reader ignores). Paths are
relative to the CSV's folder when the image lies below it, absolute otherwise. An existing file is replaced
only when visiontune wrote it (its header is the one below), as ``predict --output`` does with its tables.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw

from visiontune.atomic import atomic_write, check_writable, write_json_atomic, write_text_atomic
from visiontune.data.images import load_image
from visiontune.errors import ConfigError, DataError

HEADER = ("path", "label", "rank", "reason", "score")
"""The picks CSV's header: the manifest's two columns, then why each image was picked."""
THUMB = 128
"""Contact sheet cell size (pixels)."""
SHEET_MAX = 200
"""At most this many picks on the contact sheet (the CSV lists all)."""


def sidecar(csv_path: Path) -> Path:
    return csv_path.with_suffix(".json")


def sheet_path(csv_path: Path) -> Path:
    return csv_path.with_suffix(".png")


def is_picks_csv(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return tuple(next(csv.reader(f), ())) == HEADER
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def check_out(path: str | Path) -> Path:
    """``path`` if suggest may write its CSV (and ``.json`` / ``.png`` beside it) there, else a ConfigError with the fix."""
    p = Path(path)
    if p.suffix.lower() != ".csv":
        raise ConfigError(f"--out {str(p)!r}: the picks are a CSV manifest; name the file *.csv")
    if p.is_dir():
        raise ConfigError(f"--out {str(p)!r} is a folder; name a .csv file to write")
    if (p.exists() or p.is_symlink()) and not is_picks_csv(p):
        raise ConfigError(f"--out {str(p)!r} exists and is not a picks file visiontune wrote (its header is not "
                          f"{','.join(HEADER)}); choose another file name (nothing was changed)")
    if not p.exists():
        for other in (sidecar(p), sheet_path(p)):
            if other.exists():
                raise ConfigError(f"{str(other)!r} exists but {str(p)!r} does not, so it is not from an earlier "
                                  "suggest; choose another --out (nothing was changed)")
    return check_writable(p, "the picks file")


def rel_path(image: str, folder: Path) -> str:
    path = Path(image).resolve()
    try:
        return path.relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(path)


def write_picks(path: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
    """The CSV (rows: path, reason, score in pick order) and its sidecar JSON (classes, strategy, settings)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    for rank, r in enumerate(rows, 1):
        w.writerow([rel_path(r["path"], path.parent), r.get("label", ""), rank, r["reason"], f"{r['score']:.6g}"])
    write_json_atomic(sidecar(path), meta)
    write_text_atomic(path, buf.getvalue())


def read_picks(path: Path) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The rows of a picks CSV and its sidecar (``{}`` when absent)."""
    import json

    if not Path(path).is_file():
        raise DataError(f"{str(path)!r} does not exist; pass the CSV `visiontune suggest --out` wrote")
    if not is_picks_csv(path):
        raise DataError(f"{str(path)!r} is not a picks file written by `visiontune suggest` (header {','.join(HEADER)})")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    side = sidecar(path)
    meta = json.loads(side.read_text()) if side.is_file() else {}
    return rows, meta


def write_labels(path: Path, labels: dict[str, str]) -> int:
    """Write ``labels`` (image path as in the CSV -> label) into the picks CSV atomically; returns rows labeled.

    Raises:
        DataError: a path is not in the CSV (nothing is written then).
    """
    rows, _ = read_picks(path)
    known = {r["path"] for r in rows}
    unknown = sorted(set(labels) - known)
    if unknown:
        raise DataError(f"{len(unknown)} path(s) are not picks of {path.name}: {unknown[:5]}; reload the page")
    for r in rows:
        if r["path"] in labels:
            r["label"] = labels[r["path"]].strip()
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(HEADER), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())
    return sum(1 for r in rows if r["label"])


def short_reason(reason: str) -> str:
    """The contact sheet's caption of a reason: its head, without the words every TypiClust reason shares."""
    return reason.split(" (")[0].replace("most typical image of ", "typical, ")


def contact_sheet(path: Path, images: Sequence[str], captions: Sequence[str]) -> int:
    """A grid of the first :data:`SHEET_MAX` picks (thumbnail, rank and caption) as a PNG; returns images shown."""
    shown = list(zip(images, captions))[:SHEET_MAX]
    cols = min(10, max(1, len(shown)))
    rows = (len(shown) + cols - 1) // cols
    cap_h = 26
    sheet = Image.new("RGB", (cols * THUMB, rows * (THUMB + cap_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (img_path, cap) in enumerate(shown):
        img = load_image(img_path)
        scale = THUMB / max(img.size)  # small images are enlarged too, so a 32 px pick is visible
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)
        x, y = (k % cols) * THUMB, (k // cols) * (THUMB + cap_h)
        sheet.paste(img, (x + (THUMB - img.width) // 2, y + (THUMB - img.height) // 2))
        text = f"{k + 1}. {short_reason(cap)}"
        draw.text((x + 2, y + THUMB), text[:21] + "\n" + text[21:42], fill="black")
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return len(shown)
