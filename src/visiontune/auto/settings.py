"""How a selection runs: :class:`AutoSettings` (every option of ``visiontune auto`` but the data, the output folder,
the backbones and the config overrides), checked when it is made, and the stages' fixed constants.

The settings are one frozen dataclass so that :class:`visiontune.auto.AutoSelect` takes a handful of arguments
and each stage reads the few options it needs by name (torchtune's and peft's habit: a config object, validated
once, instead of a long constructor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from visiontune.auto.candidates import Candidate
from visiontune.auto.decision import ROPE_POINTS, check_points
from visiontune.auto.folds import FINETUNE_STEPS
from visiontune.errors import ConfigError
from visiontune.sweep.cluster import check_executor

REDUCTION_FACTOR = 3
THIRDS = 3
"""Optuna steps per fold: the successive-halving resource is a third of a fold, so its rungs (1, 3, 9 with
``REDUCTION_FACTOR`` 3) fall a third of the way into fold 1, at the end of fold 1 and at the end of fold 3."""
EXPLORA_STEPS = 200
"""Default ExPLoRA optimizer steps (batch 16) for ``--unlabeled``; the budget can stop it earlier."""
EXPLORA_BUDGET_SHARE = 0.4
"""At most this share of the budget left when pretraining starts goes to it (the fine-tuning stage needs the rest)."""
FINAL_RESERVE = 1.3
"""The final retrain on every labeled image is budgeted as this many of the dearest fold (plus the test split's
evaluation): the same step count, a larger feature pass for the probe head."""


def parse_budget(text: str | float | None) -> float | None:
    """'20m', '1.5h', '90s', '600' (seconds) -> seconds; None -> no budget.

    Raises:
        ConfigError: not a duration, or not a finite number of seconds above zero (``nan``, ``inf``, ``1e400``,
            ``0``, a negative number and an empty string would each mean "no budget" or "no time" by accident).
    """
    if text is None:
        return None
    t = str(text).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        seconds = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"--budget {text!r} is not a duration above zero; use e.g. 90s, 20m or 1.5h "
                          "(leave --budget out for no budget)")
    return seconds


@dataclass(frozen=True)
class AutoSettings:
    """Every option of a selection but what it selects on (data, output folder, backbones, config overrides).

    Checked when made (a :class:`~visiontune.errors.ConfigError` names the bad option and the fix), before anything
    is read or written; ``budget_s`` may be given as ``--budget`` text ('20m') and is kept in seconds.
    """

    budget_s: float | str | None = field(default=None, metadata={"help": "wall-clock budget (seconds or '20m')"})
    folds: int = field(default=5, metadata={"help": "stratified folds, at most the smallest class's size"})
    steps: int = field(default=FINETUNE_STEPS, metadata={"help": "optimizer steps of a fold's fine-tune"})
    candidates: tuple[Candidate, ...] | None = field(
        default=None, metadata={"help": "fine-tuning candidates (default: the backbone family's)"})
    prune: bool = field(default=True, metadata={"help": "successive halving between candidates"})
    unlabeled: str | None = field(default=None, metadata={"help": "unlabeled images for ExPLoRA pretraining"})
    unlabeled_steps: int = field(default=EXPLORA_STEPS, metadata={"help": "ExPLoRA optimizer steps"})
    cost_margin: float = field(default=0.0, metadata={"help": "accuracy points a fine-tune must gain to be chosen"})
    rope: float = field(default=ROPE_POINTS, metadata={"help": "half-width (points) of 'practically equivalent'"})
    progress: bool = field(default=True, metadata={"help": "progress bars and log lines"})
    executor: str = field(default="local", metadata={"help": "where folds train: local or ray"})
    ray_address: str | None = None
    cpus_per_run: int | None = None
    gpus_per_run: float | None = None
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalised values are written once, here
        set_(self, "cost_margin", check_points(self.cost_margin, "--cost-margin"))
        set_(self, "rope", check_points(self.rope, "--rope", positive=True))
        check_executor(self.executor, **self.executor_options())
        set_(self, "budget_s", None if self.budget_s is None else parse_budget(self.budget_s))
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            raise ConfigError(f"--folds {self.folds!r} is invalid; cross-validation needs a whole number of folds >= 2 "
                              "(default 5)")
        set_(self, "steps", int(self.steps))
        if int(self.unlabeled_steps) < 1:
            raise ConfigError(f"--unlabeled-steps={self.unlabeled_steps} must be >= 1")
        set_(self, "unlabeled_steps", int(self.unlabeled_steps))
        set_(self, "prune", bool(self.prune))
        if self.candidates is not None:
            set_(self, "candidates", tuple(self.candidates))

    def executor_options(self) -> dict[str, Any]:
        """The Ray executor's options (all None for the local one)."""
        return {"ray_address": self.ray_address, "cpus_per_run": self.cpus_per_run, "gpus_per_run": self.gpus_per_run,
                "max_in_flight": self.max_in_flight}


__all__ = ["AutoSettings", "EXPLORA_BUDGET_SHARE", "EXPLORA_STEPS", "FINAL_RESERVE", "REDUCTION_FACTOR", "THIRDS",
           "parse_budget"]
