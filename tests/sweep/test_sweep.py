"""Sweeps: grid expansion, failure isolation, skip/resume, aggregation with mean ± std over seeds (tiny models)."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from visiontune.errors import ConfigError
from visiontune.sweep import entry_config, load_sweep, run_sweep
from visiontune.train import loop

BASE = {
    "data": {"dataset": "digits", "train_per_class": 5, "test_per_class": 8},
    "backbone": {"name": "test_vit", "weights": "none", "img_size": 32},
    "method": {"name": "lora", "rank": 4},
    "optim": {"epochs": 2, "batch_size": 16},
    "run": {"progress": False, "measure_speed": False},
}


def _write(tmp_path, **spec):
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump({"base": BASE, "dir": str(tmp_path / "out"), **spec}))
    return p


def test_expansion_runs_grid_and_seeds(tmp_path):
    sw = load_sweep(_write(tmp_path, seeds=[0, 1], runs=[{"method.name": "linear"}],
                           grid={"method.name": ["lora", "dora"], "method.rank": [2, 8]}))
    names = [e.name for e in sw.entries]
    assert len(names) == (1 + 4) * 2 and len(set(names)) == len(names)
    assert "method=dora__rank=8__seed=1" in names
    linear = next(e for e in sw.entries if e.overrides == {"method.name": "linear"})
    cfg = entry_config(sw.base, linear, sw.dir)
    assert cfg.method.name == "linear" and not hasattr(cfg.method, "rank")  # the base's LoRA options were dropped
    dora = next(e for e in sw.entries if e.overrides.get("method.name") == "dora" and e.overrides["method.rank"] == 2)
    cfg = entry_config(sw.base, dora, sw.dir)
    assert cfg.method.rank == 2 and cfg.run.seed == dora.seed and cfg.run.name == dora.name


def test_entries_do_not_leak_overrides_into_each_other(tmp_path):
    sw = load_sweep(_write(tmp_path, runs=[{"method.name": "scratch", "backbone.name": "test_resnet"},
                                           {"method.name": "linear"}]))
    first, second = (entry_config(sw.base, e, sw.dir) for e in sw.entries)
    assert first.backbone.name == "test_resnet" and second.backbone.name == "test_vit"
    assert sw.base["backbone"]["name"] == "test_vit"


def test_invalid_entries_reported_together(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_sweep(_write(tmp_path, grid={"method.name": ["lora", "lorra"], "optim.epochs": [1, "x"]}))
    text = str(ei.value)
    assert "method=lorra" in text and "optim.epochs='x' should be an integer" in text


def test_failure_isolated_then_skip_and_aggregate(tmp_path):
    path = _write(tmp_path, seeds=[0, 1], runs=[{"method.name": "linear"}, {"method.name": "full"},
                                                 {"method.name": "lora", "method.targets": ["no_such_module_xyz"]}])
    out = run_sweep(load_sweep(path), progress=False)
    assert len(out["done"]) == 4 and len(out["failed"]) == 2
    assert all("no_such_module_xyz" in v for v in out["failed"].values())
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert len(rows) == 4 and {r["method"] for r in rows} == {"linear", "full"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "±" in report and "Best:" in report and "Failed runs" in report and "Per-class" in report
    accs = [float(r["test_accuracy"]) for r in rows if r["method"] == "full"]
    mean = sum(accs) / 2
    assert f"{mean * 100:.1f} ±" in report
    assert (tmp_path / "out" / "accuracy_vs_params.png").is_file()
    from visiontune.sweep import sweep_status

    states = dict(sweep_status(load_sweep(path)))
    assert sorted(states.values())[:4] == ["done"] * 4 and sum(v.startswith("failed") for v in states.values()) == 2
    again = run_sweep(load_sweep(path), progress=False)
    assert again["done"] == [] and len(again["skipped"]) == 4  # finished runs are not redone (failed ones retried)


def test_killed_sweep_resumes_from_checkpoint(tmp_path, monkeypatch):
    path = _write(tmp_path, runs=[{"method.name": "full"}, {"method.name": "full", "optim.lr": 1e-4}],
                  base=dict(BASE, optim={"epochs": 3, "batch_size": 16}))
    real = loop.train_one_epoch
    calls = {"n": 0}

    def killed_in_second_run(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # run 1 has 3 epochs; die in epoch 2 of run 2
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_one_epoch", killed_in_second_run)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(load_sweep(path), progress=False)
    monkeypatch.setattr(loop, "train_one_epoch", real)
    sw = load_sweep(path)
    second = tmp_path / "out" / "runs" / sw.entries[1].name
    assert (second / "checkpoint" / "last.pt").exists() and not (second / "metrics.json").exists()
    out = run_sweep(sw, progress=False)
    assert out["skipped"] == [sw.entries[0].name] and out["done"] == [sw.entries[1].name]
    m = json.loads((second / "metrics.json").read_text())
    assert len(m["train"]["history"]) == 3
