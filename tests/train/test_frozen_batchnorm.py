"""Frozen BatchNorm layers keep their running statistics while adapters train (runtime.train_mode)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import visiontune as vt
from visiontune.runtime import train_mode


def test_train_mode_keeps_frozen_batchnorm_in_eval_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5))
    for p in model[1].parameters():
        p.requires_grad_(False)
    train_mode(model)
    assert model.training and model[0].training and model[4].training
    assert not model[1].training, "a BatchNorm nothing trains must normalise with its running statistics"
    assert model[3].training, "a BatchNorm whose affine parameters train stays in train mode"
    before = model[1].running_mean.clone()
    model(torch.randn(4, 3, 8, 8) * 5 + 3)
    assert torch.equal(model[1].running_mean, before)
    assert not torch.equal(model[3].running_mean, torch.zeros(4))


@pytest.mark.parametrize(("method", "stats_change"), [("lora", False), ("full", True)])
def test_a_cnn_runs_statistics_change_only_when_its_batchnorm_trains(tiny_overrides, method: str, stats_change: bool) -> None:
    extra = ["method.targets=conv"] if method == "lora" else []
    cfg = vt.load_config(None, overrides=[*tiny_overrides, "backbone.name=test_resnet", f"method.name={method}", *extra,
                                          "optim.epochs=2", f"run.name={method}"])
    result = vt.train(cfg)
    saved = load_file(str(result.run_dir / "adapter.safetensors"))
    means = [n for n in saved if n.endswith("running_mean")]
    assert means, "a CNN run saves its BatchNorm running statistics"
    # A new BatchNorm's running mean is zero (the random test backbone has no pretrained statistics).
    changed = [n for n in means if saved[n].abs().max() > 0]
    assert bool(changed) == stats_change, changed
