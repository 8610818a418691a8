"""Stage 4 of ``visiontune auto``, decide like a statistician: the leaderboard and the decision on it.

Every candidate gets a mean and a 95 % interval over folds and a paired difference against the probe
(:mod:`visiontune.auto.stats`: corrected resampled t). The decision is Bayesian (:mod:`visiontune.auto.decision`):
each candidate's gain over the probe has a prior learned on other datasets (:mod:`visiontune.auto.prior`; flat
where none applies) that the paired folds update through the correlated t likelihood; the highest posterior
expected accuracy wins, less an explicit cost margin (``--cost-margin`` points, default 0) for a fine-tune. The
report gives each posterior, P(better than the probe), P(practically equivalent) and how much of it came from the
prior.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from visiontune.auto.candidates import Candidate
from visiontune.auto.cheap import meta_features
from visiontune.auto.decision import Posterior, choose, posterior
from visiontune.auto.plan import PROBE, Task
from visiontune.auto.schedule import GainPrior, PriorGain
from visiontune.auto.settings import AutoSettings
from visiontune.auto.stats import corrected_interval, kfold_val_fraction, paired_folds


def _row(task: Task, name: str, backbone: str, rec: dict[str, Any], probe: list[float], status: str,
         eligible: bool) -> dict[str, Any]:
    """One leaderboard row: mean and interval over folds, and the paired difference against ``probe``."""
    folds = rec["folds"]
    acc = [f["accuracy"] for f in folds]
    est = corrected_interval(acc, kfold_val_fraction(task.k), bounds=(0.0, 1.0))
    diff = paired_folds(acc, probe, task.k)
    return {
        "candidate": name, "backbone": backbone, "status": status, "folds": len(folds),
        "accuracy": est.mean, "accuracy_ci": [est.low, est.high],
        "f1_weighted": float(np.mean([f["f1_weighted"] for f in folds])),
        "f1_macro": float(np.mean([f["f1_macro"] for f in folds])),
        "vs_probe": diff.mean, "vs_probe_se": diff.se, "vs_probe_ci": [diff.low, diff.high],
        "train_s_per_fold": float(np.mean([f["train_s"] for f in folds])),
        "trainable_pct": rec.get("trainable_pct"), "eligible": eligible,
    }


MIN_PAIRED_FOLDS = 2
"""Finished folds a candidate the budget stopped needs to be judged: paired with the probe's same folds, two are
the fewest the correlated t-test can read a spread from."""


def is_eligible(rec: dict[str, Any]) -> bool:
    """Whether a candidate's record can be decided on: it finished every fold, or the budget stopped it after at
    least :data:`MIN_PAIRED_FOLDS` finished folds (judged on those, paired with the probe's same folds: the posterior
    is wider for fewer folds, and the prior carries the rest, as in Quick-Tune's use of partial evidence). Without
    this, a candidate three folds into five counted for nothing against the probe."""
    return rec["status"] == "complete" or (rec["status"] == "partial (budget)" and len(rec["folds"]) >= MIN_PAIRED_FOLDS)


def leaderboard(task: Task, state: dict[str, Any], backbone: str) -> list[dict[str, Any]]:
    """Every candidate's row on ``backbone`` (eligible when it finished its folds, or at least
    :data:`MIN_PAIRED_FOLDS` of them before the budget stopped it: :func:`is_eligible`), then the other backbones'
    cheap candidates for reference."""
    cheap = state["cheap"][backbone]["candidates"]
    probe = [f["accuracy"] for f in cheap[PROBE]["folds"]]
    rows = []
    for name, rec in [*cheap.items(), *state["finetune"].items()]:
        if not rec["folds"]:
            row = {"candidate": name, "status": rec["status"], "folds": 0, "eligible": False}
            if rec.get("why") and rec["status"] in ("skipped", "budget", "failed"):
                row["why"] = rec["why"]
            if "rung" in rec:  # scored a third of the way into fold 1 (or where the budget stopped it): what it scored
                row["first_rung"] = {k: rec["rung"][k] for k in ("accuracy", "epoch", "epochs")}
            if "partial" in rec:
                row["partial"] = {k: rec["partial"][k] for k in ("accuracy", "fold", "epoch", "epochs")}
            rows.append(row)
            continue
        row = _row(task, name, backbone, rec, probe, rec["status"], is_eligible(rec))
        if "partial" in rec:  # a later fold the budget stopped: its checkpoint's score, not in the fold mean
            row["partial"] = {k: rec["partial"][k] for k in ("accuracy", "fold", "epoch", "epochs")}
        rows.append(row)
    # The other backbones' cheap candidates, on the same folds, for reference (not eligible: the backbone is
    # decided before fine-tuning).
    for other, pool in state["cheap"].items():
        if other != backbone:
            rows += [_row(task, f"{name} ({other})", other, rec, probe, "other backbone", False)
                     for name, rec in pool["candidates"].items()]
    return rows


def _fold_acc(state: dict[str, Any], row: dict[str, Any]) -> list[float]:
    cheap = state["cheap"].get(row["backbone"], {}).get("candidates", {})
    rec = cheap[row["candidate"]] if row["candidate"] in cheap else state["finetune"][row["candidate"]]
    return [f["accuracy"] for f in rec["folds"]]


def decide(task: Task, state: dict[str, Any], settings: AutoSettings, prior: GainPrior,
           candidates: tuple[Candidate, ...], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The highest posterior expected accuracy, less the cost margin for a fine-tune; the reason in words.

    Each eligible candidate's gain over the probe gets a posterior (:mod:`visiontune.auto.decision`: ``prior``
    combined with its paired fold differences by the Bayesian correlated t-test); the winner has the highest probe
    accuracy + posterior mean gain - ``settings.cost_margin`` (points) if it fine-tunes. Adds the posterior to each
    eligible row (``gain``). A candidate the budget stopped is judged on its finished folds, each paired with the
    probe's same fold (``zip`` keeps the first ones: folds run in order); the partial fold is not in them. This replaces the
    one-standard-error rule, which sent every tie to the cheaper candidate whatever other datasets say: on 100
    labeled images it kept the probe where LoRA was 5 points better on the test images.
    """
    cost_margin, rope = settings.cost_margin, settings.rope
    eligible = [r for r in rows if r.get("eligible")]
    backbone = eligible[0]["backbone"]
    features = meta_features(task, state, backbone)
    probe_row = next(r for r in eligible if r["candidate"] == PROBE)
    probe = _fold_acc(state, probe_row)
    cheap = {c.name for c in task.cheap}
    cands = {c.name: c for c in (*task.cheap, *candidates) if c.name != PROBE}  # the probe is the reference
    posts: dict[str, Posterior] = {}
    for r in eligible:
        name = r["candidate"]
        belief = prior.gain(cands[name], features) if name in cands else PriorGain()
        diffs = [a - b for a, b in zip(_fold_acc(state, r), probe)]
        posts[name] = posterior(diffs, 1.0 / task.k, belief, rope / 100)
        r["gain"] = {**posts[name].as_dict(), "expected_accuracy": probe_row["accuracy"] + (0.0 if name == PROBE else posts[name].mean)}
    dearer = {n for n in posts if n not in cheap}
    best, utility = choose(posts, PROBE, dearer, cost_margin / 100, {r["candidate"]: r["train_s_per_fold"] for r in eligible})
    for r in eligible:
        r["gain"]["utility"] = utility[r["candidate"]]
    charge = f" less the cost margin of {cost_margin:g} points for a fine-tune" if cost_margin else ""

    def said(name: str) -> str:
        p = posts[name]
        sd = f" ± {100 * p.sd:.1f}" if math.isfinite(p.sd) else ""
        return (f"{name}: {100 * p.mean:+.1f}{sd} points over the probe, P(better) {p.p_better:.2f}, P(within ±{rope:g}) "
                f"{p.p_equivalent:.2f}, {100 * p.prior_share:.0f} % from the prior")

    rivals = sorted((n for n in posts if n not in (best, PROBE)), key=lambda n: -utility[n])
    if best == PROBE:
        why = (f"{PROBE} has the highest posterior expected accuracy{charge} ({100 * probe_row['accuracy']:.1f} % on the folds)"
               + (f"; the best other is {said(rivals[0])}" if rivals else ""))
    else:
        row = next(r for r in eligible if r["candidate"] == best)
        why = (f"{best} has the highest posterior expected accuracy{charge}: {100 * row['gain']['expected_accuracy']:.1f} % "
               f"({said(best)}; probe {100 * probe_row['accuracy']:.1f} % on the folds)"
               + (f"; next: {said(rivals[0])}" if rivals else ""))
    return {"candidate": best, "reason": why, "rule": "posterior", "cost_margin": cost_margin, "rope": rope}


__all__ = ["decide", "leaderboard"]
