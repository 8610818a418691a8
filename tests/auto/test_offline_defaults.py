"""``visiontune auto DATA backbone.weights=offline`` with no backbone named compares the offline backbones chosen by
measurement (issue 27: ``benchmarks/results/offline-backbones``), each at its measured input size; anything the user
names wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from visiontune.auto import AutoSelect, AutoSettings
from visiontune.backbones.offline import OFFLINE_AUTO_BACKBONES
from visiontune.cli import main

BASE = ["data.train_per_class=4", "data.test_per_class=2"]
NAMES = [name for name, _ in OFFLINE_AUTO_BACKBONES]


def _select(tmp_path: Path, *overrides: str, backbones: list[str] | None = None) -> AutoSelect:
    return AutoSelect("digits", tmp_path / "sel", AutoSettings(progress=False), backbones=backbones,
                      overrides=[*BASE, *overrides])


def test_offline_weights_without_a_backbone_compare_the_measured_defaults(tmp_path: Path) -> None:
    sel = _select(tmp_path, "backbone.weights=offline")
    assert sel.task.backbones == NAMES and len(NAMES) >= 2
    for name, size in OFFLINE_AUTO_BACKBONES:
        want = [f"backbone.name={name}"] + ([f"backbone.img_size={size}"] if size else [])
        assert sel.task.variants[name] == want
        assert sel.task.config(name, ()).backbone.img_size == size  # what every fold and the final run get
    assert sel.task.signature["variants"] == {n: sel.task.variants[n] for n in NAMES}  # a resume with other sizes is refused
    assert f"backbones: {', '.join(NAMES)}" in sel.plan().describe()


@pytest.mark.parametrize("overrides, backbones, expected", [
    (("backbone.weights=offline", "backbone.name=tf_efficientnet_lite0"), None, ["tf_efficientnet_lite0"]),
    (("backbone.weights=offline",), ["vit_small_patch14_dinov2"], ["vit_small_patch14_dinov2"]),
    (("backbone.weights=none",), None, ["vit_small_patch14_dinov2"]),
    (("backbone.weights=offline:efficientnet-lite0", "backbone.name=tf_efficientnet_lite0"), None, ["tf_efficientnet_lite0"]),
])
def test_a_named_backbone_or_other_weights_keep_the_single_backbone(tmp_path: Path, overrides, backbones, expected) -> None:
    sel = _select(tmp_path, *overrides, backbones=backbones)
    assert sel.task.backbones == expected
    assert "variants" not in sel.task.signature


def test_the_users_input_size_applies_to_every_default_backbone(tmp_path: Path) -> None:
    sel = _select(tmp_path, "backbone.weights=offline", "backbone.img_size=224")
    assert sel.task.backbones == NAMES
    assert all(sel.task.config(n, ()).backbone.img_size == 224 for n in NAMES)


def test_dry_run_names_both_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["auto", "digits", "--dry-run", "--out", str(tmp_path / "sel"), "backbone.weights=offline", *BASE]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NAMES)
