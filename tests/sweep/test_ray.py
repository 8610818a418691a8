"""Sweeps on Ray (issue 19 part 3): a 4-run sweep on a local Ray instance; a worker killed mid-run is recorded
as that run's failure, and the rerun skips the finished runs and resumes the killed one from its checkpoint to
the result an uninterrupted run gets."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch
import yaml

from visiontune.errors import ConfigError
from visiontune.sweep import entry_config, load_sweep, run_sweep, worker_record_path
from visiontune.sweep.cluster import plan_resources

ray = pytest.importorskip("ray", reason="the Ray executor needs the 'cluster' extra")

BASE = {
    "data": {"dataset": "digits", "train_per_class": 3, "test_per_class": 4},
    "backbone": {"name": "test_vit", "weights": "none", "img_size": 32},
    "method": {"name": "lora", "rank": 4},
    # One thread everywhere, so the Ray workers and the in-process reference compute bit for bit alike.
    "optim": {"epochs": 1, "batch_size": 16, "head_init": "zero"},
    "run": {"progress": False, "measure_speed": False, "threads": 1},
}
LONG = {"method.name": "full", "optim.epochs": 25}  # long enough to be killed after its first checkpoint


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (starting one costs seconds); run_sweep joins it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _kill_when_checkpointed(sweep_dir, name, out: dict, stop: threading.Event) -> None:
    """Wait for the run's worker record and first checkpoint, then SIGKILL the worker process it names.

    No clock: it waits as long as the sweep runs (``stop`` is set when run_sweep returns), however slow the machine,
    so the only way to miss the kill is for the long run to finish first, which the test reports as such.
    """
    record = worker_record_path(sweep_dir, name)
    ckpt = sweep_dir / "runs" / name / "checkpoint" / "last.safetensors"
    while not stop.is_set():
        if record.exists() and ckpt.exists():
            pid = json.loads(record.read_text())["pid"]
            out["pid"] = pid
            out["finished_first"] = (sweep_dir / "runs" / name / "metrics.json").exists()
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.01)


def test_ray_sweep_survives_a_killed_worker_and_resumes(local_ray, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "base": BASE, "dir": str(tmp_path / "out"), "seeds": [0],
        "runs": [{"method.name": "lora"}, {"method.name": "full"}, {"method.name": "linear"}, LONG],
    }))
    sweep = load_sweep(path)
    assert len(sweep.entries) == 4
    long_name = sweep.entries[3].name
    killed: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_when_checkpointed, args=(sweep.dir, long_name, killed, stop), daemon=True)
    killer.start()
    try:
        first = run_sweep(sweep, progress=False, report=False, executor="ray", cpus_per_run=1)
    finally:
        stop.set()
        killer.join()
    assert killed.get("pid") and not killed["finished_first"], "the long run ended before it could be killed"
    assert sorted(first["done"]) == sorted(e.name for e in sweep.entries[:3])
    assert list(first["failed"]) == [long_name] and "Ray worker running this run died" in first["failed"][long_name]
    failures = json.loads((sweep.dir / "failures.json").read_text())
    assert list(failures) == [long_name]
    session = json.loads((sweep.dir / "sweep.json").read_text())["sessions"][-1]
    assert session["executor"] == "ray" and session["cpus_per_run"] == 1 and session["cluster"]["CPU"] == 2
    ckpt_dir = sweep.dir / "runs" / long_name
    assert (ckpt_dir / "checkpoint" / "last.safetensors").exists() and not (ckpt_dir / "metrics.json").exists()

    again = run_sweep(load_sweep(path), progress=False, report=True, executor="ray", cpus_per_run=1)
    assert again["done"] == [long_name] and sorted(again["skipped"]) == sorted(first["done"]) and not again["failed"]
    assert json.loads((sweep.dir / "failures.json").read_text()) == {}
    assert not (sweep.dir / "workers" / f"{long_name}.json").exists()
    resumed = json.loads((ckpt_dir / "metrics.json").read_text())
    assert resumed["train"]["resumed_after_epoch"] >= 1 and resumed["train"]["segments"] == 2
    assert len(resumed["train"]["history"]) == LONG["optim.epochs"]
    assert "on Ray (the Ray instance this process joined" in (sweep.dir / "report.md").read_text()

    # The same run without interruption (in this process, one thread): the resumed run ends where it would have.
    import visiontune as vt

    cfg = entry_config(sweep.base, sweep.entries[3], tmp_path / "reference")
    threads = torch.get_num_threads()
    try:
        reference = vt.train(cfg).metrics
    finally:
        torch.set_num_threads(threads)
    assert resumed["test"]["confusion"] == reference["test"]["confusion"]
    for a, b in zip(resumed["train"]["history"], reference["train"]["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6, abs=1e-7)


def test_resource_plan_and_errors(tmp_path, capsys):
    assert plan_resources({"CPU": 16, "GPU": 4}, ["auto"], None, None) == (4, 1.0)  # one run per GPU, a GPU's CPUs
    assert plan_resources({"CPU": 16, "GPU": 4}, ["cpu"], None, None) == (4, 0.0)  # CPU runs take no GPU
    assert plan_resources({"CPU": 2}, ["auto"], None, None) == (2, 0.0)  # the default 4 CPUs, capped at the cluster's
    assert plan_resources({"CPU": 8}, ["auto"], 2, None) == (2, 0.0)
    with pytest.raises(ConfigError, match=r"--cpus-per-run 9 but the Ray cluster has 8 CPUs.*--cpus-per-run 8 or less"):
        plan_resources({"CPU": 8}, ["auto"], 9, None)
    with pytest.raises(ConfigError, match=r"--gpus-per-run 1 but the Ray cluster has 0 GPUs"):
        plan_resources({"CPU": 8}, ["auto"], None, 1)
    with pytest.raises(ConfigError, match="applies to the Ray executor only"):
        run_sweep(None, cpus_per_run=2)  # type: ignore[arg-type]  # refused before the sweep is looked at
    with pytest.raises(ConfigError, match="executor 'dask' is not one of local, ray"):
        run_sweep(None, executor="dask")  # type: ignore[arg-type]
    from visiontune.cli import main

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "dir": str(tmp_path / "out"), "runs": [{"method.name": "linear"}]}))
    assert main(["sweep", str(path), "--cpus-per-run", "2"]) == 2
    assert "cpus_per_run=2 applies to the Ray executor only; add --executor ray" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written
