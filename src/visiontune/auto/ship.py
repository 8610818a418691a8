"""Stage 5 of ``visiontune auto``, ship: the winner is retrained on every labeled image (fine-tuning for the median
best number of steps found on the folds, or the regime's whole schedule for one chosen on its prior alone) as a normal run in ``OUT/model`` (``predict``, ``serve``, ``export``,
``eval`` work on it); the test split, when the data has one, is read here, once. ``OUT/leaderboard.md`` / ``.json``
and two plots hold the selection (:mod:`visiontune.auto.report`).
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from visiontune.auto.candidates import Candidate
from visiontune.auto.plan import CHEAP, Task
from visiontune.auto.record import Record
from visiontune.train.loop import train


def final_run(task: Task, record: Record, backbone: str, decision: dict[str, Any],
              candidates: tuple[Candidate, ...]) -> dict[str, Any]:
    """Retrain the decision's candidate (one of ``task.cheap`` or ``candidates``) on the whole pool as
    ``OUT/model``; where it went, what was shipped and why, and its test scores."""
    name = decision["candidate"]
    cand = next(c for c in (*task.cheap, *candidates) if c.name == name)
    extra = [f"run.progress={str(record.progress).lower()}", f"run.dir={record.out}", "run.name=model", "run.overwrite=true"]
    note = ""
    if not cand.cheap and not record.state["finetune"][name]["best_epochs"]:  # chosen on its prior alone
        epochs = task.epochs(len(task.pool))
        extra.append(f"optim.epochs={epochs}")
        note = f"{epochs} epochs: no fold finished, so the regime's schedule for {len(task.pool)} images"
    elif not cand.cheap:
        rec = record.state["finetune"][name]
        best_steps = statistics.median(e * s for e, s in zip(rec["best_epochs"], rec["steps_per_epoch"]))
        epochs = int(round(best_steps / task.steps_per_epoch(len(task.pool))))
        if epochs < 1:
            note = "the folds' best epoch was the probe head itself (epoch 0): the linear probe is shipped instead"
            cand = CHEAP[0]
        else:
            extra.append(f"optim.epochs={epochs}")
            note = f"{epochs} epochs: the median best step count on the folds ({best_steps:.0f} steps) on all {len(task.pool)} images"
    cfg = task.config(backbone, cand.overrides, extra)
    splits = {"train": task.pool, "val": task.pool.subset(np.array([], dtype=int)), "test": task.test}
    result = train(cfg, splits=splits)
    return {"run_dir": str(result.run_dir), "method": cand.name, "note": note, "test": {
        k: result.metrics["test"][k] for k in ("accuracy", "f1_weighted", "f1_macro", "num_samples")
    } if len(task.test) else None}


__all__ = ["final_run"]
