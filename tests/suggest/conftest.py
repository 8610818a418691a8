"""Fixtures of the suggest tests: a folder of small images in three well-separated colour groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_BACKBONE = ["backbone.name=test_vit", "backbone.weights=none", "backbone.img_size=32"]
COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}


def make_images(folder: Path, per_colour: int, seed: int = 0, sub: bool = False) -> dict[str, str]:
    """``per_colour`` noisy 24x24 PNGs per colour under ``folder`` (one sub-folder per colour when ``sub``); path -> colour."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, rgb in COLOURS.items():
        target = folder / name if sub else folder
        target.mkdir(parents=True, exist_ok=True)
        for i in range(per_colour):
            arr = np.clip(np.array(rgb) + rng.normal(0, 12, (24, 24, 3)), 0, 255).astype(np.uint8)
            p = target / f"{name}_{seed}_{i:03d}.png"
            Image.fromarray(arr).save(p)
            out[str(p.resolve())] = name
    return out


@pytest.fixture
def pool(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """30 unlabeled images (10 per colour), flat, and the hidden colour of each."""
    folder = tmp_path / "pool"
    return folder, make_images(folder, 10)


@pytest.fixture
def image_maker():
    """:func:`make_images`, for tests that need more folders."""
    return make_images


@pytest.fixture
def tiny_backbone() -> list[str]:
    return list(TINY_BACKBONE)
