"""``visiontune sweep --dry-run``: every run checked against the real model classes on the meta device."""

from __future__ import annotations

from pathlib import Path

import yaml

from visiontune.check import check_config
from visiontune.cli import main
from visiontune.config import load_config
from visiontune.sweep import check_sweep, load_sweep

STUDY = Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "dinov3-cows.yaml"
FC3 = r"blocks\.\d+\.mlp\.fc3"  # a ViT MLP has fc1 and fc2 only
BASE = {
    "data": {"dataset": "path/that/is/never/read"},  # a dry run reads no data
    "backbone": {"name": "test_resnet", "weights": "none"},
    "method": {"name": "lora", "rank": 4},
    "optim": {"epochs": 1},
}


def _write(tmp_path: Path, **spec: object) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump({"base": BASE, "dir": str(tmp_path / "out"), **spec}))
    return p


def test_dry_run_lists_every_run_and_fails_on_invalid_ones(tmp_path, capsys) -> None:
    path = _write(tmp_path, seeds=[0, 1], runs=[
        {"method.targets": ["conv"]},  # valid: LoRA on a ResNet's convs
        {"method.targets": ["qv"]},  # a ViT recipe on a ResNet
        {"backbone.name": "test_vit", "method.targets": [FC3]},  # a pattern that matches nothing
        {"backbone.name": "resnet181", "method.name": "linear"},  # not a timm name
        {"backbone.name": "vit_small_patch16_dinov3", "backbone.img_size": 40},  # 40 px is not whole 16-px patches
        {"method.rank": 0},  # a config problem: reported on its run's line, not raised for the whole sweep
    ])
    assert main(["sweep", str(path), "--dry-run"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    status = {line.split()[1]: line.split()[0] for line in lines if line.split()[0] in ("ok", "invalid")}
    valid = "targets=conv__seed=0", "targets=conv__seed=1"
    assert len(status) == 12 and all(status[n] == "ok" for n in valid), out
    assert sum(s == "invalid" for s in status.values()) == 10
    assert "targets=conv__seed=1  (same model check as targets=conv__seed=0)" in out  # seeds share one check
    for text in (
        "preset 'qv' selects nothing on test_resnet. This ResNet has no attention", "use method.targets=conv",
        f"pattern {FC3!r} selects nothing on test_vit: it matches no module",
        "backbone.name='resnet181' is neither a visiontune backbone", "Did you mean 'resnet18'",
        "backbone.img_size=40 is not a multiple of the patch size 16 of backbone.name='vit_small_patch16_dinov3'",
        "backbone.img_size=32 or 48",
        "method.rank=0 must be an integer >= 1",
    ):
        assert text in out, text
    summary = lines[-1]
    assert summary.startswith("10 of 12 runs invalid: ") and "targets=qv__seed=0" in summary and "rank=0__seed=1" in summary
    assert "targets=conv" not in summary


def test_the_dinov3_study_grid_is_valid_on_the_real_classes(capsys) -> None:
    """The published grid (ViT-L/16 DINOv3, QLoRA/DoRA x q/all-linear x ranks, baselines) checks out, quickly."""
    assert main(["sweep", str(STUDY), "--dry-run"]) == 0
    out = capsys.readouterr().out
    runs = [line for line in out.splitlines() if line.startswith(("ok ", "invalid ", "unchecked "))]
    assert len(runs) == 15 and all(line.startswith("ok ") for line in runs), out
    assert "4-bit quantization not run on the meta device" in out
    assert out.splitlines()[-1].startswith("all 15 checked runs valid")


def test_the_7b_model_of_the_study_checks_in_seconds() -> None:
    """vit_7b_patch16_dinov3 (6.7B parameters, 27 GB in fp32) builds on the meta device: no weights, no memory.

    One cell (QLoRA on q): the study grid above covers the other targets on the same DINOv3 class.
    """
    sweep = load_sweep(STUDY, overrides=["backbone.name=vit_7b_patch16_dinov3"], validate=False)
    sweep.entries = [e for e in sweep.entries if e.name == "method=qlora__targets=q__rank=8"]
    (result,) = check_sweep(sweep)
    assert result.status == "ok", result.detail
    assert result.notes == ["qlora: 4-bit quantization not run on the meta device (bitsandbytes needs real weights)"]


def test_check_config_names_what_it_could_not_check() -> None:
    cfg = load_config(None, overrides=["data.dataset=digits", "backbone.name=test_vit", "backbone.weights=none",
                                       "method.name=qlora", "method.targets=all-linear"])
    (note,) = check_config(cfg)
    # test_vit's Linears are 32 and 64 wide: whole 32-value NF4 blocks, so none stays full precision.
    assert note == "qlora: 4-bit quantization not run on the meta device (bitsandbytes needs real weights)"
    cfg = load_config(None, overrides=["data.dataset=digits", "backbone.name=test_vit", "backbone.weights=none",
                                       "method.name=lora", "method.targets=all-linear"])
    assert check_config(cfg) == []


def test_steps_that_need_values_are_reported_not_failed(tmp_path, monkeypatch, capsys) -> None:
    """A data-dependent op cannot run on the meta device: that says 'not checked', never 'invalid'."""
    import torch

    from visiontune.registry import METHODS

    def needs_values_in_forward(self, model):
        model.register_forward_pre_hook(lambda module, args: args[0].sum().item())
        return []

    def needs_values_in_surgery(self, model):
        torch.empty(2, device="meta").tolist()

    monkeypatch.setattr(METHODS.get("full"), "apply_on_meta", needs_values_in_forward)
    monkeypatch.setattr(METHODS.get("linear"), "apply_on_meta", needs_values_in_surgery)
    path = _write(tmp_path, grid={"method.name": ["full", "linear"]})
    assert main(["sweep", str(path), "--dry-run"]) == 0  # nothing is known to be wrong
    out = capsys.readouterr().out
    assert "ok        method=full" in out
    assert "forward pass not checked on the meta device (RuntimeError: Tensor.item() cannot be called on meta tensors)" in out
    assert "unchecked method=linear\n          could not be checked on the meta device: NotImplementedError" in out
    assert out.splitlines()[-2:] == ["all 1 checked run valid (backbone and method checked on the meta device; data not "
                                     "read, weights not loaded)",
                                     "1 run(s) could not be checked on the meta device: method=linear"]
