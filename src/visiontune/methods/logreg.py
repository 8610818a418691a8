"""Multinomial logistic regression for the linear probe, many small problems solved as one.

The objective is scikit-learn's ``LogisticRegression(solver="lbfgs")``: mean softmax cross-entropy plus
``||W||^2 / (2 C n)`` with the intercept unpenalised; with two classes scikit-learn fits the binomial model,
which is the two-column softmax with the penalty doubled (the optimum has ``w0 = -w1``, so
``||w0||^2 + ||w1||^2 = ||w1 - w0||^2 / 2``). The optimiser is scipy's L-BFGS-B with scikit-learn's
settings (``gtol=1e-4``, ``maxls=50``, ``ftol=64 eps``), so a single problem reaches the same optimum
to the same tolerance (tests compare with scikit-learn).

Written here by hand is only the loss and gradient, batched over problems. A probe's C search is
5 folds x 11 values of C on a few hundred rows; scikit-learn fits them one at a time and spends
~0.4 ms per loss evaluation on input checks and array-API dispatch against ~10 us of arithmetic
(0.9 s of the demo's 1 s head fit). Here the folds (and the full training set, whose solution at the
chosen C is then the final head) are stacked into one block-diagonal problem: one L-BFGS run per C
moves all of them, each warm-started from the previous C. The problems share no parameter, so the
joint optimum is every problem's own optimum, and the stopping test (largest gradient entry
<= ``gtol``) holds for each of them. Classes absent from a problem's rows (possible in a CV fold) are
left out of its softmax, as scikit-learn leaves them out of its fit; their head rows get a very
negative bias so they are never predicted.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

ABSENT_BIAS = -1e4
"""Bias of a class a problem never saw: never predicted, and finite (a softmax over it stays defined)."""


@functools.cache
def _thread_pools() -> Any:
    """One threadpoolctl controller for the process: ``threadpool_limits()`` re-scans every loaded library on
    each call (~5 ms)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


class _Stack:
    """Problems that are row subsets of one feature matrix, as one block-diagonal L-BFGS problem.

    Parameters are laid out [r + 1, K, P] (weights, then the intercept row; class-major columns), so
    one GEMM of all P problems' weights against the shared rows gives every logit as [K, P, n] (softmax
    reductions run over the leading axis, which numpy vectorises), and one more GEMM every gradient.
    With fewer rows than features (few-shot), the rows are first rotated onto an orthonormal basis of
    their span (SVD, r = rank <= n): every gradient, hence every L-BFGS iterate from zero, lies in that
    span, and the penalty of a weight vector outside it only grows, so the optimum is the same and each
    evaluation is on r instead of D columns.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, subsets: list[np.ndarray], num_classes: int, balanced: bool = False):
        n, d = x.shape
        self.basis = None
        if n < d:
            u, sv, vt = np.linalg.svd(x, full_matrices=False)
            keep = sv > sv[0] * 1e-12 if len(sv) and sv[0] > 0 else np.zeros(len(sv), dtype=bool)
            x, self.basis = u[:, keep] * sv[keep], vt[keep].T
        self.xt = np.ascontiguousarray(x.T)  # [r, n]
        self.p, self.k, self.r = len(subsets), num_classes, self.xt.shape[0]
        self.onehot = np.zeros((num_classes, 1, n))
        self.onehot[y, 0, np.arange(n)] = 1.0
        self.rows = np.zeros((self.p, n))  # 1/n_p on problem p's rows, else 0: each mean is a weighted sum
        self.present = np.zeros((num_classes, self.p), dtype=bool)
        self.n = np.array([len(idx) for idx in subsets], dtype=float)
        for i, idx in enumerate(subsets):
            if balanced:
                # scikit-learn's class_weight="balanced" (w = n / (K n_c)), divided by n like the unweighted mean:
                # every present class carries the same total weight 1/K.
                counts = np.bincount(y[idx], minlength=num_classes)
                self.rows[i, idx] = 1.0 / ((counts > 0).sum() * counts[y[idx]])
            else:
                self.rows[i, idx] = 1.0 / len(idx)
            self.present[np.unique(y[idx]), i] = True
        self.binary = self.present.sum(0) == 2
        # Added to the logits: absent classes get -1e30, so exp() underflows to exactly 0 (no probability, no gradient).
        self.absent = np.where(self.present, 0.0, -1e30)[:, :, None]
        self.size = (self.r + 1) * self.k * self.p

    def loss_grad(self, theta: np.ndarray, lam: np.ndarray) -> tuple[float, np.ndarray]:
        """Summed objective of every problem and its gradient; ``lam`` [K * P] = L2 strength per weight column."""
        wb = theta.reshape(self.r + 1, self.k * self.p)
        w = wb[: self.r]
        z = (w.T @ self.xt).reshape(self.k, self.p, -1)  # logits [K, P, n]
        z += wb[self.r].reshape(self.k, self.p, 1)
        z += self.absent
        z -= z.max(0)
        true = (z * self.onehot).sum(0)  # [P, n]
        np.exp(z, out=z)
        s = z.sum(0)
        penalty = w * lam
        loss = float((self.rows * (np.log(s) - true)).sum() + 0.5 * (penalty * w).sum())
        z /= s
        z -= self.onehot
        z *= self.rows  # now d loss / d logits
        resid = z.reshape(self.k * self.p, -1)
        grad = np.empty_like(wb)
        np.matmul(self.xt, resid.T, out=grad[: self.r])
        grad[: self.r] += penalty
        resid.sum(1, out=grad[self.r])
        return loss, grad.ravel()

    def heads(self, theta: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(W [K, D], b [K]) per problem; absent classes get a zero row and :data:`ABSENT_BIAS`."""
        wb = theta.reshape(self.r + 1, self.k, self.p)
        out = []
        for i in range(self.p):
            w = wb[: self.r, :, i] if self.basis is None else self.basis @ wb[: self.r, :, i]
            bias = np.where(self.present[:, i], wb[self.r, :, i], ABSENT_BIAS)
            out.append((torch.from_numpy(np.ascontiguousarray(w.T)), torch.from_numpy(bias)))
        return out


def fit_path(
    x: np.ndarray, y: np.ndarray, subsets: list[np.ndarray], num_classes: int, cs: list[float], max_iter: int,
    tol: float = 1e-4, balanced: bool = False,
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Fit a logistic regression on each row subset of ``x`` at every C of ``cs`` (each C warm-started from the last).

    Args:
        x: features [N, D] (float64).
        y: integer labels [N] in ``0..num_classes-1``.
        subsets: row indices of each independent problem (CV folds' training rows, all rows ...).
        num_classes: K; heads always have K rows.
        cs: inverse L2 strengths as in scikit-learn, best increasing (each solution starts the next fit).
        max_iter: L-BFGS iterations per C (shared by the stacked problems).
        tol: largest allowed gradient entry at the solution (scikit-learn's ``tol``).
        balanced: weight each row by ``n / (K n_c)`` within its problem (scikit-learn's ``class_weight="balanced"``).

    Returns:
        ``out[j][i]`` = (W [K, D], b [K]) of problem ``i`` at ``cs[j]``.
    """
    from scipy.optimize import minimize

    for idx in subsets:
        if len(np.unique(y[idx])) < 2:
            raise ValueError(
                f"a logistic regression needs at least 2 classes among its rows, got {np.unique(y[idx]).tolist()}; "
                "add labeled images of another class"
            )
    if not subsets:
        return [[] for _ in cs]
    stack = _Stack(x, y, subsets, num_classes, balanced)
    theta = np.zeros(stack.size)
    out = []
    # Small problems: BLAS threads cost more than they give (and spin against torch's own OpenMP pool).
    with _thread_pools().limit(limits=1 if stack.xt.size < 2_000_000 else None):
        for c in cs:
            lam = np.tile(1.0 / (c * stack.n) * np.where(stack.binary, 2.0, 1.0), stack.k)
            res = minimize(
                stack.loss_grad, theta, args=(lam,), method="L-BFGS-B", jac=True,
                options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps},
            )
            theta = res.x
            out.append(stack.heads(theta))
    return out
