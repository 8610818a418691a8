"""The anytime budget's arithmetic for ``visiontune auto`` (the policy is :mod:`visiontune.auto.schedule`'s): how
many seconds a fine-tuning job may use once the final retrain's reserve is kept back, and what that reserve is,
from the step times measured so far."""

from __future__ import annotations

import statistics
from typing import Any

from visiontune.auto.candidates import Candidate
from visiontune.auto.leaderboard import judgeable_if_stopped
from visiontune.auto.plan import Task
from visiontune.auto.record import Record
from visiontune.auto.schedule import StepTimes
from visiontune.auto.settings import FINAL_RESERVE


class Budget:
    """``budget_s`` seconds (None: no budget) for the selection ``record`` keeps on ``task``."""

    def __init__(self, task: Task, record: Record, budget_s: float | None):
        self.task, self.record, self.budget_s = task, record, budget_s

    def cheap_final_s(self, backbone: str) -> float:
        """The final run's passes over the images (the probe's features of the pool, then the test split), measured
        by the cheap stage's feature pass: the whole final retrain of a cheap candidate, the fixed part of a fine-tune's."""
        task = self.task
        feat_s = float(self.record.state["cheap"][backbone].get("feature_s", 0.0))
        return feat_s * (len(task.pool) + len(task.test)) / len(task.pool)

    def final_s(self, backbone: str, cand: Candidate, times: StepTimes, margin: float = FINAL_RESERVE) -> float:
        """The final retrain of ``cand`` on every labeled image, from its measured step time: the median best step
        count of its folds (or, before any, a fold's whole schedule), its steps with ``margin`` (the reserve's,
        :data:`FINAL_RESERVE`, unless asked for the estimate itself with 1)."""
        rec = self.record.state["finetune"].get(cand.name, {})
        if rec.get("best_epochs"):
            steps = statistics.median(e * s for e, s in zip(rec["best_epochs"], rec["steps_per_epoch"]))
        else:
            n = len(self.task.fold_splits(0)["train"])
            steps = self.task.epochs(n) * self.task.steps_per_epoch(n)
        return self.cheap_final_s(backbone) + margin * steps * times.step_s(cand)

    def time_left(self, backbone: str, cand: Candidate, completes: bool, times: StepTimes,
                  candidates: tuple[Candidate, ...], prior_pick: Candidate | None = None) -> float | None:
        """Seconds of the budget a job of ``cand`` may use: what is left less the final retrain's reserve, for the
        dearest candidate that could be shipped after it: one the decision could judge on its folds (complete, or
        :data:`~visiontune.auto.leaderboard.MIN_PAIRED_FOLDS` folds finished and not pruned), ``cand`` if this job
        ``completes`` it, and ``prior_pick``, the one the prior alone would choose
        (:func:`~visiontune.auto.leaderboard.prior_pick`); else the cheap candidates' retrain (``candidates``: those
        of the stage). None without a budget."""
        budget_s = self.budget_s
        if budget_s is None:
            return None
        state = self.record.state["finetune"]
        shippable = [c for c in candidates if judgeable_if_stopped(state.get(c.name, {})) or (completes and c == cand) or c == prior_pick]
        reserve = max([self.cheap_final_s(backbone), *(self.final_s(backbone, c, times) for c in shippable)])
        return budget_s - self.record.elapsed() - reserve

    def score_s(self, backbone: str, splits: dict[str, Any]) -> float:
        """Time to score a stopped fold's checkpoint on its held-out part (a model build and one forward pass; taken
        as two feature passes over those images), kept back from the fold's deadline."""
        feat_s = float(self.record.state["cheap"][backbone].get("feature_s", 0.0))
        return 2 * feat_s * len(splits["test"]) / len(self.task.pool)


__all__ = ["Budget"]
