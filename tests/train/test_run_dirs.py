"""Run folders are safe to reuse (issue 18): no pickles loaded, no mixed configurations, nothing damaged.

Each test reproduces one failure of the old behaviour: a planted checkpoint ran code on resume; a resume
with another config or data split went ahead; a refused resume rewrote a finished run's config.yaml;
a rerun without run.resume discarded a checkpoint; run.overwrite kept the old run's files; artifacts
were written in place.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import visiontune as vt
from visiontune.atomic import atomic_write, write_text_atomic
from visiontune.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from visiontune.cli import main
from visiontune.errors import ConfigError
from visiontune.train import loop

FAST = ["data.train_per_class=2", "data.test_per_class=2", "optim.head_init=zero"]


class _Payload:
    """Unpickling this creates ``marker``: what a hostile checkpoint would do (with os.system instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_payload(run_dir: Path, marker: Path, name: str = "last.pt") -> Path:
    """A pickle that would create ``marker`` if loaded, as ``run_dir/checkpoint/<name>``."""
    path = run_dir / "checkpoint" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    return path


def _snapshot(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _train(overrides: list[str], *extra: str) -> vt.RunResult:
    return vt.train(vt.load_config(None, [*overrides, *extra]))


def test_planted_pickle_checkpoint_is_never_loaded(tiny_overrides, tmp_path, capsys):
    """Item 1: `train run.resume=true` on a copied run folder refuses its pickle instead of running it."""
    marker = tmp_path / "payload-ran"
    run_dir = tmp_path / "runs" / "copied"
    plant_payload(run_dir, marker)
    # A copied run folder from before run manifests: its config.yaml is a visiontune config (issue 30: a bare
    # checkpoint/ folder is not a run at all, and is refused without being read).
    vt.load_config(None, [*tiny_overrides, *FAST, "method.name=full", "run.name=copied"]).dump(run_dir / "config.yaml")
    assert main(["train", *tiny_overrides, *FAST, "method.name=full", "run.name=copied", "run.resume=true"]) == 2
    err = capsys.readouterr().err
    assert "last.pt is a pickle checkpoint" in err and "not loaded" in err and "run.overwrite=true" in err
    assert not marker.exists()
    # The same pickle under the new checkpoint's name is refused as unreadable: it is parsed, never unpickled.
    (run_dir / "checkpoint" / "last.pt").rename(run_dir / "checkpoint" / "last.safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        _train(tiny_overrides, *FAST, "method.name=full", "run.name=copied", "run.resume=true")
    assert not marker.exists()


def test_checkpoint_round_trip_keeps_types_and_refuses_other_kinds(tmp_path):
    """The safetensors + JSON format restores what a resume needs exactly (int keys, tuples, -inf, RNG bytes)."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.999))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    w = torch.randn(6, 4)
    state = {"optimizer": opt.state_dict(), "best": {"score": -math.inf, "state": None}, "rng": torch.get_rng_state(),
             "views": list(w.split(2)), "odd": {"__tensor__": "not a tag", 3: (1, "a")}}
    path = save_checkpoint(tmp_path / "c" / "last.safetensors", state, kind="train", progress="epoch 1 of 2")
    back = load_checkpoint(path, "train")
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999) and 0 in back["optimizer"]["state"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["best"]["score"] == -math.inf and torch.equal(back["rng"], state["rng"])
    assert all(torch.equal(a, b) for a, b in zip(back["views"], w.split(2)))
    assert back["odd"] == {"__tensor__": "not a tag", 3: (1, "a")}
    with pytest.raises(CheckpointError, match="expected format 1 of kind 'pretrain'"):
        load_checkpoint(path, "pretrain")
    with pytest.raises(TypeError, match=r"state.x is a ndarray"):
        save_checkpoint(tmp_path / "bad.safetensors", {"x": np.zeros(2)}, kind="train")


def test_killed_run_resume_overwrite_rules(tiny_overrides, tmp_path, monkeypatch):
    """Items 2, 4, 5, 6 and the resumed wall time, on one killed run."""
    common = [*tiny_overrides, *FAST, "method.name=full", "run.name=k"]
    real = loop.train_one_epoch
    calls = {"n": 0}

    def killed_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _train(common)
    monkeypatch.setattr(loop, "train_one_epoch", real)
    run_dir = tmp_path / "runs" / "k"
    ckpt = run_dir / "checkpoint" / "last.safetensors"
    before = _snapshot(run_dir)
    assert "checkpoint/last.safetensors" in before and "metrics.json" not in before

    # Item 4: a rerun without run.resume refuses instead of silently restarting from epoch 1.
    with pytest.raises(ConfigError, match=r"unfinished run with a checkpoint at epoch 1 of 2.*run.resume=true.*run.overwrite=true"):
        _train(common)
    # Item 2: a resume with another split / lr / length is refused, naming every differing key; item 3: untouched.
    with pytest.raises(ConfigError) as ei:
        _train(common, "run.resume=true", "data.seed=1", "data.train_per_class=null", "data.train_fraction=0.5",
               "optim.lr=0.5", "optim.epochs=3")
    text = str(ei.value)
    for key in ("data.seed", "data.train_per_class", "data.train_fraction", "optim.lr", "optim.epochs"):
        assert f"  - {key}: " in text, key
    assert "optim.lr: 3e-05 in the stored run, 0.5 now" in text
    assert _snapshot(run_dir) == before

    # Settings that cannot change results may differ; the run then finishes, reporting both segments' time.
    first_wall = load_checkpoint(ckpt, "train")["wall_time_s"]
    res = _train(common, "run.resume=true", f"run.threads={torch.get_num_threads()}")
    train = res.metrics["train"]
    assert [h["epoch"] for h in train["history"]] == [1, 2]
    assert train["segments"] == 2 and train["resumed_after_epoch"] == 1 and train["wall_time_s"] > first_wall
    assert res.metrics["run"]["split"]["sizes"] == {"train": 20, "val": 0, "test": 20}
    assert (run_dir / "history.png").is_file() and "in 2 segments" in (run_dir / "report.md").read_text()

    # Item 5: overwrite starts from an empty directory; item 6: every file is renamed into place.
    replaced: list[str] = []
    real_replace = os.replace

    def spy(src, dst, *a, **k):
        replaced.append(os.path.abspath(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", spy)
    lin = _train([*tiny_overrides, *FAST, "method.name=linear", "run.name=k", "run.overwrite=true"])
    monkeypatch.setattr(os, "replace", real_replace)
    files = _snapshot(run_dir)
    assert "history.png" not in files and not (run_dir / "checkpoint").exists()
    assert "history.png" not in (run_dir / "report.md").read_text()
    assert lin.metrics["run"]["method"] == "linear" and vt.load_config(run_dir / "config.yaml").method.name == "linear"
    assert {str(run_dir / f) for f in files} <= set(replaced), sorted(set(map(str, (run_dir / f for f in files))) - set(replaced))
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary files or trash left


def _folder_dataset(root: Path, per_class: int = 3) -> Path:
    for ci, name in enumerate(("a", "b", "c")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 40 * ci + 5 * i, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_refused_resume_leaves_finished_run_intact_and_checks_the_split(tmp_path):
    """Item 3 (a failing resume rewrote config.yaml, then eval failed) and the split half of item 2."""
    data = _folder_dataset(tmp_path / "imgs")
    common = [f"data.dataset={data}", "data.train_per_class=1", "backbone.name=test_vit", "backbone.weights=none",
              "backbone.img_size=32", "run.progress=false", "run.measure_speed=false", f"run.dir={tmp_path / 'runs'}",
              "run.name=fin", "method.name=linear", "method.c=1.0"]
    res = _train(common)
    before = _snapshot(res.run_dir)
    with pytest.raises(ConfigError, match=r"(?s)method.name: 'linear' in the stored run, 'lora' now"):
        _train([*common[:-2], "method.name=lora", "method.targets=[no_such_module_xyz]", "run.resume=true"])
    assert _snapshot(res.run_dir) == before
    assert vt.evaluate(str(res.run_dir))["accuracy"] == pytest.approx(res.accuracy)
    # Same config, but the folder gained an image: another split, so another run.
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(data / "a" / "new.png")
    with pytest.raises(ConfigError, match=r"data split: 3/0/6 train/val/test images .* in the stored run, 3/0/7"):
        _train(common, "run.resume=true")
    (data / "a" / "new.png").unlink()
    again = _train(common, "run.resume=true")  # finished and unchanged: nothing to do, nothing rewritten
    assert again.accuracy == res.accuracy and _snapshot(res.run_dir) == before


def test_run_name_cannot_leave_run_dir(tmp_path):
    for bad in ("../../x", "a/b", "..", "", "/abs"):
        with pytest.raises(ConfigError, match="must be a plain folder name inside run.dir"):
            vt.load_config(None, ["data.dataset=digits", f"run.name={bad}", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="contradict"):
        vt.load_config(None, ["data.dataset=digits", "run.resume=true", "run.overwrite=true"])


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = write_text_atomic(tmp_path / "metrics.json", '{"done": true}')

    def dies_half_way(tmp: Path) -> None:
        tmp.write_text('{"do')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies_half_way)
    assert path.read_text() == '{"done": true}' and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
