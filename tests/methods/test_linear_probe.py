"""The linear probe's C search: the warm-started regularisation path finds what cold fits find."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from visiontune.methods.baselines import _C_GRID, _fit_path, choose_c


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    keep = np.concatenate([rng.choice(np.flatnonzero(y == c), 12, replace=False) for c in range(10)])
    x = x[keep]
    return (x - x.mean(0)) / (x.std(0) + 1e-6), y[keep]


def test_warm_started_path_reaches_the_cold_fits(digits) -> None:
    x, y = digits
    path = _fit_path(x, y, 10, _C_GRID, max_iter=1000)
    assert len(path) == len(_C_GRID)
    for c, (w, b) in zip(_C_GRID, path):
        cold = LogisticRegression(C=c, max_iter=1000).fit(x, y)
        # Same optimum up to L-BFGS's tolerance: identical training predictions, an objective value as low
        # (C x summed log-loss + ||W||^2 / 2; with large C the optimum is flat, so weights may differ more).
        logits = x @ w.numpy().T + b.numpy()
        ref = cold.decision_function(x)
        assert (logits.argmax(1) == ref.argmax(1)).all(), c
        ours = _objective(logits, w.numpy(), y, c)
        theirs = _objective(ref, cold.coef_, y, c)
        assert ours <= theirs * (1 + 1e-3) + 1e-4, (c, ours, theirs)  # as good an optimum, or better


def _objective(logits: np.ndarray, w: np.ndarray, y: np.ndarray, c: float) -> float:
    z = logits - logits.max(1, keepdims=True)
    nll = -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1)))
    return float(c * nll.sum() + 0.5 * (w**2).sum())


def test_choose_c_by_grouped_cv_and_by_validation(digits) -> None:
    x, y = digits
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    c, scores = choose_c(xt, yt, np.arange(len(y)), 10, 1000, None)
    assert set(scores) == {f"{v:g}" for v in _C_GRID} and np.isclose(_C_GRID, c).any()
    assert scores[f"{c:g}"] == max(scores.values()) and 0.5 < max(scores.values()) <= 1.0
    # Ties go to the smaller C.
    assert all(scores[f"{v:g}"] < scores[f"{c:g}"] for v in _C_GRID if v < c * (1 - 1e-5))
    # With a validation split, C is chosen on it.
    c_val, val_scores = choose_c(xt[::2], yt[::2], np.arange(len(y))[::2], 10, 1000, (xt[1::2], yt[1::2]))
    assert scores.keys() == val_scores.keys() and val_scores[f"{c_val:g}"] == max(val_scores.values())
