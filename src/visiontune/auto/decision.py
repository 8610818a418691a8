"""The decision of ``visiontune auto``: a posterior on each candidate's accuracy gain over the linear probe.

Per candidate, the prior N(m0, s0²) on its gain over the probe (:class:`~visiontune.auto.schedule.PriorGain`, learned
on other datasets by :mod:`visiontune.auto.prior`, or flat) is combined with the paired fold evidence through the
**Bayesian correlated t-test** (Corani & Benavoli 2015, "A Bayesian approach for comparing cross-validated
algorithms on multiple data sets", Machine Learning 100; Benavoli, Corani, Demšar & Zaffalon 2017, "Time for a
change", JMLR 18): with ``k`` paired fold differences of mean d̄ and sample variance s², and ρ = n_test / n_total of
one fold (1/k for k-fold), the evidence on the mean gain is a Student t with k - 1 degrees of freedom, location d̄
and scale sqrt((1/k + ρ/(1-ρ)) s²) — the Nadeau-Bengio corrected variance that :mod:`visiontune.auto.stats` uses
(ρ/(1-ρ) = 1/(k-1), the held-out / training ratio). Under a flat prior that t is the posterior itself (Benavoli et
al.'s result).

**How the two are combined: numerically, on a grid.** The posterior density is the t density times the normal
prior's, normalized by the trapezoid rule over a grid dense within ±10 prior sd of the prior mean and ±10 t scales of d̄,
and even over the span between. Not the normal approximation with the t's variance: with 3 folds or fewer that variance is infinite (2 degrees of
freedom or fewer), and with 4-5 it is 2-3 times the squared scale, which would hand the decision to the prior;
the grid keeps the t's heavy tails, and a few thousand density evaluations cost nothing beside a fold.

Per candidate the posterior gives mean ± sd, P(gain > 0) ("better than the probe"), P(|gain| < ROPE) ("practically
equivalent", Benavoli et al.'s region of practical equivalence, default ±1 point) and the **prior's share**: the
posterior variance over the prior variance (in a normal model exactly the prior's precision over the posterior's,
so 0 = the folds alone, 1 = the prior alone); the data's share is the rest.

**The rule.** The candidate with the highest posterior expected accuracy (the probe's cross-validated accuracy plus
the posterior mean gain) minus an explicit cost margin (``--cost-margin``, in points, default 0) charged to every
candidate dearer than the probe (those that fine-tune) wins; the probe's own gain is 0 exactly. With a flat prior
and no margin this is the best cross-validated mean (the data alone). Written by hand: the rule and the grid
(scipy supplies the t and normal densities and the trapezoid rule; no library combines a normal prior with the
correlated t).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from visiontune.auto.schedule import PriorGain
from visiontune.errors import ConfigError

ROPE_POINTS = 1.0
"""Half-width of the region of practical equivalence, in accuracy points."""
GRID = 4001
FLAT = PriorGain()
"""No prior knowledge: the folds alone."""


def check_points(value: Any, option: str, positive: bool = False) -> float:
    """``value`` (accuracy points) as a float: finite, at least zero (above zero with ``positive``).

    Raises:
        ConfigError: not a number, nan/inf, or below the bound.
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        bound = "above zero" if positive else "at least 0"
        raise ConfigError(f"{option} {value!r} is not a finite number of accuracy points {bound}; use e.g. {option} 1.5")
    return v


@dataclass(frozen=True)
class Posterior:
    """The posterior on one candidate's accuracy gain over the probe (fractions; see the module docstring)."""

    mean: float
    sd: float
    p_better: float
    p_equivalent: float
    prior_share: float
    folds: int
    data_mean: float | None = None
    data_scale: float | None = None
    prior: PriorGain = FLAT

    @property
    def data_share(self) -> float:
        return 1.0 - self.prior_share

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data_share"] = self.data_share
        d["prior"] = {"mean": None if self.prior.flat else self.prior.mean, "sd": None if self.prior.flat else self.prior.sd,
                      "source": self.prior.source, "kind": self.prior.kind, "outside": list(self.prior.outside),
                      "missing": list(self.prior.missing)}
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def fold_variance_floor(accuracy: float, n_heldout: float) -> float:
    """The least variance a paired fold difference is credited with: the binomial variance p(1-p)/n of an accuracy
    ``accuracy`` measured on one fold's ``n_heldout`` images (0 without images).

    Two or three folds of 10-20 images often give exactly equal differences (both +0.0, both -12.5 points): a sample
    variance of zero, which the t would read as a gain known exactly, overriding the prior and every other fold to
    come. No accuracy measured on n images is known better than its binomial resolution, so the sample variance is
    floored there. The floor only binds when the folds happen to agree (their spread is usually far above it)."""
    if n_heldout <= 0:
        return 0.0
    p = min(max(float(accuracy), 0.0), 1.0)
    return p * (1.0 - p) / float(n_heldout)


def paired_floor(candidate: list[float], probe: list[float], n_heldout: float) -> float:
    """:func:`fold_variance_floor` for paired fold accuracies (the same folds, in order): at the mean accuracy of the
    two over the folds both have, on one fold's ``n_heldout`` images; 0 without paired folds."""
    n = min(len(candidate), len(probe))
    if n == 0:
        return 0.0
    return fold_variance_floor((float(np.mean(candidate[:n])) + float(np.mean(probe[:n]))) / 2, n_heldout)


def correlated_t(diffs: list[float] | np.ndarray, rho: float, min_var: float = 0.0) -> tuple[float, float, int] | None:
    """(location, scale, degrees of freedom) of the correlated t on the mean of paired fold ``diffs``, or None with
    fewer than two folds; ``rho`` is one fold's test share of the data (n_test / n_total, 1/k for k-fold);
    ``min_var`` floors the folds' sample variance (:func:`fold_variance_floor`)."""
    d = np.asarray(diffs, dtype=float)
    k = len(d)
    if k < 2:
        return None
    if not 0 <= rho < 1:
        raise ValueError(f"rho={rho} must be in [0, 1)")
    var = max(float(d.var(ddof=1)), float(min_var))
    return float(d.mean()), math.sqrt((1.0 / k + rho / (1.0 - rho)) * var), k - 1


def posterior(diffs: list[float] | np.ndarray, rho: float, prior: PriorGain = FLAT, rope: float = ROPE_POINTS / 100,
              min_var: float = 0.0) -> Posterior:
    """The posterior on the mean gain from paired fold ``diffs`` (candidate - probe, fractions) and ``prior``;
    ``min_var`` floors the folds' sample variance (:func:`fold_variance_floor`; 0: none, so equal differences pin the
    mean)."""
    from scipy import stats
    from scipy.integrate import cumulative_trapezoid, trapezoid

    t = correlated_t(diffs, rho, min_var)
    k = len(diffs)
    if t is None:  # no evidence: the prior alone
        m, s = (0.0, math.inf) if prior.flat else (prior.mean, prior.sd)
        normal = stats.norm(m, s) if math.isfinite(s) else None
        return Posterior(m, s, 0.5 if normal is None else float(normal.sf(0)),
                         0.0 if normal is None else float(normal.cdf(rope) - normal.cdf(-rope)), 1.0, k, prior=prior)
    loc, scale, dof = t
    if scale == 0:  # every fold gained exactly the same: the data pin the mean
        return Posterior(loc, 0.0, float(loc > 0), float(abs(loc) < rope), 0.0, k, loc, 0.0, prior)
    if prior.flat:
        dist = stats.t(dof, loc, scale)
        sd = scale * math.sqrt(dof / (dof - 2)) if dof > 2 else math.inf
        return Posterior(loc, sd, float(dist.sf(0)), float(dist.cdf(rope) - dist.cdf(-rope)), 0.0, k, loc, scale, prior)
    m0, s0 = prior.mean, prior.sd
    # Dense around the prior and around the folds' location, and evenly over the whole span between them (where
    # the posterior lies when both are narrow and far apart).
    low, high = min(m0 - 10 * s0, loc - 10 * scale), max(m0 + 10 * s0, loc + 10 * scale)
    grid = np.unique(np.concatenate([np.linspace(m0 - 10 * s0, m0 + 10 * s0, GRID),
                                     np.linspace(loc - 10 * scale, loc + 10 * scale, GRID),
                                     np.linspace(low, high, GRID), [0.0, -rope, rope]]))
    logp = stats.t.logpdf(grid, dof, loc, scale) + stats.norm.logpdf(grid, m0, s0)
    p = np.exp(logp - logp.max())
    p /= trapezoid(p, grid)
    mean = float(trapezoid(grid * p, grid))
    var = max(float(trapezoid((grid - mean) ** 2 * p, grid)), 0.0)
    cdf = cumulative_trapezoid(p, grid, initial=0.0)
    cdf /= cdf[-1]

    def at(v: float) -> float:
        return float(np.interp(v, grid, cdf))

    return Posterior(mean, math.sqrt(var), 1.0 - at(0.0), at(rope) - at(-rope), min(1.0, var / s0**2), k, loc, scale, prior)


def choose(posteriors: dict[str, Posterior], probe: str, dearer: set[str], margin: float,
           tie_cost: dict[str, float] | None = None) -> tuple[str, dict[str, float]]:
    """The candidate with the highest posterior mean gain minus ``margin`` (fraction) if it is in ``dearer``; the
    probe counts with gain 0. Ties go to the lower ``tie_cost`` (seconds per fold). Returns it and every
    candidate's utility."""
    cost = tie_cost or {}
    utility = {name: (0.0 if name == probe else p.mean) - (margin if name in dearer else 0.0) for name, p in posteriors.items()}
    utility.setdefault(probe, 0.0)
    best = max(utility, key=lambda n: (utility[n], -cost.get(n, 0.0)))
    return best, utility


__all__ = ["FLAT", "Posterior", "ROPE_POINTS", "check_points", "choose", "correlated_t", "fold_variance_floor", "paired_floor", "posterior"]
