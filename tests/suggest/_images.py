"""Small noisy images in three well-separated colours, the hidden labels of the suggest tests (tests/ is not a package:
loaded by path from tests/suggest/conftest.py and tests/serve/test_label_page.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"blue": (30, 40, 200), "green": (30, 180, 40), "red": (200, 30, 30)}


def make_images(folder: Path, per_colour: int, seed: int = 0, sub: bool = False) -> dict[str, str]:
    """``per_colour`` noisy 24x24 PNGs per colour under ``folder`` (one sub-folder per colour when ``sub``);
    resolved path -> colour."""
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
