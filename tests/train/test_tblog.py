"""TensorBoard scalars: per-epoch train/val scalars and final test scores land in <run>/tensorboard."""

from __future__ import annotations

import sys

import pytest

import visiontune as vt
from visiontune.errors import ConfigError
from visiontune.train.tblog import ScalarLogger


def test_run_writes_epoch_and_test_scalars(tiny_overrides):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = vt.load_config(None, overrides=[*tiny_overrides, "method.name=full", "data.val_per_class=2",
                                          "run.tensorboard=true", "run.name=tb"])
    res = vt.train(cfg)
    acc = EventAccumulator(str(res.run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/accuracy", "val/loss", "test/accuracy", "test/f1_weighted"} <= tags
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2]
    assert losses[0].value == pytest.approx(res.metrics["train"]["history"][0]["train_loss"], rel=1e-6)
    assert acc.Scalars("test/accuracy")[-1].value == pytest.approx(res.metrics["test"]["accuracy"], rel=1e-6)


def test_off_by_default_and_clear_error_when_not_installed(tiny_overrides, monkeypatch, tmp_path):
    cfg = vt.load_config(None, overrides=tiny_overrides)
    assert cfg.run.tensorboard is False
    off = ScalarLogger(None)
    off.log(1, {"train_loss": 1.0})  # a no-op, not an error
    assert not off.enabled
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"visiontune\[tensorboard\].*run.tensorboard=false"):
        ScalarLogger(tmp_path / "tb")
