"""Where ``visiontune auto`` trains its folds: in this process, one after another, or as Ray tasks.

A fold is one candidate trained on one cross-validation fold (:func:`run_fold`). The selection hands folds to
an executor and takes their results back as they finish; successive halving, the budget and the record of
finished folds stay in the driver (:class:`visiontune.auto.AutoSelect`), so both executors choose the same way
and a killed selection continues the same way whichever ran it.

* ``local`` (default): one fold at a time, in this process.
* ``ray``: each fold a Ray task reserving ``cpus_per_run`` CPUs (also its torch threads) and ``gpus_per_run``
  GPUs, as many at once as the cluster holds (:func:`visiontune.sweep.cluster.ray_session`). Folds of different
  candidates run side by side; a candidate's folds still run in order, one at a time, so its running fold mean
  is what Optuna's successive-halving pruner (asynchronous by design: ASHA) compares at each rung. A fold whose
  worker dies is recorded as that candidate's failure (a rerun retries it); an error raised by the training
  itself stops the selection as it does locally. The cheap stage (one feature pass per backbone) and the final
  retrain run in the driver. On a multi-node cluster every node needs the data and visiontune; the fold
  folders are written under ``OUT/folds`` on the node that trains them, so use a shared filesystem (or an
  absolute ``--out`` every node can write) to keep them.

Written by hand: only this dispatch; the scheduling of tasks onto machines is Ray's.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

def run_fold(
    overrides: list[str], splits: dict[str, Any], deadline: float | None, cwd: str | None = None, pause_after: int | None = None,
    clock: Callable[[], float] = time.time, head_features: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Train one candidate on one fold; its held-out scores, the optimizer steps it took and its wall time.

    Module level, so that a Ray worker imports it by name. ``splits`` holds the fold's training, inner
    validation and held-out records (``test``). With ``pause_after``, training stops once that epoch is
    checkpointed and the held-out scores are those of the model at that point (``"paused": True``); the same
    overrides with ``run.resume=true`` continue the fold later. When the next optimizer step would end past ``deadline``
    (:func:`next_step_s`), training stops before it (``"stopped": True``) and the last epoch's checkpoint, if there is one, is
    scored the same way (``row`` is None when the first epoch had not ended): the fold's partial evidence.
    ``steps`` counts this call's optimizer steps, ``job_s`` is this call's own time by ``clock``, and ``curve`` the
    fold's learning curve so far (per epoch: training loss, and validation accuracy where the fold validates).
    ``head_features``: the backbone's features of the fold's training images, for its LP-FT head
    (``train(head_features=...)``).
    """
    from visiontune.checkpoint import checkpoint_path, load_checkpoint
    from visiontune.config import load_config
    from visiontune.errors import TrainingPaused, TrainingStopped
    from visiontune.train.loop import score_checkpoint, train

    t0 = clock()
    if cwd is not None and os.path.isdir(cwd):
        os.chdir(cwd)  # relative data paths and --out mean what they mean on the driver
    cfg = load_config(None, overrides=overrides)
    steps = [0]
    marks: list[float] = []  # the clock after each optimizer step

    def stop() -> bool:  # asked after every optimizer step: counts them, and ends the fold before the deadline
        steps[0] += 1
        marks.append(clock())
        return deadline is not None and (marks[-1] >= deadline or marks[-1] + next_step_s(marks) > deadline)

    def partial(paused: bool) -> dict[str, Any]:
        run_dir = Path(cfg.run.dir) / cfg.run.name
        if not checkpoint_path(run_dir).is_file():
            return {"row": None, "paused": paused, "stopped": not paused, "epoch": 0, "epochs": cfg.optim.epochs,
                    "steps": steps[0], "curve": [], "job_s": clock() - t0}
        ck = load_checkpoint(checkpoint_path(run_dir), "train")
        m = score_checkpoint(cfg, run_dir, splits["test"])
        return {"row": {k: m[k] for k in ("accuracy", "f1_weighted", "f1_macro", "confusion")}, "paused": paused,
                "stopped": not paused, "epoch": int(ck["epoch"]), "epochs": cfg.optim.epochs, "steps": steps[0],
                "curve": _curve(ck["history"]), "job_s": clock() - t0}

    try:
        result = train(cfg, splits=splits, stop=stop, pause_after=pause_after, head_features=head_features)
    except TrainingPaused:
        return partial(True)
    except TrainingStopped:
        return partial(False)
    m = result.metrics
    row = {k: m["test"][k] for k in ("accuracy", "f1_weighted", "f1_macro", "confusion")}
    row["train_s"] = m["train"]["wall_time_s"]
    return {
        "row": row, "best_epoch": int(m["train"]["best_epoch"]), "paused": False, "stopped": False, "steps": steps[0],
        "job_s": clock() - t0, "steps_per_epoch": math.ceil(len(splits["train"]) / cfg.optim.batch_size),
        "trainable_pct": m["params"]["trainable_pct"], "curve": _curve(m["train"]["history"]), "epochs": cfg.optim.epochs,
    }


def next_step_s(marks: list[float]) -> float:
    """What the next optimizer step is expected to take: the median gap between the clock readings after the steps
    so far (0 before two), so that a fold stops before the step that would cross its deadline rather than after it,
    and a budget is overrun by the scoring's error at most, not by a step (a minute on a loaded CPU). The median
    leaves out the gaps an epoch's end adds (validation, the checkpoint)."""
    if len(marks) < 2:
        return 0.0
    return statistics.median(b - a for a, b in zip(marks, marks[1:]))


def _curve(history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The per-epoch numbers of a learning curve that a later look (or a learned prior) can use."""
    keep = ("epoch", "train_loss", "val_accuracy", "val_loss")
    return [{k: row[k] for k in keep if k in row} for row in history]


class LocalFolds:
    """One fold at a time, in this process: ``wait_one`` trains the fold ``submit`` handed over."""

    facts = {"executor": "local"}
    threads: int | None = None

    def __init__(self) -> None:
        self.pending: tuple[Any, tuple[Any, ...]] | None = None

    @property
    def free(self) -> bool:
        return self.pending is None

    @property
    def busy(self) -> list[Any]:
        return [] if self.pending is None else [self.pending[0]]

    def submit(self, key: Any, *args: Any) -> None:
        self.pending = (key, args)

    def wait_one(self) -> tuple[Any, Any, str | None]:
        assert self.pending is not None
        (key, args), self.pending = self.pending, None
        return key, run_fold(*args), None

    def cancel(self) -> None:
        self.pending = None


@contextmanager
def fold_executor(
    executor: str, device: str, address: str | None = None, cpus_per_run: int | None = None,
    gpus_per_run: float | None = None, max_in_flight: int | None = None,
) -> Iterator[Any]:
    """A :class:`LocalFolds` or a :class:`~visiontune.sweep.cluster.RayTasks` of :func:`run_fold`, with
    ``facts`` (where and how folds run) and ``threads`` (the torch threads each Ray fold is given)."""
    if executor == "local":
        yield LocalFolds()
        return
    from visiontune.sweep.cluster import RayTasks, ray_session

    with ray_session(address, [device], cpus_per_run, gpus_per_run) as (ray, facts):
        limit = max_in_flight or facts["slots"]
        tasks = RayTasks(ray, run_fold, facts["cpus_per_run"], facts["gpus_per_run"], limit, {**facts, "in_flight": limit})
        try:
            yield tasks
        finally:
            tasks.cancel()
