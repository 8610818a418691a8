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
from visiontune.auto.decision import Posterior, choose, paired_floor, posterior
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
    """Whether a candidate's record can be decided on: it finished every fold, or the budget or successive halving
    stopped it after at least :data:`MIN_PAIRED_FOLDS` finished folds (judged on those, paired with the probe's same
    folds: the posterior is wider for fewer folds, and the prior carries the rest, as in Quick-Tune's use of partial
    evidence). Without this, a candidate three folds into five counted for nothing against the probe. Pruning is a
    decision about where the next minutes go, not a verdict: the pruner compares running fold means alone (the
    cheap candidates stand on its rungs), so a fine-tune whose prior is strong could be pruned at the end of fold 3 by
    two images of one fold (the Fashion-MNIST 10/class selection on Ray: LoRA last-4 68.3 % against the probe's
    70.0 % on 3 folds of 20 images, with a prior of +11 points) and then never be weighed against the probe. A
    candidate pruned at the first rung (no finished fold) is still out."""
    return rec["status"] == "complete" or (rec["status"] in ("partial (budget)", "pruned")
                                           and len(rec["folds"]) >= MIN_PAIRED_FOLDS)


STOPPED_BY_BUDGET = ("budget", "partial (budget)")
"""Statuses of a candidate the budget stopped, or never let start: nothing judged it worse than the others."""
RULED_OUT = ("pruned", "skipped", "failed")
"""Statuses after which a candidate cannot be shipped without finished folds to judge it on: the pruner found it
behind (one pruned after :data:`MIN_PAIRED_FOLDS` folds is judged on them: :func:`is_eligible`), it cannot apply to
the backbone, or its worker died."""


def judgeable_if_stopped(rec: dict[str, Any]) -> bool:
    """Whether the decision could judge a candidate on its folds if the budget stopped it now (complete, pruned after
    :data:`MIN_PAIRED_FOLDS` folds, or that many folds finished and not ruled out): what the final retrain's reserve
    must cover."""
    return is_eligible(rec) if rec.get("status") in RULED_OUT else (
        rec.get("status") == "complete" or len(rec.get("folds", [])) >= MIN_PAIRED_FOLDS)


def on_prior_alone(rec: dict[str, Any], belief: PriorGain) -> bool:
    """Whether a candidate is decided on its prior alone: the budget stopped it (or never let it start) before
    :data:`MIN_PAIRED_FOLDS` folds finished, the pruner never judged it worse, and a prior learned on other datasets
    speaks for it (``belief`` not flat). The posterior is then that prior: the zero-shot choice of ZAP or Auto-sklearn
    2.0's meta-learned policy, for when the machine is too slow for the folds to say anything. Without this, a busy
    machine's budget sent every such task to the probe whatever the meta-benchmark says (the Fashion-MNIST 10/class
    selection on a loaded 2-core machine: LoRA on the last blocks stopped in fold 1, the probe shipped at 64.3 %
    where that LoRA reached 68.9 %). A pruned candidate is not: successive halving found it behind at equal effort."""
    return rec.get("status") in STOPPED_BY_BUDGET and not is_eligible(rec) and not belief.flat


def prior_pick(candidates: tuple[Candidate, ...], finetune: dict[str, Any], prior: GainPrior, features: dict[str, Any],
               cost_margin: float) -> Candidate | None:
    """The candidate the decision would take on the prior alone if the selection ended now (the highest prior mean
    gain above ``cost_margin`` points among those not finished with a judgement against them), or None: the
    budget keeps its final retrain in reserve from the start, so that a choice the prior makes can be shipped."""
    best, best_mean = None, cost_margin / 100
    for c in candidates:
        rec = finetune.get(c.name, {"status": "waiting", "folds": []})
        if rec.get("status") in RULED_OUT or is_eligible(rec):
            continue
        belief = prior.gain(c, features)
        if not belief.flat and belief.mean > best_mean:
            best, best_mean = c, belief.mean
    return best


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
           candidates: tuple[Candidate, ...], rows: list[dict[str, Any]],
           can_retrain: set[str] | None = None) -> dict[str, Any]:
    """The highest posterior expected accuracy, less the cost margin for a fine-tune; the reason in words.

    Each eligible candidate's gain over the probe gets a posterior (:mod:`visiontune.auto.decision`: ``prior``
    combined with its paired fold differences by the Bayesian correlated t-test); the winner has the highest probe
    accuracy + posterior mean gain - ``settings.cost_margin`` (points) if it fine-tunes. Adds the posterior to each
    eligible row (``gain``). A candidate the budget stopped is judged on its finished folds, each paired with the
    probe's same fold (``zip`` keeps the first ones: folds run in order); the partial fold is not in them. One the
    budget left with fewer than two finished folds, and not pruned, is judged on its learned prior alone
    (:func:`on_prior_alone`; ``basis`` "prior alone" on its row) if its final retrain fits what is left of the budget
    (``can_retrain``: the names that fit; None: no budget). This replaces the
    one-standard-error rule, which sent every tie to the cheaper candidate whatever other datasets say: on 100
    labeled images it kept the probe where LoRA was 5 points better on the test images.
    """
    cost_margin, rope = settings.cost_margin, settings.rope
    probe_row = next(r for r in rows if r["candidate"] == PROBE and r.get("eligible"))
    backbone = probe_row["backbone"]
    features = meta_features(task, state, backbone)
    probe = _fold_acc(state, probe_row)
    cheap = {c.name for c in task.cheap}
    cands = {c.name: c for c in (*task.cheap, *candidates) if c.name != PROBE}  # the probe is the reference
    beliefs = {name: prior.gain(c, features) for name, c in cands.items()}
    for r in rows:  # the budget left it without two finished folds: its prior alone, where one was learned
        rec = state["finetune"].get(r["candidate"])
        if (not r.get("eligible") and rec is not None and r["candidate"] in beliefs and on_prior_alone(rec, beliefs[r["candidate"]])
                and (can_retrain is None or r["candidate"] in can_retrain)):
            r["eligible"], r["basis"] = True, "prior alone"
    eligible = [r for r in rows if r.get("eligible")]
    on_prior = {r["candidate"] for r in eligible if r.get("basis") == "prior alone"}
    posts: dict[str, Posterior] = {}
    for r in eligible:
        name = r["candidate"]
        belief = beliefs.get(name, PriorGain())
        # A candidate on its prior alone has fewer than two folds, no spread to read: the prior decides.
        acc = [] if name in on_prior else _fold_acc(state, r)
        diffs = [a - b for a, b in zip(acc, probe)]
        # Folds that happen to agree exactly are not a gain known exactly: floored at a fold's binomial resolution.
        floor = 0.0 if name == PROBE else paired_floor(acc, probe, len(task.pool) / task.k)
        posts[name] = posterior(diffs, 1.0 / task.k, belief, rope / 100, floor)
        r["gain"] = {**posts[name].as_dict(), "expected_accuracy": probe_row["accuracy"] + (0.0 if name == PROBE else posts[name].mean)}
    dearer = {n for n in posts if n not in cheap}
    # Ties go to the cheaper fold; a candidate on its prior alone has no measured fold, so it goes last.
    best, utility = choose(posts, PROBE, dearer, cost_margin / 100,
                           {r["candidate"]: r.get("train_s_per_fold", math.inf) for r in eligible})
    for r in eligible:
        r["gain"]["utility"] = utility[r["candidate"]]
    charge = f" less the cost margin of {cost_margin:g} points for a fine-tune" if cost_margin else ""

    def said(name: str) -> str:
        p = posts[name]
        sd = f" ± {100 * p.sd:.1f}" if math.isfinite(p.sd) else ""
        return (f"{name}: {100 * p.mean:+.1f}{sd} points over the probe, P(better) {p.p_better:.2f}, P(within ±{rope:g}) "
                f"{p.p_equivalent:.2f}, " + ("on the prior alone (the budget let it finish fewer than "
                                              f"{MIN_PAIRED_FOLDS} folds)" if name in on_prior else f"{100 * p.prior_share:.0f} % from the prior"))

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


__all__ = ["MIN_PAIRED_FOLDS", "RULED_OUT", "STOPPED_BY_BUDGET", "decide", "is_eligible", "judgeable_if_stopped", "leaderboard",
           "on_prior_alone", "prior_pick"]
