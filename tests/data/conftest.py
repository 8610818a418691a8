"""Fixtures that write tiny real image files, so loaders and decoders are tested on actual PNG/JPEG bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from PIL import Image


def _write(path: Path, color: int = 0, mode: str = "RGB", size: tuple[int, int] = (6, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A per-file colour keeps JPEG/PNG files distinct (nothing here relies on identical bytes).
    value = color % 256
    fill: int | tuple[int, ...] = value if mode in ("L", "P") else tuple([value] * len(mode))
    Image.new(mode, size, fill).save(path)
    return path


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """``write_image(path, color=0, mode="RGB", size=(6, 6))`` writes an image in the format of its extension."""
    return _write


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[..., Path]:
    """``make_folder({"cat": 3, "dog": 2}, ext=".png")`` -> an image folder with that many files per class."""

    def make(counts: dict[str, int], ext: str = ".png", name: str = "ds") -> Path:
        root = tmp_path / name
        root.mkdir(parents=True, exist_ok=True)
        for ci, (cls, n) in enumerate(counts.items()):
            (root / cls).mkdir(exist_ok=True)
            for i in range(n):
                _write(root / cls / f"img{i:03d}{ext}", color=ci * 40 + i)
        return root

    return make
