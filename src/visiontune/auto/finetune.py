"""Stage 3 of ``visiontune auto``, escalate while it can pay: the fine-tuning candidates, fold by fold, pruned by
successive halving and stopped by the budget.

Fine-tuning candidates (LoRA/DoRA ranks and targets, adapters on the last blocks only, Mona, full), made for the
chosen backbone's family and depth and checked against it (:mod:`visiontune.auto.candidates`: one that cannot apply
is skipped with its reason), run fold by fold on it. Each starts from the probe's head; when an inner validation
split carved out of the fold's training part holds at least
:data:`~visiontune.auto.plan.MIN_INNER_VAL_PER_CLASS` images per class, it keeps its best epoch on it -- epoch 0,
the probe head, included -- so the fold's held-out part stays untouched by any choice (below that, the fold trains
on all its training images and the probe, scored on the same folds, is the fallback).

Successive halving in thirds of a fold (Optuna's pruner, :mod:`visiontune.auto.rungs`): every candidate trains the
first third of fold 1 and is scored on its held-out part before any goes further; the pruner, asked best first,
lets on only those in the top fraction (the cheap candidates' fold-1 scores included), judged again on running
fold means after folds 1 and 3. An anytime budget (:mod:`visiontune.auto.schedule`): candidates go in order of
expected gain per second of a step (a :class:`~visiontune.auto.schedule.GainPrior`), a job starts whenever one epoch
of it fits what is left after the final retrain's reserve (both from measured step times), and the budget stops a
running fold between two optimizer steps (``train(stop=...)``), its last checkpoint scored as evidence. Folds run
one at a time in this process, or side by side as Ray tasks (:mod:`visiontune.auto.executor`); pruning, the budget
and the record stay here either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from visiontune.auto.budget import Budget
from visiontune.auto.candidates import Candidate
from visiontune.auto.cheap import Features, fold_mean, meta_features
from visiontune.auto.executor import fold_executor
from visiontune.auto.leaderboard import prior_pick
from visiontune.auto.plan import Task
from visiontune.auto.record import Record
from visiontune.auto.rungs import open_study, resume_trial, rung_epoch, tell, undecided
from visiontune.auto.schedule import GainPrior, StepTimes, by_priority
from visiontune.auto.settings import THIRDS, AutoSettings

FINISHED = ("complete", "pruned", "skipped")
"""Candidate states a rerun does not continue (``skipped``: it cannot apply to the backbone); one stopped by the
budget continues when the rerun's budget allows, one whose worker died (``failed``) is retried."""


def slug(name: str) -> str:
    """A candidate's name as a folder name (``lora q,v r4`` -> ``lora-q-v-r4``)."""
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")


def fold_overrides(task: Task, backbone: str, cand: Candidate, j: int, epochs: int, folds_dir: Path, resume: bool,
                   threads: int | None = None) -> list[str]:
    """Every override of ``cand``'s job on fold ``j`` (0-based): the task's and the candidate's, the fold's schedule,
    its run folder under ``folds_dir`` (continued with ``resume``, else replaced), no progress bars or plots."""
    extra = [f"optim.epochs={epochs}", "run.progress=false", "run.plots=false", f"run.dir={folds_dir}",
             f"run.name={slug(cand.name)}-fold{j + 1}", "run.resume=true" if resume else "run.overwrite=true",
             *([f"run.threads={threads}"] if threads else [])]
    return task.overrides(backbone, cand.overrides, extra)


def fold_head_features(task: Task, features: Features, backbone: str, j: int,
                       splits: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cheap stage's ``features`` of fold ``j``'s training images, for its fine-tune's LP-FT head: the same images
    in the same order when the fold has no inner validation split (else the head init computes its own)."""
    if backbone not in features or len(splits["val"]):
        return None
    x, y = features[backbone]
    idx = np.sort(task.folds[j][0])
    return x[idx], y[idx]


class FineTuneStage:
    """The fine-tuning stage of one selection on one backbone (:meth:`run`)."""

    def __init__(self, task: Task, record: Record, settings: AutoSettings, prior: GainPrior, features: Features,
                 base_step_s: float):
        self.task, self.record, self.settings, self.prior = task, record, settings, prior
        self.features = features  # the cheap stage's, for the folds' LP-FT heads
        self.base_step_s = base_step_s  # a cost-1 step by the plan's timed forward pass, until steps are measured
        self.candidates: tuple[Candidate, ...] = task.fit(task.backbones[0])[0]
        self.budget = Budget(task, record, settings.budget_s)

    @property
    def state(self) -> dict[str, Any]:
        return self.record.state["finetune"]

    def run(self, backbone: str) -> tuple[Candidate, ...]:
        """Hand the candidates' folds to the executor, prune and stop by the budget as they come back; the
        candidates that applied to ``backbone``.

        The first rung is inside fold 1: every candidate trains the first third of fold 1's schedule
        (``train(pause_after=...)``, its checkpoint kept) and is scored on fold 1's held-out part. Only when every
        candidate has that score does Optuna's pruner judge them, the best first, against the cheap candidates'
        fold-1 scores; a candidate it lets through continues the same fold from its checkpoint (``run.resume=true``),
        then fold by fold, judged again at the next rungs (fold 1, fold 3) on its running fold mean. Asked best
        first, Optuna's asynchronous successive halving keeps the top ``1/REDUCTION_FACTOR`` of the field at a rung
        as synchronous successive halving would, instead of letting through whichever candidate happened to arrive
        first. A candidate's folds run in order, one at a time; a free slot goes to the next fold of a candidate
        already going before a new one starts. ``--no-prune`` trains every candidate on every fold straight.
        """
        from tqdm.auto import tqdm

        task, record, state, k = self.task, self.record, self.state, self.task.k
        cheap = {c.name: record.state["cheap"][backbone]["candidates"][c.name]["folds"] for c in task.cheap}
        self.study = open_study(record.out, backbone, self.settings.prune, cheap)
        self.candidates, skipped = task.fit(backbone)
        for name, why in skipped.items():
            if name not in state:
                record.log(f"{name}: skipped, it cannot apply to {backbone} ({why})")
            state[name] = {"folds": [], "status": "skipped", "why": why}
        done = sum(len(state[c.name]["folds"]) for c in self.candidates if c.name in state)
        self.bar = tqdm(total=len(self.candidates) * k, initial=done, desc="fine-tuning folds",
                        disable=not record.progress, dynamic_ncols=True)
        self.waiting = [c for c in self.candidates if state.get(c.name, {}).get("status") not in FINISHED]
        self.trials: dict[str, Any] = {}  # started candidates -> their Optuna trial
        for c in self.waiting:
            state.setdefault(c.name, {"folds": [], "status": "waiting", "best_epochs": [], "steps_per_epoch": [], "job_s": 0.0})
        features = self.meta = meta_features(task, record.state, backbone)
        options = {k.removeprefix("ray_"): v for k, v in self.settings.executor_options().items()}
        with fold_executor(self.settings.executor, task.cfg.run.device, **options) as runner:
            if runner.facts["executor"] != "local":
                record.state["executor"] = runner.facts
                record.log(f"folds on Ray ({runner.facts['address']}): {runner.facts['in_flight']} at a time, "
                           f"{runner.facts['cpus_per_run']} CPU(s) and {runner.facts['gpus_per_run']:g} GPU(s) each")
            while True:
                while runner.free:
                    times = self.step_times()
                    # Re-ordered at every pick: the step times just measured change the expected cost.
                    cand = self._next(by_priority(self.waiting, self.prior, features, times), runner.busy)
                    if cand is None:
                        break
                    self._submit(runner, backbone, cand, times)
                if not runner.busy:
                    if self._judge_first_rung():
                        continue
                    break
                self._take(*runner.wait_one())
        self.bar.close()
        return self.candidates

    def _first_rung_due(self, c: Candidate) -> bool:
        """Its third of fold 1 is still to train."""
        return self.settings.prune and not self.state[c.name]["folds"] and "rung" not in self.state[c.name]

    def _next(self, order: list[Candidate], busy: Any) -> Candidate | None:
        """The candidate whose next job goes to a free slot, if any may go now."""
        rung_due = [c for c in order if self._first_rung_due(c)]
        if rung_due:  # the first rung for everyone before anyone goes further
            return next((c for c in rung_due if c.name not in busy), None)
        if any(undecided(self.state[c.name]) for c in self.waiting):
            return None  # the first rung's judgement waits for every candidate's score there
        cand = next((c for c in order if c.name in self.trials and c.name not in busy), None)
        return cand or next((c for c in order if c.name not in self.trials), None)

    def _submit(self, runner: Any, backbone: str, cand: Candidate, times: StepTimes) -> None:
        """Start ``cand``'s next job (its first rung, a fold, or the rest of fold 1) if the budget allows one epoch."""
        task, rec = self.task, self.state[cand.name]
        rec["status"] = "running"
        if cand.name not in self.trials:
            self.trials[cand.name] = resume_trial(self.study, cand, rec)
        j = len(rec["folds"])
        splits = task.fold_splits(j)
        epochs = task.epochs(len(splits["train"]))
        pause = rung_epoch(epochs) if self._first_rung_due(cand) else None
        # Anytime: the job starts if one epoch of it fits what the budget leaves after the final retrain's reserve,
        # and stops between two steps when that runs out (visiontune.auto.schedule).
        # The reserve covers the candidate the prior alone would choose, too: the decision may ship it unfolded.
        pick = prior_pick(self.candidates, self.state, self.prior, self.meta, self.settings.cost_margin)
        left = self.budget.time_left(backbone, cand, j == task.k - 1 and pause is None, times, self.candidates, pick)
        need = times.start_needs(cand, task.steps_per_epoch(len(splits["train"])))
        if left is not None and (left <= 0 or left < need):
            rec["why"] = (f"not started on fold {j + 1}: {max(left, 0.0):.0f} s of the budget left after the "
                          f"final retrain's reserve, one epoch needs about {need:.0f} s")
            self._end(cand, "budget")
            return
        deadline = None if left is None else self.record.clock() + left - self.budget.score_s(backbone, splits)
        # Fold 1 after its first rung continues from the checkpoint that the rung left.
        resume = j == 0 and "rung" in rec
        runner.submit(cand.name, fold_overrides(task, backbone, cand, j, epochs, self.record.out / "folds", resume,
                                                runner.threads), splits,
                      deadline, str(Path.cwd()), pause, self.record.clock, fold_head_features(task, self.features, backbone, j, splits))

    def _take(self, name: str, out: dict[str, Any] | None, lost: str | None) -> None:
        """Record a job the executor gave back: a lost worker, a stop by the budget, a first rung, or a fold."""
        cand = next(c for c in self.candidates if c.name == name)
        rec = self.state[name]
        if lost is not None:
            rec["why"] = lost
            self._end(cand, "failed")
            return
        rec["job_s"] = rec.get("job_s", 0.0) + out["job_s"]
        rec["steps"] = rec.get("steps", 0) + out["steps"]
        fold = len(rec["folds"]) + 1
        rec.setdefault("curves", {})[str(fold)] = {"epochs": out["epochs"], "curve": out["curve"],
                                                   **({"stopped": True} if out["stopped"] else {})}
        trial = self.trials[name]
        if out["stopped"]:
            self._stopped(trial, cand, rec, out, fold)
            self._end(cand, "budget")
            return
        if out["paused"]:
            rec["rung"] = {**out["row"], "epoch": out["epoch"], "epochs": out["epochs"]}
            trial.report(out["row"]["accuracy"], 1)
            self.record.save()
            return
        rec["folds"].append(out["row"])
        rec["best_epochs"].append(out["best_epoch"])
        rec["steps_per_epoch"].append(out["steps_per_epoch"])
        rec["trainable_pct"] = out["trainable_pct"]
        rec.pop("partial", None)  # a finished fold supersedes an earlier stop's evidence
        self.bar.update(1)
        trial.report(fold_mean(rec), THIRDS * len(rec["folds"]))
        if trial.should_prune():
            self._end(cand, "pruned")
        elif len(rec["folds"]) == self.task.k:
            self._end(cand, "complete")
        else:
            self.record.save()

    def _stopped(self, trial: Any, cand: Candidate, rec: dict[str, Any], out: dict[str, Any], fold: int) -> None:
        """Keep what a fold stopped by the budget showed: its last checkpoint's held-out score, and, when fold 1 had
        not reached its first rung, that score as the candidate's first-rung evidence (at the epoch it reached)."""
        if out["row"] is None:  # stopped inside its first epoch: no checkpoint, no evidence
            self.record.log(f"{cand.name}: stopped by the budget inside the first epoch of fold {fold}")
            return
        rec["partial"] = {**out["row"], "fold": fold, "epoch": out["epoch"], "epochs": out["epochs"]}
        if fold == 1 and "rung" not in rec:
            rec["rung"] = {**out["row"], "epoch": out["epoch"], "epochs": out["epochs"], "stopped": True}
            trial.report(out["row"]["accuracy"], 1)
        self.record.log(f"{cand.name}: stopped by the budget at epoch {out['epoch']} of {out['epochs']} of fold {fold}: "
                        f"{out['row']['accuracy']:.3f} on its held-out part")

    def can_retrain(self, backbone: str) -> set[str] | None:
        """The candidates whose final retrain fits what is left of the budget by the measured step times (without
        the reserve's safety margin: the reserve was kept with it), or None without a budget: a candidate chosen on
        its prior alone must still be shipped within the budget."""
        budget_s = self.budget.budget_s
        if budget_s is None:
            return None
        left, times = budget_s - self.record.elapsed(), self.step_times()
        return {c.name for c in self.candidates
                if self.budget.final_s(backbone, c, times, margin=1.0) <= left}

    def step_times(self) -> StepTimes:
        """Seconds per optimizer step, measured from every candidate's jobs so far (auto.json keeps them)."""
        state = self.state
        measured = {c: (int(state[c.name].get("steps", 0)), float(state[c.name].get("job_s", 0.0)))
                    for c in self.candidates if c.name in state}
        return StepTimes(measured, self.base_step_s)

    def _judge_first_rung(self) -> bool:
        """Optuna's pruner judges every candidate scored at the first rung, the best first; whether any was."""
        state = self.state
        due = sorted((c for c in self.waiting if undecided(state[c.name])), key=lambda c: -state[c.name]["rung"]["accuracy"])
        for cand in due:
            rec = state[cand.name]
            rec["rung"]["promoted"] = not self.trials[cand.name].should_prune()
            if rec["rung"]["promoted"]:
                self.record.log(f"{cand.name}: {rec['rung']['accuracy']:.3f} on fold 1 after epoch {rec['rung']['epoch']} of "
                                f"{rec['rung']['epochs']}: goes on")
                self.record.save()
            else:
                self._end(cand, "pruned")
        return bool(due)

    def _end(self, cand: Candidate, status: str) -> None:
        """Record how ``cand`` ended (complete, pruned, budget or failed), tell the study, save."""
        rec, log = self.state[cand.name], self.record.log
        n = len(rec["folds"])
        if status == "budget" and n:
            status = "partial (budget)"
        rec["status"] = status
        self.waiting.remove(cand)
        if status == "complete":
            log(f"{cand.name}: {fold_mean(rec):.3f} over {self.task.k} folds")
        elif status == "pruned" and not n:
            r = rec["rung"]
            log(f"{cand.name}: pruned at the first rung ({r['accuracy']:.3f} on fold 1 after epoch {r['epoch']} of "
                f"{r['epochs']})")
        elif status == "pruned":
            log(f"{cand.name}: pruned after fold {n} (fold mean {fold_mean(rec):.3f})")
        else:
            log(f"{cand.name}: {rec.get('why') if status == 'failed' else 'stopped by the budget'} after {n} finished fold(s)")
        tell(self.study, self.trials.pop(cand.name), status, fold_mean(rec) if status == "complete" else None)
        self.bar.update(self.task.k - n)
        self.record.save()


__all__ = ["FINISHED", "FineTuneStage", "fold_head_features", "fold_overrides", "slug"]
