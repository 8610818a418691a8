"""The anytime budget of ``visiontune auto``: which fine-tuning job next, whether it may start, when it must stop.

An up-front estimate of a whole fold used to decide whether a candidate was tried at all, so on a busy machine the
selection could end after a few of its 15 minutes with no fine-tune tried. Instead (after Quick-Tune, Arango et al.,
ICLR 2024, whose acquisition divides a candidate's expected gain by its predicted cost, and which learns from partial
learning curves):

* **Order.** Candidates not yet started are taken in order of expected gain per second of an optimizer step
  (:func:`priority`). The expected gain comes from a :class:`GainPrior`: the prior learned on the meta-benchmark
  (:mod:`visiontune.auto.prior`) where one ships, else :class:`FlatPrior`, which expects the same gain from every
  candidate, so the order is the cheapest step first (ties: the family's list order, the most common configuration
  first).
* **Start.** A job (a first rung, a fold, the rest of a fold) starts whenever the budget left, less the final
  retrain's reserve, holds one epoch of it by the current estimate (:meth:`StepTimes.start_needs`): an epoch is the
  least that leaves a checkpoint to score, so less than that buys no evidence.
* **Stop.** A running job stops between two optimizer steps when the budget, less the reserve and the time to score
  its checkpoint, runs out; its last checkpoint is scored on the fold's held-out part and kept with its learning curve
  as evidence (``partial`` in ``auto.json`` and the leaderboard).
* **Re-estimate.** :class:`StepTimes` measures every candidate's seconds per optimizer step from its own jobs
  (whole jobs: model building, the probe head and scoring included); a candidate not yet measured is estimated from
  its relative :attr:`~visiontune.auto.candidates.Candidate.cost` scaled by the measured ones (before any, by the
  plan's timed forward pass). The final retrain's reserve is the measured step time times its step count.

Times come from a :data:`Clock` the selection is given (``time.time`` by default, comparable across the processes of
the Ray executor); a test gives a clock that counts optimizer steps, so that the decisions it asserts do not depend on
the machine's speed. Written by hand: no scheduler library plans a wall-clock budget over successive halving.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from visiontune.auto.candidates import Candidate

Clock = Callable[[], float]
"""Seconds, monotonic over a selection; :func:`time.time` unless a test counts something else."""


@dataclass(frozen=True)
class PriorGain:
    """What a prior believes of one candidate's accuracy gain over the linear probe, before its folds: a normal
    N(``mean``, ``sd``²) in accuracy fractions; ``sd`` infinite is a flat prior (no knowledge: the data alone decides).

    ``source`` says which fitted model answered (a backbone key such as ``dinov2-112``, ``family transformer``,
    ``pooled``) or ``flat``; ``outside`` names the task's meta-features outside the range the model was fitted on
    (``sd`` is already widened for them) and ``missing`` the ones the task could not provide (imputed, ``sd`` widened).
    """

    mean: float = 0.0
    sd: float = math.inf
    source: str = "flat"
    kind: str | None = None
    outside: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()

    @property
    def flat(self) -> bool:
        return not math.isfinite(self.sd)


class GainPrior(Protocol):
    """What is expected of a fine-tuning candidate before its folds say: the seam for a prior learned on other
    datasets (meta-features in, accuracy gain over the linear probe out). :class:`FlatPrior` knows nothing;
    :class:`visiontune.auto.prior.MetaPrior` is learned from the meta-benchmark."""

    def expected_gain(self, candidate: Candidate, features: dict[str, Any]) -> float:
        """A positive score of what ``candidate`` may gain over the linear probe (only ratios order candidates).

        Args:
            candidate: the fine-tuning candidate.
            features: the task's meta-features (:func:`visiontune.auto.cheap.meta_features`: pool size, classes,
                shots per class, backbone and family, the probe's cross-validated accuracy and log-loss, ...).
        """
        ...

    def gain(self, candidate: Candidate, features: dict[str, Any]) -> PriorGain:
        """The prior on ``candidate``'s accuracy gain over the probe (what the decision combines with the folds)."""
        ...

    def describe(self, features: dict[str, Any]) -> dict[str, Any]:
        """What the report says of the prior for this task: its name and provenance, the nearest tasks it was
        fitted on (``nearest``, possibly empty)."""
        ...


class FlatPrior:
    """No knowledge of other datasets: every fine-tune is expected to gain alike, so cost alone orders them, and the
    decision reads the folds alone."""

    def expected_gain(self, candidate: Candidate, features: dict[str, Any]) -> float:
        return 1.0

    def gain(self, candidate: Candidate, features: dict[str, Any]) -> PriorGain:
        return PriorGain()

    def describe(self, features: dict[str, Any]) -> dict[str, Any]:
        return {"name": "flat", "nearest": []}


class StepTimes:
    """Seconds per optimizer step: measured per candidate, estimated for the ones not yet run.

    Args:
        measured: candidate -> (optimizer steps, seconds) summed over its jobs so far.
        base_step_s: the plan's estimate of a cost-1 candidate's step before anything is measured (a timed forward
            pass, times 3 for the backward pass, times the batch).
    """

    def __init__(self, measured: dict[Candidate, tuple[int, float]], base_step_s: float):
        self.measured = {c: v for c, v in measured.items() if v[0] > 0}
        self.base_step_s = max(float(base_step_s), 0.0)

    def step_s(self, cand: Candidate) -> float:
        """The candidate's own measured seconds per step, else its relative cost times the measured scale."""
        if cand in self.measured:
            steps, seconds = self.measured[cand]
            return seconds / steps
        return cand.cost * self.scale()

    def scale(self) -> float:
        """Seconds per step of a cost-1 candidate: the median over measured candidates of step time / cost."""
        if not self.measured:
            return self.base_step_s
        return statistics.median(s / n / c.cost for c, (n, s) in self.measured.items())

    def start_needs(self, cand: Candidate, steps_per_epoch: int) -> float:
        """Seconds a job of ``cand`` needs to leave any evidence: one epoch (its first checkpoint)."""
        return steps_per_epoch * self.step_s(cand)


def priority(cand: Candidate, prior: GainPrior, features: dict[str, Any], times: StepTimes) -> float:
    """Expected gain per second of an optimizer step (Quick-Tune's gain divided by cost); higher goes first."""
    gain = float(prior.expected_gain(cand, features))
    # A zero estimate (nothing measured, a clock that does not move outside training) orders by relative cost.
    return gain / max(times.step_s(cand), 1e-9 * cand.cost, 1e-12)


def by_priority(cands: Iterable[Candidate], prior: GainPrior, features: dict[str, Any], times: StepTimes) -> list[Candidate]:
    """``cands`` best first; a stable sort, so equal priorities keep the family's order."""
    return sorted(cands, key=lambda c: -priority(c, prior, features, times))


def used_text(elapsed_s: float, budget_s: float | None) -> str:
    """'used 12.3 of 15.0 minutes' (or 'used 12.3 minutes, no budget')."""
    if budget_s is None:
        return f"used {elapsed_s / 60:.1f} minutes (no budget)"
    return f"used {elapsed_s / 60:.1f} of {budget_s / 60:.1f} minutes"


__all__ = ["Clock", "FlatPrior", "GainPrior", "PriorGain", "StepTimes", "by_priority", "priority", "used_text"]
