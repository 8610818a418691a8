"""An image size the patch grid does not cover is an error naming the valid sizes (issue 18, item 9)."""

from __future__ import annotations

import pytest

from visiontune.backbones import create_backbone
from visiontune.cli import main
from visiontune.config import BackboneConfig
from visiontune.errors import ConfigError


@pytest.mark.parametrize(
    "name, size, patch, valid, lost",
    [("test_vit", 30, 8, "24 or 32", "36%"), ("test_vit", 12, 8, "8 or 16", "56%"), ("test_swin", 30, 4, "28 or 32", "13%")],
)
def test_img_size_off_the_patch_grid_is_refused(name: str, size: int, patch: int, valid: str, lost: str) -> None:
    """Before, timm's patch embedding silently dropped the last ``size % patch`` rows and columns."""
    with pytest.raises(ConfigError) as e:
        create_backbone(BackboneConfig(name=name, weights="none", img_size=size), num_classes=3)
    msg = str(e.value)
    assert f"backbone.img_size={size} is not a multiple of the patch size {patch}" in msg
    assert f"backbone.img_size={valid}" in msg and f"({lost} of every image)" in msg


def test_sizes_on_the_grid_and_cnns_pass() -> None:
    assert create_backbone(BackboneConfig(name="test_vit", weights="none", img_size=48), 3).patch_embed.grid_size == (6, 6)
    create_backbone(BackboneConfig(name="test_resnet", weights="none", img_size=30), 3)  # no patch grid: any size


def test_train_reports_it_without_a_traceback(tiny_overrides: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(["train", *tiny_overrides, "backbone.img_size=30"]) == 2
    err = capsys.readouterr().err
    assert "visiontune: error: backbone.img_size=30 is not a multiple of the patch size 8" in err and "Traceback" not in err
