"""One selection, stage after stage (:class:`AutoSelect`); the stages are their own modules (see the package
docstring, :mod:`visiontune.auto`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from visiontune.auto import ship
from visiontune.auto.candidates import Candidate
from visiontune.auto.cheap import Features, cheap_stage, meta_features
from visiontune.auto.explora import explora_stage
from visiontune.auto.finetune import FineTuneStage
from visiontune.auto.leaderboard import decide, leaderboard
from visiontune.auto.plan import PROBE, Plan, Task, make_plan
from visiontune.auto.prior import default_prior
from visiontune.auto.record import Record
from visiontune.auto.report import write_report
from visiontune.auto.schedule import Clock, GainPrior, used_text
from visiontune.auto.settings import AutoSettings
from visiontune.backbones import shared_backbones
from visiontune.errors import ConfigError


class AutoSelect:
    """One selection run; see :mod:`visiontune.auto`. ``run()`` returns the leaderboard record.

    Args:
        data: the labeled data (a built-in name, a folder or a CSV manifest).
        out: the selection's folder (``auto.json``, the leaderboard, ``model/``); a rerun continues it.
        settings: every other option (:class:`~visiontune.auto.settings.AutoSettings`; its defaults when None).
        backbones: the backbones compared (default: ``backbone.name``, or the offline pair with
            ``backbone.weights=offline``).
        overrides: ``key=value`` config overrides every run of the selection gets.
        prior: orders the fine-tuning candidates by expected gain per second and is the decision's prior
            (:func:`visiontune.auto.prior.default_prior` by default: the learned prior that ships, else
            :class:`~visiontune.auto.schedule.FlatPrior`).
        clock: what the budget is measured by (``time.time``; the local executor only for any other).
    """

    def __init__(self, data: str, out: str | Path, settings: AutoSettings | None = None, *,
                 backbones: list[str] | None = None, overrides: list[str] | None = None,
                 prior: GainPrior | None = None, clock: Clock | None = None):
        self.settings = settings = settings if settings is not None else AutoSettings()
        if clock is not None and settings.executor != "local":
            raise ConfigError("a clock other than time.time needs executor='local' (Ray workers read time.time)")
        self.task = Task(data, settings, backbones, overrides)
        # `run.progress=false` among the overrides silences the selection's own bars and its final retrain, as
        # `--quiet` does (the final run is given `run.progress` explicitly, so the override must not be lost).
        self.progress = bool(settings.progress and self.task.cfg.run.progress)
        self.prior: GainPrior = prior if prior is not None else default_prior()
        self.record = Record(out, self.task.signature, clock or time.time, self.progress)
        self.out = self.record.out
        self.candidates: tuple[Candidate, ...] = self.task.fit(self.task.backbones[0])[0]
        self.features: Features = {}  # backbone -> features of every pooled image (the folds' LP-FT heads)
        self.finetune: FineTuneStage | None = None  # stage 3, once it ran
        self._base_step_s = 0.0

    def plan(self) -> Plan:
        """The plan with time estimates from one measured forward pass per backbone (nothing is trained)."""
        plan, self._base_step_s = make_plan(self.task, self.settings, self.prior, self.record.clock)
        return plan

    def meta_features(self, backbone: str) -> dict[str, Any]:
        """What the prior conditions on (:func:`visiontune.auto.cheap.meta_features`)."""
        return meta_features(self.task, self.record.state, backbone)

    def leaderboard(self, backbone: str) -> list[dict[str, Any]]:
        return leaderboard(self.task, self.record.state, backbone)

    def decide(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The decision on ``rows`` (:func:`visiontune.auto.leaderboard.decide`)."""
        return decide(self.task, self.record.state, self.settings, self.prior, self.candidates, rows,
                      self.finetune.can_retrain(rows[0]["backbone"]) if self.finetune is not None else None)

    def run(self) -> dict[str, Any]:
        """The whole selection (continuing one ``OUT`` holds); the leaderboard record."""
        # Every fold, checkpoint score and the final retrain of this process build the same backbone: built once.
        with shared_backbones():
            return self._run()

    def _run(self) -> dict[str, Any]:
        task, record, log = self.task, self.record, self.record.log
        record.claim()
        record.load()
        log(self.plan().describe())
        backbone = cheap_stage(task, record, self.features)
        if self.settings.unlabeled:
            backbone = explora_stage(task, record, self.settings, self.features, backbone)
        log(f"escalating on {backbone}")
        self.finetune = FineTuneStage(task, record, self.settings, self.prior, self.features, self._base_step_s)
        self.candidates = self.finetune.run(backbone)
        rows = self.leaderboard(backbone)
        decision = self.decide(rows)
        log(f"decision: {decision['reason']}")
        state = record.state
        if "final" not in state or state["final"].get("candidate") != decision["candidate"]:
            final = ship.final_run(task, record, backbone, decision, self.candidates)
            state["final"] = {"candidate": decision["candidate"], **final}
            record.save()
        elapsed = record.elapsed()
        out = {
            "backbone": backbone, "folds": task.k, "pool": len(task.pool), "test_images": len(task.test),
            "budget_s": self.settings.budget_s, "elapsed_s": elapsed, "used": used_text(elapsed, self.settings.budget_s),
            "leaderboard": rows, "probe": PROBE, "decision": decision,
            "prior": self.prior.describe(self.meta_features(backbone)),
            # Wall time of every fine-tuning job the search ran (first-rung thirds, folds, resumed folds):
            # what successive halving is there to save.
            "finetune_s": sum(r.get("job_s", 0.0) for r in state["finetune"].values()),
            "final": state["final"],
        }
        if "explora" in state:
            out["explora"] = state["explora"]
        write_report(record.out, out, state, task.classes, PROBE)
        record.save()
        log(out["used"])
        return out


__all__ = ["AutoSelect"]
