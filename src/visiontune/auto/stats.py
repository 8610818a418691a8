"""Estimates from cross-validation folds: means with confidence intervals, and paired differences.

Folds of one dataset overlap in their training images, so their scores are correlated and the naive
standard error of the fold mean is too small. The intervals here use the corrected resampled t-test of
Nadeau & Bengio (2003, "Inference for the generalization error", Machine Learning 52): the variance of the
fold-to-fold differences is inflated by ``n_val / n_train`` before the t quantile is applied. Written by hand
because scipy provides the t distribution but not the correction (it is a few lines).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """Mean over folds with a two-sided confidence interval."""

    mean: float
    low: float
    high: float
    folds: int
    se: float = math.inf
    """The corrected standard error of the mean (the interval is mean ± t · se)."""

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def contains_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    def beyond_one_se(self) -> bool:
        """True when the mean is more than one standard error above zero (the one-standard-error rule)."""
        return self.mean - self.se > 0.0


def corrected_interval(
    values: list[float] | np.ndarray, val_fraction: float, confidence: float = 0.95, bounds: tuple[float, float] | None = None
) -> Estimate:
    """Mean of per-fold ``values`` and its Nadeau-Bengio corrected t interval.

    Args:
        values: one score (or one paired difference) per fold.
        val_fraction: validation images / training images of one fold (``1 / (k - 1)`` for k-fold).
        confidence: coverage of the interval.
        bounds: clip the interval to these (e.g. (0, 1) for an accuracy).
    """
    from scipy import stats

    v = np.asarray(values, dtype=float)
    n = len(v)
    mean = float(v.mean()) if n else float("nan")
    if n < 2:
        return Estimate(mean, -math.inf, math.inf, n)
    var = float(v.var(ddof=1))
    se = math.sqrt((1.0 / n + val_fraction) * var)
    t = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1))
    low, high = mean - t * se, mean + t * se
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Estimate(mean, low, high, n, se)


def kfold_val_fraction(k: int) -> float:
    """Held-out / training images of one fold of a ``k``-fold split (``1 / (k - 1)``): the correction's ratio."""
    return 1.0 / max(k - 1, 1)


def paired_folds(a: list[float], b: list[float], k: int) -> Estimate:
    """Mean, standard error and interval of the fold-by-fold differences ``a - b`` (the same ``k`` folds)."""
    return corrected_interval([x - y for x, y in zip(a, b)], kfold_val_fraction(k))
