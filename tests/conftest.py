"""Shared fixtures: fast settings for tiny-model runs, run directories under tmp_path."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)

TINY = [
    "data.dataset=digits", "data.train_per_class=8", "data.test_per_class=10", "backbone.name=test_vit",
    "backbone.weights=none", "backbone.img_size=32", "optim.epochs=2", "optim.batch_size=16", "run.progress=false",
    "run.measure_speed=false",
]


@pytest.fixture
def tiny_overrides(tmp_path) -> list[str]:
    """Overrides for a seconds-long run of a tiny random ViT on digits, writing under tmp_path."""
    return [*TINY, f"run.dir={tmp_path / 'runs'}"]
