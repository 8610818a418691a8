"""Successive halving for ``visiontune auto`` in thirds of a fold: the Optuna study the fine-tuning stage reports to.

The resource is a third of a fold (Optuna steps: :data:`~visiontune.auto.settings.THIRDS` per fold), so the rungs
fall a third of the way into fold 1, at the end of fold 1 and at the end of fold 3. The study lives in
``OUT/search.journal``; the cheap candidates stand on its rungs first, so a fine-tune must beat them to go on, and
a candidate a kill interrupted gets a new trial told what it had scored (its judgements, kept in ``auto.json``,
stand). Written by hand: only this bookkeeping; the pruning rule is Optuna's ``SuccessiveHalvingPruner``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from visiontune.auto.candidates import Candidate
from visiontune.auto.record import STUDY_FILE
from visiontune.auto.settings import REDUCTION_FACTOR, THIRDS


def rung_epoch(epochs: int) -> int:
    """The epoch of a fold's schedule where its first rung is: about a third of the way (at least one epoch, and
    before the last)."""
    return max(1, min(epochs - 1, round(epochs / THIRDS)))


def undecided(rec: dict[str, Any]) -> bool:
    """Scored at the first rung, not yet judged there."""
    return "rung" in rec and "promoted" not in rec["rung"]


def _rung_values(folds: list[dict[str, Any]], first: float | None) -> list[tuple[int, float]]:
    """(Optuna step, value) of each rung a candidate passed: the first rung's score (``first``), then each finished
    fold's running mean."""
    return ([(1, first)] if first is not None else []) + [
        (THIRDS * (j + 1), float(np.mean([f["accuracy"] for f in folds[: j + 1]]))) for j in range(len(folds))
    ]


def open_study(out: Path, backbone: str, prune: bool, cheap: dict[str, list[dict[str, Any]]]) -> Any:
    """The study of ``backbone``'s fine-tunes in ``out``'s journal (continued when it exists: trials a kill left
    running are failed, their folds being in ``auto.json``); a new one starts with the cheap candidates' fold scores
    (``cheap``: name -> folds) on its rungs, their fold 1 standing on the first (it is done in no time)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / STUDY_FILE)))
    study = optuna.create_study(
        study_name=f"auto-{backbone}", storage=storage, direction="maximize", load_if_exists=True,
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=REDUCTION_FACTOR)
        if prune else optuna.pruners.NopPruner(),
    )
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # killed mid-candidate; its folds are in auto.json
    if not study.get_trials(deepcopy=False):
        for name, folds in cheap.items():
            trial = study.ask()
            trial.set_user_attr("candidate", name)
            for step, value in _rung_values(folds, folds[0]["accuracy"]):
                trial.report(value, step)
                if trial.should_prune():
                    break  # out of the race at this rung: it stands on no later one
            study.tell(trial, float(np.mean([f["accuracy"] for f in folds])))
    return study


def resume_trial(study: Any, cand: Candidate, rec: dict[str, Any]) -> Any:
    """A new Optuna trial for ``cand``, told what it scored before a kill (the first rung, the folds' running means);
    the pruner is asked at each rung passed, so that the new trial stands on those rungs with the values it had there
    (its earlier judgements, kept in ``auto.json``, stand)."""
    trial = study.ask()
    trial.set_user_attr("candidate", cand.name)
    for step, value in _rung_values(rec["folds"], rec["rung"]["accuracy"] if "rung" in rec else None):
        trial.report(value, step)
        if step == 1 and "promoted" not in rec["rung"]:
            continue  # judged with the others once all have a first-rung score
        trial.should_prune()
    return trial


def tell(study: Any, trial: Any, status: str, value: float | None = None) -> None:
    """Tell the study how a fine-tune's trial ended: ``complete`` (with its fold mean), ``pruned``, or anything else
    (stopped by the budget, a dead worker) as failed."""
    import optuna

    if status == "complete":
        study.tell(trial, value)
    elif status == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)


__all__ = ["open_study", "resume_trial", "rung_epoch", "tell", "undecided"]
