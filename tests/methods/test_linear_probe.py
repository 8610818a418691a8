"""The linear probe's solver: scikit-learn's logistic-regression optimum, many problems stacked in one L-BFGS run."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from visiontune.methods.baselines import _C_GRID, choose_c
from visiontune.methods.logreg import ABSENT_BIAS, fit_path


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    keep = np.concatenate([rng.choice(np.flatnonzero(y == c), 12, replace=False) for c in range(10)])
    x = x[keep]
    return (x - x.mean(0)) / (x.std(0) + 1e-6), y[keep]


def _objective(logits: np.ndarray, w: np.ndarray, y: np.ndarray, c: float) -> float:
    """scikit-learn's multinomial objective: C x summed log-loss + ||W||^2 / 2."""
    z = logits - logits.max(1, keepdims=True)
    nll = -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1)))
    return float(c * nll.sum() + 0.5 * (w**2).sum())


def _sklearn(x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # large C on few rows may stop at max_iter: compared by objective anyway
        return LogisticRegression(C=c, max_iter=1000).fit(x, y)


def _check_against_sklearn(x: np.ndarray, y: np.ndarray, k: int, c: float, w: torch.Tensor, b: torch.Tensor) -> None:
    ref = _sklearn(x, y, c)
    cls = ref.classes_
    logits = x @ w.numpy().T + b.numpy()
    absent = np.setdiff1d(np.arange(k), cls)
    assert (b.numpy()[absent] == ABSENT_BIAS).all() and (w.numpy()[absent] == 0).all()
    if len(cls) == 2:  # binomial: the logit difference is scikit-learn's decision function
        ours, theirs = logits[:, cls[1]] - logits[:, cls[0]], ref.decision_function(x)
        assert np.abs(ours - theirs).max() <= 1e-2 * (1 + np.abs(theirs).max()), c
        return
    assert (logits.argmax(1) == cls[ref.decision_function(x).argmax(1)]).all(), c
    labels = np.searchsorted(cls, y)
    ours = _objective(logits[:, cls], w.numpy()[cls], labels, c)
    theirs = _objective(ref.decision_function(x), ref.coef_, labels, c)
    # Same optimum up to L-BFGS's tolerance (with large C it is flat, so weights may differ more): as low, or lower.
    assert ours <= theirs * (1 + 1e-3) + 1e-4, (c, ours, theirs)


def test_path_reaches_scikit_learns_optimum(digits) -> None:
    x, y = digits
    path = fit_path(x, y, [np.arange(len(y))], 10, _C_GRID, max_iter=1000)
    assert len(path) == len(_C_GRID) and all(len(heads) == 1 for heads in path)
    for c, [(w, b)] in zip(_C_GRID, path):
        assert w.shape == (10, x.shape[1]) and b.shape == (10,)
        _check_against_sklearn(x, y, 10, c, w, b)


@pytest.mark.parametrize("classes", [2, 3])
def test_fewer_rows_than_features_binary_and_absent_classes(digits, classes) -> None:
    # 3 rows per class of 64 features: the rows are solved in their span (SVD); two classes is scikit-learn's
    # binomial model; classes that never occur get a head row that is never predicted.
    x, y = digits
    rows = np.concatenate([np.flatnonzero(y == c)[:3] for c in range(classes)])
    assert len(rows) < x.shape[1]
    cs = [0.01, 1.0, 10.0]
    for c, [(w, b)] in zip(cs, fit_path(x[rows], y[rows], [np.arange(len(rows))], 10, cs, max_iter=1000)):
        _check_against_sklearn(x[rows], y[rows], 10, c, w, b)


def test_stacked_problems_equal_their_separate_fits(digits) -> None:
    x, y = digits
    rng = np.random.default_rng(1)
    subsets = [np.sort(rng.choice(len(y), 90, replace=False)) for _ in range(3)] + [np.flatnonzero(y < 4)]
    cs = [0.1, 1.0]
    stacked = fit_path(x, y, subsets, 10, cs, max_iter=1000)
    for i, idx in enumerate(subsets):
        alone = fit_path(x, y, [idx], 10, cs, max_iter=1000)
        for j, c in enumerate(cs):
            (w, b), (w1, b1) = stacked[j][i], alone[j][0]
            logits, logits1 = x[idx] @ w.numpy().T + b.numpy(), x[idx] @ w1.numpy().T + b1.numpy()
            assert (logits.argmax(1) == logits1.argmax(1)).all()
            assert abs(_objective(logits, w.numpy(), y[idx], c) - _objective(logits1, w1.numpy(), y[idx], c)) < 1e-3 * (1 + c)
            _check_against_sklearn(x[idx], y[idx], 10, c, w, b)


def test_a_problem_with_one_class_is_refused(digits) -> None:
    x, y = digits
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit_path(x, y, [np.flatnonzero(y == 3)], 10, [1.0], max_iter=100)


def test_choose_c_by_grouped_cv_and_by_validation(digits) -> None:
    x, y = digits
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    c, scores, (w, b) = choose_c(xt, yt, np.arange(len(y)), 10, 1000, None)
    assert set(scores) == {f"{v:g}" for v in _C_GRID} and np.isclose(_C_GRID, c).any()
    assert scores[f"{c:g}"] == max(scores.values()) and 0.5 < max(scores.values()) <= 1.0
    # Ties go to the smaller C.
    assert all(scores[f"{v:g}"] < scores[f"{c:g}"] for v in _C_GRID if v < c * (1 - 1e-5))
    # The head that comes with the choice is the fit on all rows at that C.
    _check_against_sklearn(x, y, 10, c, w, b)
    # With a validation split, C is chosen on it.
    c_val, val_scores, _ = choose_c(xt[::2], yt[::2], np.arange(len(y))[::2], 10, 1000, (xt[1::2], yt[1::2]))
    assert scores.keys() == val_scores.keys() and val_scores[f"{c_val:g}"] == max(val_scores.values())
    # Above max_rows, C is chosen on a subsample and no all-rows head comes back (the caller fits it).
    _, _, head = choose_c(xt, yt, np.arange(len(y)), 10, 1000, None, max_rows=60)
    assert head is None


@pytest.mark.parametrize("c", [0.1, 1.0])
def test_balanced_weights_reach_scikit_learns_class_weighted_optimum(digits, c: float) -> None:
    """optim.class_weights=balanced: the probe solves scikit-learn's class_weight="balanced" problem."""
    x, y = digits
    keep = np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:3], np.flatnonzero(y == 2)[:6]])
    x, y = x[keep], y[keep]  # 12 / 3 / 6 images: imbalanced
    [[(w, b)]] = fit_path(x, y, [np.arange(len(y))], 3, [c], max_iter=2000, balanced=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(x, y)
    sw = len(y) / (3 * np.bincount(y)[y])

    def objective(logits: np.ndarray, coef: np.ndarray) -> float:
        z = logits - logits.max(1, keepdims=True)
        nll = -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1)))
        return float(c * (sw * nll).sum() + 0.5 * (coef**2).sum())

    ours = objective(x @ w.numpy().T + b.numpy(), w.numpy())
    theirs = objective(ref.decision_function(x), ref.coef_)
    assert ours <= theirs * (1 + 1e-3) + 1e-4
    # ...and it is not the unweighted problem: the rare class gains logit mass.
    [[(w0, b0)]] = fit_path(x, y, [np.arange(len(y))], 3, [c], max_iter=2000)
    rare = y == 1
    assert (x[rare] @ w.numpy().T + b.numpy())[:, 1].mean() > (x[rare] @ w0.numpy().T + b0.numpy())[:, 1].mean()
