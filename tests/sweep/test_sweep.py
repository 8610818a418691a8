"""Sweeps: grid expansion, failure isolation, skip/resume, aggregation with mean ± std over seeds (tiny models)."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
import yaml

from visiontune.errors import ConfigError
from visiontune.sweep import aggregate, entry_config, load_sweep, mean_std, run_sweep, worker_threads
from visiontune.sweep.report import margin
from visiontune.train import loop

BASE = {
    "data": {"dataset": "digits", "train_per_class": 5, "test_per_class": 8},
    "backbone": {"name": "test_vit", "weights": "none", "img_size": 32},
    "method": {"name": "lora", "rank": 4},
    "optim": {"epochs": 2, "batch_size": 16, "head_init": "zero"},  # no probe-head fit: seconds saved per run
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
    assert "Best configuration:" in report and "Failed runs" in report and "Per-class" in report
    for method in ("full", "linear"):  # mean ± sample std (ddof=1) over the two seeds, in the table
        accs = [float(r["test_accuracy"]) for r in rows if r["method"] == method]
        assert f"{statistics.mean(accs) * 100:.1f} ± {statistics.stdev(accs) * 100:.1f}" in report
    assert "Margin over the linear probe" in report or "The linear probe is the best configuration" in report
    for png in ("accuracy_vs_params", "accuracy_vs_time", "best_confusion", "best_per_class_f1"):
        assert (tmp_path / "out" / f"{png}.png").stat().st_size > 5000
        assert f"]({png}.png)" in report  # embedded in report.md
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["sessions"][-1]["done"] == 4
    from visiontune.sweep import sweep_status

    states = dict(sweep_status(load_sweep(path)))
    assert sorted(states.values())[:4] == ["done"] * 4 and sum(v.startswith("failed") for v in states.values()) == 2
    again = run_sweep(load_sweep(path), progress=False, report=False)
    assert again["done"] == [] and len(again["skipped"]) == 4  # finished runs are not redone (failed ones retried)


def test_killed_sweep_resumes_from_checkpoint(tmp_path, monkeypatch):
    path = _write(tmp_path, runs=[{"method.name": "full"}, {"method.name": "full", "optim.lr": 1e-4}],
                  base=dict(BASE, optim={"epochs": 3, "batch_size": 16, "head_init": "zero"}))
    real = loop.train_one_epoch
    calls = {"n": 0}

    def killed_in_second_run(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # run 1 has 3 epochs; die in epoch 2 of run 2
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_one_epoch", killed_in_second_run)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(load_sweep(path), progress=False, report=False)
    monkeypatch.setattr(loop, "train_one_epoch", real)
    sw = load_sweep(path)
    second = tmp_path / "out" / "runs" / sw.entries[1].name
    assert (second / "checkpoint" / "last.safetensors").exists() and not (second / "metrics.json").exists()
    out = run_sweep(sw, progress=False, report=False)
    assert out["skipped"] == [sw.entries[0].name] and out["done"] == [sw.entries[1].name]
    m = json.loads((second / "metrics.json").read_text())
    assert len(m["train"]["history"]) == 3


def test_margin_combines_test_set_and_seed_uncertainty():
    def group(accs, n_test=100):
        m, sd = mean_std(accs)
        return {"runs": [{"seed": i, "test_accuracy": a} for i, a in enumerate(accs)], "n": len(accs),
                "acc_mean": m, "acc_std": sd, "test_size": n_test}

    one = margin(group([0.6]), group([0.5]))
    assert one["margin"] == pytest.approx(0.1) and one["se_seed"] == 0.0
    assert one["se"] == pytest.approx(math.sqrt(0.6 * 0.4 / 100 + 0.5 * 0.5 / 100))
    paired = margin(group([0.60, 0.64, 0.62]), group([0.50, 0.52, 0.54]))  # per-seed differences 0.10, 0.12, 0.08
    assert paired["se_seed"] == pytest.approx(statistics.stdev([0.10, 0.12, 0.08]) / math.sqrt(3))
    assert paired["se"] == pytest.approx(math.hypot(paired["se_test"], paired["se_seed"]))


def test_parallel_workers_match_sequential(tmp_path):
    """--workers 2: each run in its own process with cores//2 threads, same results as one after another."""
    spec = {"base": BASE, "seeds": [0, 1], "runs": [{"method.name": "full", "optim.epochs": 1}]}
    paths = {}
    for mode in ("seq", "par"):
        paths[mode] = tmp_path / f"{mode}.yaml"
        paths[mode].write_text(yaml.safe_dump({**spec, "dir": str(tmp_path / mode)}))
    seq = run_sweep(load_sweep(paths["seq"]), progress=False, report=False)
    par = run_sweep(load_sweep(paths["par"]), progress=False, workers=2, report=False)
    assert sorted(par["done"]) == sorted(seq["done"]) and len(par["done"]) == 2 and not par["failed"]
    for name in seq["done"]:
        a, b = (json.loads((tmp_path / mode / "runs" / name / "metrics.json").read_text()) for mode in ("seq", "par"))
        assert a["test"]["confusion"] == b["test"]["confusion"]
        assert a["train"]["history"][0]["train_loss"] == pytest.approx(b["train"]["history"][0]["train_loss"], rel=1e-4)
        threads = yaml.safe_load((tmp_path / "par" / "runs" / name / "config.yaml").read_text())["run"]["threads"]
        assert threads == worker_threads(2)
    session = json.loads((tmp_path / "par" / "sweep.json").read_text())["sessions"][-1]
    assert session["workers"] == 2 and session["done"] == 2


def test_cli_status_report_and_workers_flag(tmp_path, capsys):
    from visiontune.cli import main

    path = _write(tmp_path, grid={"method.name": ["linear", "full"]})
    assert main(["sweep", "status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "method=linear" in out and "pending" in out and "0/2 done" in out
    assert main(["sweep", str(path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == ["ok        method=linear", "ok        method=full"] and lines[-1].startswith("all 2 checked runs valid")
    assert main(["sweep", "report", str(path)]) == 0  # nothing finished yet: a report saying so, no crash
    assert "0 of 2 runs finished" in (tmp_path / "out" / "report.md").read_text()
    assert worker_threads(3, cores=16) == 5 and worker_threads(4, cores=2) == 1


def _fake_run(run_dir, method, accs_seed, seed, target=None, rank=None, trainable=1000, n_test=100):
    """A finished run directory as train() writes it (metrics.json + config.yaml), with chosen scores."""
    acc = accs_seed[seed]
    classes = ["a", "b"]
    per_class = {c: {"precision": acc, "recall": acc, "f1": acc + 0.01 * i, "support": n_test // 2} for i, c in enumerate(classes)}
    right = round(acc * n_test / 2)
    metrics = {
        "run": {"name": run_dir.name, "method": method, "method_detail": method, "backbone": "test_vit", "weights": "none",
                "dataset": "digits", "classes": classes, "train_size": 10, "val_size": 0, "test_size": n_test, "seed": seed},
        "params": {"trainable": trainable, "total": 10_000, "trainable_pct": trainable / 100},
        "train": {"wall_time_s": 10.0 + seed, "epochs": 1},
        "test": {"accuracy": acc, "f1_weighted": acc - 0.05, "f1_macro": acc - 0.05, "per_class": per_class,
                 "confusion": [[right, n_test // 2 - right], [n_test // 2 - right, right]]},
    }
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    method_cfg = {"name": method, **({"targets": [target], "rank": rank} if target else {})}
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"method": method_cfg, "data": {"test_per_class": None}}))


def test_aggregate_table_mean_std_and_margin_sentence(tmp_path):
    grid = {"linear": [0.50, 0.52, 0.54], "q": [0.60, 0.64, 0.62], "all-linear": [0.55, 0.55, 0.56]}
    path = _write(tmp_path, seeds=[0, 1, 2], runs=[{"method.name": "linear"}],
                  grid={"method.name": ["lora"], "method.targets": [["q"], ["all-linear"]], "method.rank": [8]})
    sw = load_sweep(path)
    for e in sw.entries:
        target = e.overrides.get("method.targets", [None])[0]
        _fake_run(sw.dir / "runs" / e.name, e.overrides["method.name"], grid[target or "linear"], e.seed, target,
                  8 if target else None)
    report = aggregate(sw).read_text()
    assert "| lora | q | 8 | 1.0K | 10.00% | 11.0 s ± 1.0 s | **62.0 ± 2.0** | 0.570 ± 0.020 | 3 |" in report
    assert "| linear | — | — |" in report and "52.0 ± 2.0" in report
    se = math.hypot(math.sqrt(0.62 * 0.38 / 100 + 0.52 * 0.48 / 100), statistics.stdev([0.10, 0.12, 0.08]) / math.sqrt(3))
    assert f"**+10.0 ± {se * 100:.1f} points**" in report and "not a demonstrated improvement" in report
    assert "Best configuration: lora · q · r8" in report and "| b | 0.620 ± 0.020 |" in report
    rows = list(csv.DictReader(open(sw.dir / "results.csv")))
    assert len(rows) == 9 and {(r["target"], r["rank"]) for r in rows} == {("", ""), ("q", "8"), ("all-linear", "8")}


def test_unreadable_metrics_is_not_done_and_changed_overrides_are_refused(tmp_path, capsys):
    """Issue 18 items 6 and 2: a truncated metrics.json is "not done" (named), and a sweep rerun with other
    overrides is refused instead of skipping runs made with the old ones under the new command."""
    from visiontune.cli import main
    from visiontune.sweep import sweep_status

    path = _write(tmp_path, runs=[{"method.name": "linear"}])
    first = run_sweep(load_sweep(path), progress=False, report=False)
    name = first["done"][0]
    metrics = tmp_path / "out" / "runs" / name / "metrics.json"
    text = metrics.read_text()
    metrics.write_text(text[: len(text) // 2])  # a write cut short (the old in-place writes left such files)
    (state,) = (s for _, s in sweep_status(load_sweep(path)))
    assert state.startswith("not done") and "metrics.json is unreadable (JSONDecodeError" in state
    assert main(["sweep", "status", str(path)]) == 0 and "0/1 done" in capsys.readouterr().out
    report = aggregate(load_sweep(path)).read_text()  # no JSONDecodeError: the run is listed as unreadable
    assert "0 of 1 runs finished" in report and f"`{name}`: " in report and "metrics.json is unreadable" in report
    again = run_sweep(load_sweep(path), progress=False, report=False)
    assert again["done"] == [name] and json.loads(metrics.read_text())["test"]["accuracy"] >= 0
    assert dict(sweep_status(load_sweep(path)))[name] == "done"

    sessions = len(json.loads((tmp_path / "out" / "sweep.json").read_text())["sessions"])
    changed = load_sweep(path, overrides=["data.seed=1"])
    with pytest.raises(ConfigError, match=rf"(?s)1 existing run\(s\) were made with another configuration.*{name}: "
                                          r"data.seed: 0 in the stored run, 1 now"):
        run_sweep(changed, progress=False, report=False)
    assert len(json.loads((tmp_path / "out" / "sweep.json").read_text())["sessions"]) == sessions  # nothing logged
    assert dict(sweep_status(changed))[name].startswith("changed: made with another configuration (data.seed")


def test_sweep_never_loads_a_planted_pickle(tmp_path):
    """Issue 18 item 1: a copied sweep folder whose run holds a pickle checkpoint: the run is refused, nothing runs."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "payload-ran"), "w"))

    path = _write(tmp_path, runs=[{"method.name": "full"}])
    sw = load_sweep(path)
    ck = tmp_path / "out" / "runs" / sw.entries[0].name / "checkpoint"
    ck.mkdir(parents=True)
    (ck / "last.pt").write_bytes(pickle.dumps(Payload()))
    # A copied run from before run manifests holds its config.yaml (issue 30: a bare checkpoint/ is not a run).
    from visiontune.sweep import resolved_entry_config

    resolved_entry_config(sw, sw.entries[0]).dump(ck.parent / "config.yaml")
    assert sweep_status_of(sw).startswith("partial (an old pickle checkpoint/last.pt, which is not loaded")
    out = run_sweep(sw, progress=False, report=False)
    assert "last.pt is a pickle checkpoint" in out["failed"][sw.entries[0].name]
    (ck / "last.pt").rename(ck / "last.safetensors")
    out = run_sweep(sw, progress=False, report=False)
    assert "not a readable safetensors file" in out["failed"][sw.entries[0].name]
    assert not (tmp_path / "payload-ran").exists()


def sweep_status_of(sw) -> str:
    from visiontune.sweep import sweep_status

    return sweep_status(sw)[0][1]
