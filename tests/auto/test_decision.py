"""The Bayesian decision of ``visiontune auto`` (issue 28, part 3): the posterior math against hand-computed cases,
the choice with a cost margin, and the margin's validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from visiontune.auto.decision import FLAT, check_points, choose, correlated_t, posterior
from visiontune.auto.schedule import PriorGain
from visiontune.errors import ConfigError

DIFFS = [0.06, -0.05, 0.04, -0.03, 0.05]  # mean 0.014, sample variance 0.00253


def test_correlated_t_is_benavolis_with_the_nadeau_bengio_variance() -> None:
    loc, scale, dof = correlated_t(DIFFS, rho=0.2)  # 5 folds: n_test / n_total = 1/5
    # scale² = (1/k + rho / (1 - rho)) s² = (0.2 + 0.25) * 0.00253
    assert loc == pytest.approx(0.014) and dof == 4
    assert scale == pytest.approx(math.sqrt(0.45 * 0.00253), rel=1e-9)
    assert correlated_t([0.1], 0.5) is None


def test_flat_prior_is_the_data_alone() -> None:
    p = posterior(DIFFS, 0.2, FLAT, rope=0.01)
    scale = math.sqrt(0.45 * 0.00253)
    assert p.mean == pytest.approx(0.014) and p.prior_share == 0 and p.data_share == 1
    assert p.p_better == pytest.approx(stats.t.sf(0, 4, 0.014, scale))  # 0.650
    assert p.p_equivalent == pytest.approx(stats.t.cdf(0.01, 4, 0.014, scale) - stats.t.cdf(-0.01, 4, 0.014, scale))
    assert p.sd == pytest.approx(scale * math.sqrt(4 / 2))
    # a very wide normal prior (the grid) gives the same answer
    wide = posterior(DIFFS, 0.2, PriorGain(0.0, 10.0), rope=0.01)
    assert wide.mean == pytest.approx(p.mean, abs=1e-4) and wide.p_better == pytest.approx(p.p_better, abs=1e-3)
    assert wide.sd == pytest.approx(p.sd, rel=1e-2) and wide.prior_share < 1e-3


def test_a_strong_prior_dominates_little_data() -> None:
    p = posterior(DIFFS, 0.2, PriorGain(0.05, 0.005))
    assert p.mean == pytest.approx(0.05, abs=0.002) and p.prior_share > 0.9 and p.p_better > 0.999


def test_more_folds_move_the_posterior_to_the_data() -> None:
    prior = PriorGain(0.05, 0.02)
    shares, means = [], []
    for k in (5, 20, 80):
        d = np.resize(np.array(DIFFS) - 0.014, k)
        d = (d - d.mean()) / d.std(ddof=1) * math.sqrt(0.00253) + 0.014  # same mean and variance, k folds
        p = posterior(d, 1 / k, prior)
        shares.append(p.prior_share)
        means.append(p.mean)
    assert shares[0] > shares[1] > shares[2] and means[0] > means[1] > means[2] > 0.014


def test_many_folds_match_the_conjugate_normal_posterior() -> None:
    # 200 folds: the t is nearly normal, so the posterior is nearly N((m0/s0² + d/v) / (1/s0² + 1/v), 1 / (...))
    k, d_mean, s = 200, 0.02, 0.05
    d = np.array([d_mean + s, d_mean - s] * (k // 2))
    loc, scale, _ = correlated_t(d, 1 / k)
    m0, s0 = -0.01, 0.01
    precision = 1 / s0**2 + 1 / scale**2
    p = posterior(d, 1 / k, PriorGain(m0, s0))
    assert p.mean == pytest.approx((m0 / s0**2 + loc / scale**2) / precision, abs=2e-4)
    assert p.sd == pytest.approx(precision**-0.5, rel=0.02)
    assert p.prior_share == pytest.approx((1 / s0**2) / precision, abs=0.02)


def test_equal_differences_pin_the_mean_and_no_folds_leave_the_prior() -> None:
    p = posterior([0.03] * 4, 0.25, PriorGain(-0.1, 0.01))
    assert (p.mean, p.sd, p.p_better, p.prior_share) == (0.03, 0.0, 1.0, 0.0)
    q = posterior([], 0.25, PriorGain(0.02, 0.01))
    assert (q.mean, q.sd, q.prior_share) == (0.02, 0.01, 1.0) and q.p_better == pytest.approx(stats.norm.sf(-2))


def test_folds_that_happen_to_agree_are_floored_at_a_folds_binomial_resolution() -> None:
    from visiontune.auto.decision import fold_variance_floor

    floor = fold_variance_floor(0.72, 20)  # two folds of 20 held-out images at about 72 %
    assert floor == pytest.approx(0.72 * 0.28 / 20) and fold_variance_floor(0.5, 0) == 0.0
    # Both folds +0.0 (flowers5 20/class: LoRA tied the probe on each): not a gain known to be exactly zero
    pinned = posterior([0.0, 0.0], 0.2, PriorGain(0.06, 0.07))
    assert (pinned.mean, pinned.sd) == (0.0, 0.0)
    p = posterior([0.0, 0.0], 0.2, PriorGain(0.06, 0.07), min_var=floor)
    loc, scale, dof = correlated_t([0.0, 0.0], 0.2, floor)
    assert (loc, dof) == (0.0, 1) and scale == pytest.approx(((1 / 2 + 1 / 4) * floor) ** 0.5)
    assert 0.0 < p.mean < 0.06 and 0.0 < p.sd < 0.07 and 0.0 < p.prior_share < 1.0  # the prior and the folds both count
    # A spread above the floor is left as it is
    assert correlated_t([0.1, -0.2, 0.3], 0.2, floor) == correlated_t([0.1, -0.2, 0.3], 0.2)


def test_choice_charges_the_cost_margin_to_dearer_candidates_only() -> None:
    posts = {"probe": posterior([0.0] * 5, 0.2), "proto": posterior([0.004] * 5, 0.2),
             "lora": posterior([0.012] * 5, 0.2)}
    assert choose(posts, "probe", {"lora"}, 0.0)[0] == "lora"
    assert choose(posts, "probe", {"lora"}, 0.015)[0] == "proto"  # lora +1.2 - 1.5 < proto +0.4
    assert choose(posts, "probe", {"lora"}, 0.005)[0] == "lora"  # +0.7 > +0.4


@pytest.mark.parametrize("bad", ["nan", "inf", "-1", "-0.5", "abc", "", None, True, float("nan")])
def test_cost_margin_must_be_finite_and_not_negative(bad) -> None:
    with pytest.raises(ConfigError, match="--cost-margin"):
        check_points(bad, "--cost-margin")


def test_cost_margin_accepts_points() -> None:
    assert check_points("1.5", "--cost-margin") == 1.5 and check_points(0, "--cost-margin") == 0.0
    with pytest.raises(ConfigError, match="above zero"):
        check_points("0", "--rope", positive=True)


def test_cli_refuses_a_bad_cost_margin_before_any_work(capsys) -> None:
    from visiontune.cli import main

    code = main(["auto", "digits", "backbone.name=test_vit", "backbone.weights=none", "--dry-run", "--cost-margin", "inf"])
    assert code == 2 and "--cost-margin 'inf'" in capsys.readouterr().err


def test_narrow_prior_and_narrow_evidence_far_apart_match_direct_integration() -> None:
    # 50 folds, the prior 20 t scales away from the folds: the grid's mean and P(better) match scipy's quad over the line
    from scipy.integrate import quad

    d = np.array([-0.10 + 0.05, -0.10 - 0.05] * 25)
    loc, scale, dof = correlated_t(d, 1 / 50)
    prior = PriorGain(0.10, scale)

    def density(x: float) -> float:
        return stats.t.pdf(x, dof, loc, scale) * stats.norm.pdf(x, prior.mean, prior.sd)

    points = [loc, 0.0, prior.mean]
    z = quad(density, -1, 1, points=points, limit=500)[0]
    mean = quad(lambda x: x * density(x), -1, 1, points=points, limit=500)[0] / z
    p = posterior(d, 1 / 50, prior)
    assert p.mean == pytest.approx(mean, abs=1e-4)
    assert p.p_better == pytest.approx(quad(density, 0, 1, points=[prior.mean], limit=500)[0] / z, abs=1e-3)
    assert loc < p.mean < prior.mean
