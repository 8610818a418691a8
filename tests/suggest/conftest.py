"""Fixtures of the suggest tests: a folder of small images in three well-separated colour groups, a tiny backbone."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

TINY_BACKBONE = ["backbone.name=test_vit", "backbone.weights=none", "backbone.img_size=32"]


def load_images_helper() -> ModuleType:
    spec = importlib.util.spec_from_file_location("visiontune_test_suggest_images", Path(__file__).parent / "_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IMAGES = load_images_helper()


@pytest.fixture
def pool(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """30 unlabeled images (10 per colour), flat, and the hidden colour of each."""
    folder = tmp_path / "pool"
    return folder, IMAGES.make_images(folder, 10)


@pytest.fixture
def image_maker():
    """:func:`_images.make_images`, for tests that need more folders."""
    return IMAGES.make_images


@pytest.fixture
def tiny_backbone() -> list[str]:
    return list(TINY_BACKBONE)
