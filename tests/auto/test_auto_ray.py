"""``visiontune auto --executor ray`` (issues 17 and 19): folds as Ray tasks on a local instance, side by side, scored
exactly as in one process; a fold whose worker is killed is that candidate's failure, and the rerun retries it."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from visiontune.auto import AutoSelect, AutoSettings, Candidate
from visiontune.errors import ConfigError

ray = pytest.importorskip("ray", reason="the Ray executor needs the 'cluster' extra")
psutil = pytest.importorskip("psutil")

# One torch thread everywhere, so the Ray workers and this process compute bit for bit alike.
TINY = ["backbone.name=test_vit", "backbone.weights=none", "data.train_per_class=4", "data.test_per_class=3", "optim.epochs=2", "run.threads=1"]
TWO = (
    Candidate("lora q,v r4", ("method.name=lora", "method.targets=qv", "method.rank=4")),
    Candidate("lora q,v r2", ("method.name=lora", "method.targets=qv", "method.rank=2")),
)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local Ray instance of 2 CPUs for the module; the selections join it.

    Its two workers are started and warmed first (two tasks that meet, so they run on two workers at once), so a
    test that times folds side by side does not time a worker's start: Ray reuses the idle workers for the folds.
    """
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    def _meet(where: str, n: int) -> int:
        """A Ray task that imports what a fold imports, then waits until ``n`` such tasks are running at once."""
        import visiontune.train.loop  # noqa: F401  (torch, timm, peft: a fold's imports, paid here once)

        Path(where, str(os.getpid())).touch()
        while len(os.listdir(where)) < n:  # no clock: Ray starts the other worker (2 CPUs), however slowly
            time.sleep(0.05)
        return os.getpid()

    where = str(tmp_path_factory.mktemp("meet"))
    meet = ray.remote(num_cpus=1, max_retries=0)(_meet)
    assert len(set(ray.get([meet.remote(where, 2) for _ in range(2)]))) == 2
    yield ray
    ray.shutdown()


def _select(out: Path, **kw) -> AutoSelect:
    kw.setdefault("candidates", TWO)
    kw.setdefault("folds", 2)
    return AutoSelect("digits", out, AutoSettings(progress=False, **kw), overrides=TINY)


def test_ray_folds_run_side_by_side_and_score_like_one_process(local_ray, tmp_path: Path) -> None:
    # 60 epochs of 2 steps: each fold trains for a few seconds, on one of the two workers the fixture warmed
    here = _select(tmp_path / "local", steps=120, prune=False)
    there = _select(tmp_path / "ray", steps=120, prune=False, executor="ray", cpus_per_run=1)
    here.run()
    there.run()
    facts = json.loads((tmp_path / "ray" / "auto.json").read_text())["executor"]
    assert facts["executor"] == "ray" and facts["in_flight"] == 2 and facts["cpus_per_run"] == 1
    assert "executor" not in json.loads((tmp_path / "local" / "auto.json").read_text())
    for name in (c.name for c in TWO):
        ra, rb = (here.record.state["finetune"][name], there.record.state["finetune"][name])
        assert rb["status"] == "complete" and len(rb["folds"]) == 2
        assert [f["confusion"] for f in ra["folds"]] == [f["confusion"] for f in rb["folds"]]
        assert ra["best_epochs"] == rb["best_epochs"]
    # Both candidates' first folds ran at the same time: each began before the other ended.
    spans = []
    for name in ("lora-q-v-r4-fold1", "lora-q-v-r2-fold1"):
        m = json.loads((tmp_path / "ray" / "folds" / name / "metrics.json").read_text())
        end = (tmp_path / "ray" / "folds" / name / "metrics.json").stat().st_mtime
        spans.append((end - m["train"]["wall_time_s"], end))
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]


def _kill_running_fold(stop: threading.Event, ckpt: Path, out: dict) -> None:
    """Once ``ckpt`` exists, SIGKILL the Ray worker running a fold (its process title is ``ray::run_fold``)."""
    while not stop.is_set():
        if ckpt.exists():
            for p in psutil.process_iter(["cmdline"]):
                if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::run_fold"):
                    p.kill()
                    out["pid"] = p.pid
                    return
        time.sleep(0.01)


def test_a_killed_fold_worker_fails_its_candidate_and_the_rerun_retries_it(local_ray, tmp_path: Path) -> None:
    long = (Candidate("full", ("method.name=full",)), TWO[1])
    out = tmp_path / "sel"
    stop, killed = threading.Event(), {}
    killer = threading.Thread(target=_kill_running_fold, daemon=True,
                              args=(stop, out / "folds" / "full-fold1" / "checkpoint" / "last.safetensors", killed))
    killer.start()
    try:  # one fold at a time, so the fold running when the checkpoint appears is the long candidate's
        first = _select(out, candidates=long, steps=120, executor="ray", cpus_per_run=1, max_in_flight=1).run()
    finally:
        stop.set()
        killer.join()
    assert killed.get("pid"), "the long fold ended before it could be killed"
    rows = {r["candidate"]: r for r in first["leaderboard"]}
    assert rows["full"]["status"] == "failed" and not rows["full"]["eligible"]
    assert "worker" in json.loads((out / "auto.json").read_text())["finetune"]["full"]["why"]
    assert "'failed' = the worker training one of its folds died" in (out / "leaderboard.md").read_text()
    assert rows[TWO[1].name]["status"] in ("complete", "pruned")
    assert first["decision"]["candidate"] != "full"

    again = _select(out, candidates=long, steps=120, executor="ray", cpus_per_run=1).run()
    rows = {r["candidate"]: r for r in again["leaderboard"]}
    # Retrained: scored again at the first rung a third into fold 1, and on the folds if it went on from there.
    assert rows["full"]["status"] in ("complete", "pruned") and (rows["full"]["folds"] >= 1 or "first_rung" in rows["full"])


def test_ray_options_need_the_ray_executor(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cpus_per_run=2 applies to the Ray executor only"):
        _select(tmp_path, cpus_per_run=2)
    with pytest.raises(ConfigError, match="executor 'dask' is not one of local, ray"):
        _select(tmp_path, executor="dask")
