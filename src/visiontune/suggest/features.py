"""Pooled features of an image pool, streamed to disk in batches: bounded memory, resumable, reused across calls.

A folder of 100,000 images is never decoded into memory at once: images are read in batches of
``batch_size``, each batch's pooled pre-logit features (timm ``forward_head(pre_logits=True)``, the
features :func:`visiontune.train.loop.extract_features` gives ``auto``'s cheap stage and the linear
probe) go straight into a float32 ``numpy.memmap`` on disk, and ``progress.json`` records how many rows
are final after every chunk. An interrupted call resumes from that row; a later call on the same
images and backbone reuses the file without a forward pass.

The store is keyed by the backbone identity (name, canonical weights and their hash, image size) and
by the image list (path, size, modification time of every file): change either and a new store is
made beside the old one, so stale features are never read back. ``auto`` keeps its features in memory
for the run (its pools are a few thousand labeled images); this store is what a pool of unlabeled images
needs. Written by hand: timm and scikit-learn have no feature cache, and numpy's memmap is the file format.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from visiontune.atomic import write_json_atomic
from visiontune.data.images import ImageLimits, load_image

CHUNK = 1024
"""Rows computed between two progress records: what an interruption can lose at most."""


def _file_key(paths: Sequence[str]) -> str:
    """Hash of every file's path, size and modification time (nanoseconds): changes when any image changes."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


@dataclass
class FeatureStore:
    """Features of ``paths`` (row i = paths[i]) under ``folder``; :meth:`compute` fills the missing rows."""

    folder: Path
    paths: list[str]
    dim: int

    @property
    def file(self) -> Path:
        return self.folder / "features.f32"

    @property
    def progress_file(self) -> Path:
        return self.folder / "progress.json"

    def done(self) -> int:
        """Rows already final (0 for a new store)."""
        if not self.progress_file.is_file():
            return 0
        try:
            rec = json.loads(self.progress_file.read_text())
        except (OSError, json.JSONDecodeError):
            return 0
        if rec.get("rows") != len(self.paths) or rec.get("dim") != self.dim or not self.file.is_file():
            return 0
        return min(int(rec.get("done", 0)), len(self.paths))

    def array(self, mode: str = "r") -> np.memmap:
        return np.memmap(self.file, dtype=np.float32, mode=mode, shape=(len(self.paths), self.dim))

    def compute(self, forward: Callable[[torch.Tensor], torch.Tensor], transform: Callable[[Any], torch.Tensor],
                batch_size: int = 64, limits: ImageLimits | None = None, progress: bool = True,
                desc: str = "features") -> np.memmap:
        """Compute the rows not yet final, ``batch_size`` images at a time; return the whole store (read-only memmap).

        Raises:
            DataError: an image cannot be decoded (its path and the fix are named; rows computed before it stay).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        start = self.done()
        n = len(self.paths)
        if start < n:
            if start == 0 or not self.file.is_file():
                start = 0
                self.array("w+").flush()  # preallocate the file at its final size
            out = self.array("r+")
            bar = tqdm(total=n, initial=start, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
            for i in range(start, n, batch_size):
                j = min(i + batch_size, n)
                x = torch.stack([transform(load_image(p, limits=limits)) for p in self.paths[i:j]])
                with torch.inference_mode():
                    out[i:j] = forward(x).float().numpy()
                bar.update(j - i)
                if j == n or (j // CHUNK) != (i // CHUNK):
                    out.flush()  # the rows reach the disk before the record that says they are final
                    write_json_atomic(self.progress_file, {"rows": n, "dim": self.dim, "done": j}, fsync=False)
            bar.close()
            del out
        return self.array("r")


def open_store(root: Path, paths: Sequence[str], identity: dict[str, Any], dim: int) -> FeatureStore:
    """The store of ``paths`` on the backbone ``identity`` under ``root`` (one sub-folder per key)."""
    ident = json.dumps(identity, sort_keys=True, default=str)
    key = hashlib.sha256(ident.encode()).hexdigest()[:12] + "-" + _file_key(paths)
    folder = Path(root) / key
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "store.json"
    if not meta.is_file():
        write_json_atomic(meta, {"backbone": identity, "images": len(paths), "dim": dim}, fsync=False)
    return FeatureStore(folder, list(paths), dim)
