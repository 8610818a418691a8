"""Exception types raised by visiontune.

Every error message names the offending value, the valid choices where there is a finite set, and the
fix. They subclass ``ValueError`` so that callers who do not care about the distinction can catch one
familiar type.
"""

from __future__ import annotations

from typing import Any


class VisiontuneError(ValueError):
    """Base class for all user-facing visiontune errors."""


class ConfigError(VisiontuneError):
    """A configuration value, key or combination is invalid.

    Args:
        problems: every problem found (validation reports all of them at once, not the first).
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = f"{len(self.problems)} problems in the configuration:\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(msg)


class DataError(VisiontuneError):
    """A dataset, file, row or split is unusable (names the file or row and the fix)."""


class WeightsError(VisiontuneError):
    """Pretrained weights cannot be found, converted or loaded, or do not match the backbone."""


class TrainingStopped(VisiontuneError):
    """A caller's stop condition (e.g. ``visiontune auto``'s time budget) ended a training run between steps.

    The run directory keeps the checkpoint of the last finished epoch, so ``run.resume=true`` continues it.
    """


class TrainingPaused(TrainingStopped):
    """``train(pause_after=E)`` wrote epoch ``E``'s checkpoint and stopped there, as asked (``visiontune auto``
    scores a candidate a third of the way into its schedule this way); ``run.resume=true`` continues the same
    schedule. ``run_dir`` is the run directory holding the checkpoint."""

    def __init__(self, message: str, run_dir: Any):
        super().__init__(message)
        self.run_dir = run_dir
