"""Leave-one-dataset-out regret of ``visiontune auto``'s decision rules on the meta-benchmark table.

    python benchmarks/meta/regret.py                      # -> benchmarks/meta/results/regret.md
    python benchmarks/meta/regret.py --table T.jsonl --out R.md --cost-margin 1

For every dataset, the prior is refitted on the other datasets' tasks (:func:`visiontune.auto.prior.fit_prior`), and
each of that dataset's tasks at 5, 10 and 20 shots per class is decided by every rule; a rule's regret on a task is
the per-task best test accuracy (over the methods the table ran on it) minus the test accuracy of the method it
chose, in points (0: it chose the best). Rules:

* ``always probe``, ``always default LoRA`` (``lora``; tasks without it are not counted);
* ``prior only``: the zero-shot rule, before any fine-tuning fold: the probe (gain 0), the prototype (its
  cross-validated gap to the probe, which the cheap stage measures) or the fine-tune with the highest prior mean gain
  less the cost margin;
* with the folds of fine-tunes (only tasks whose row holds ``folds`` for at least one fine-tune kind; otherwise
  "n/a (no fold scores)"), over the methods with fold scores, all cut to the folds the fine-tunes ran (the
  meta-benchmark's fold units fine-tune a task's first folds, as ``auto`` under a short budget sees only those): ``argmax CV`` (best fold mean), ``one-SE rule`` (the
  rule ``auto`` used before the posterior: best mean unless a method with at most half its seconds is within one
  corrected standard error, paired), ``flat-prior Bayes`` and ``meta-prior Bayes`` (:mod:`visiontune.auto.decision`
  with a flat and the learned prior);
* ``auto's rule``: what ``visiontune auto`` decides, the meta-prior Bayes rule where the task has fine-tune fold
  scores and the prior alone where it has none (a candidate the budget left without two finished folds).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.auto.candidates import Candidate
from visiontune.auto.decision import FLAT, choose, paired_floor, posterior
from visiontune.auto.prior import KINDS, MetaPrior, fit_prior, read_table
from visiontune.auto.stats import corrected_interval

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "benchmarks" / "meta" / "results" / "tasks.jsonl"
OUT = ROOT / "benchmarks" / "meta" / "results" / "regret.md"
SHOTS = (5, 10, 20)
CHEAP = ("probe", "prototype")
OVERRIDES = {"prototype": ("method.name=prototype",), "lora": ("method.name=lora",), "lora_lastk": ("method.name=lora", "method.blocks=last:4"),
             "dora": ("method.name=dora",), "mona": ("method.name=mona",), "full": ("method.name=full",)}
RULES = ("always probe", "always default LoRA", "prior only", "argmax CV", "one-SE rule", "flat-prior Bayes",
         "meta-prior Bayes", "auto's rule")
"""``auto's rule`` is what ``visiontune auto`` does: the meta-prior Bayes rule where the fine-tune has fold scores, the
prior alone where it has none (a candidate the budget left without two finished folds is judged on its prior)."""
NEED_FOLDS = {"argmax CV", "one-SE rule", "flat-prior Bayes", "meta-prior Bayes"}


def _features(row: dict[str, Any]) -> dict[str, Any]:
    return {**row["meta"], "backbone_key": row["backbone"], "family": row.get("backbone_family")}


def _seconds(row: dict[str, Any]) -> dict[str, float]:
    """Seconds per method (ties go to the cheaper); empty when the row does not say."""
    secs = row.get("seconds")
    return {k: float(v) for k, v in secs.items() if isinstance(v, (int, float))} if isinstance(secs, dict) else {}


def _k(row: dict[str, Any]) -> int:
    """The task's fold count (its folds' held-out share is 1/k however many of them were fine-tuned)."""
    return int(row["meta"].get("folds_k") or len(row["folds"]["probe"]))


def _bayes(row: dict[str, Any], prior: Any, margin: float) -> str:
    folds = row["folds"]
    k = _k(row)
    features = _features(row)
    posts = {}
    for m in folds:
        gain = FLAT if prior is None or m == "probe" else prior.gain(Candidate(m, OVERRIDES[m]), features)
        floor = 0.0 if m == "probe" else paired_floor(folds[m], folds["probe"], row["pool"] / k)
        posts[m] = posterior([a - b for a, b in zip(folds[m], folds["probe"])], 1.0 / k, gain, min_var=floor)
    return choose(posts, "probe", {m for m in posts if m not in CHEAP}, margin, _seconds(row))[0]


def _one_se(row: dict[str, Any]) -> str:
    """The rule ``auto`` used before the posterior (paired, corrected, one standard error, 'cheaper' = half the time)."""
    folds, secs = row["folds"], _seconds(row)
    k = _k(row)

    def cost(m: str) -> float:
        return float(secs.get(m, 0.0 if m in CHEAP else 1.0))

    best = max(folds, key=lambda m: (np.mean(folds[m]), -cost(m)))
    tied = [m for m in folds if m != best and cost(m) <= 0.5 * cost(best)
            and not corrected_interval([a - b for a, b in zip(folds[best], folds[m])], 1 / max(k - 1, 1)).beyond_one_se()]
    return max(tied, key=lambda m: (np.mean(folds[m]), -cost(m))) if tied else best


def _prior_only(row: dict[str, Any], prior: MetaPrior, margin: float, among: set[str] | None = None) -> str:
    """The zero-shot choice among the task's tested methods (or only those ``among``)."""
    features = _features(row)
    score = {"probe": 0.0, "prototype": float(row["meta"].get("prototype_gap", -np.inf))}
    for m in KINDS:
        if m in row["test"]:
            score[m] = prior.gain(Candidate(m, OVERRIDES[m]), features).mean - margin
    return max((m for m in score if among is None or m in among), key=lambda m: score[m])


def _fold_ready(row: dict[str, Any]) -> dict[str, list[float]] | None:
    """The fold scores the rules compare, or None: the probe's and at least one fine-tune's, every method with a
    test accuracy, cut to the folds every one of them ran (a fold unit fine-tunes the task's first folds only; the
    cheap unit scored all k), at least two."""
    folds = row.get("folds") or {}
    usable = {m: v for m, v in folds.items() if (m in CHEAP or m in KINDS) and m in row["test"] and v}
    if "probe" not in usable or not any(m in KINDS for m in usable):
        return None
    n = min(len(v) for v in usable.values())
    return {m: list(v[:n]) for m, v in usable.items()} if n >= 2 else None


def evaluate(rows: list[dict[str, Any]], margin: float = 0.0, shots: tuple[int, ...] = SHOTS) -> dict[str, Any]:
    """rule -> shots -> list of per-task regrets (points) over every task the rule could decide (``regrets``), the
    same on the tasks where EVERY rule decided (``common``: the fair comparison), the per-task choices (``choices``)
    and the counts of tasks with fold scores."""
    regrets: dict[str, dict[int, list[float]]] = {r: defaultdict(list) for r in RULES}
    common: dict[str, dict[int, list[float]]] = {r: defaultdict(list) for r in RULES}
    choices: list[dict[str, Any]] = []
    with_folds: dict[int, int] = defaultdict(int)
    tasks: dict[int, int] = defaultdict(int)
    datasets = sorted({r["dataset"] for r in rows})
    for held in datasets:
        prior = MetaPrior(fit_prior([r for r in rows if r["dataset"] != held]), f"all but {held}")
        for row in rows:
            if row["dataset"] != held or row.get("shots", row["meta"].get("shots_per_class")) not in shots:
                continue
            s = int(row.get("shots", row["meta"].get("shots_per_class")))
            test = {m: v for m, v in row["test"].items() if m in CHEAP or m in KINDS}
            if "probe" not in test:
                continue
            tasks[s] += 1
            best = max(test.values())
            chosen = {"always probe": "probe", "always default LoRA": "lora" if "lora" in test else None,
                      "prior only": _prior_only(row, prior, margin)}
            chosen["auto's rule"] = chosen["prior only"]
            folds = _fold_ready(row)
            if folds is not None:
                with_folds[s] += 1
                ready = {**row, "folds": folds}
                chosen.update({"argmax CV": max(ready["folds"], key=lambda m: np.mean(ready["folds"][m])),
                               "one-SE rule": _one_se(ready), "flat-prior Bayes": _bayes(ready, None, margin),
                               "meta-prior Bayes": _bayes(ready, prior, margin)})
                chosen["auto's rule"] = chosen["meta-prior Bayes"]
            regret = {rule: 100 * (best - test[m]) for rule, m in chosen.items() if m is not None}
            for rule, v in regret.items():
                regrets[rule][s].append(v)
            if len(regret) == len(RULES):
                # judged side by side, every rule chooses among the same methods: those with fold scores
                chosen["prior only"] = _prior_only(row, prior, margin, set(folds))
                regret["prior only"] = 100 * (best - test[chosen["prior only"]])
                for rule, v in regret.items():
                    common[rule][s].append(v)
                choices.append({"task": row.get("task", f"{row['dataset']}/s{s}"), "shots": s,
                                "test": {m: round(100 * v, 1) for m, v in test.items()},
                                "chosen": {rule: chosen[rule] for rule in RULES}})
    return {"regrets": regrets, "common": common, "choices": choices, "with_folds": dict(with_folds),
            "tasks": dict(tasks), "datasets": datasets}


def _table(regrets: dict[str, dict[int, list[float]]], shots: tuple[int, ...], common: bool) -> list[str]:
    lines = ["| rule | " + " | ".join(f"{s} shots/class: mean (worst), tasks" for s in shots) + " |",
             "|:---|" + "---:|" * len(shots)]
    for rule in RULES:
        cells = []
        for s in shots:
            v = regrets[rule].get(s, [])
            if not v:
                cells.append("n/a (no task with every rule's evidence)" if common else
                             "n/a (no fold scores)" if rule in NEED_FOLDS else "n/a (no tasks)")
            else:
                cells.append(f"{np.mean(v):.2f} ({max(v):.1f}), {len(v)}")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict[str, Any], command: str, margin: float, shots: tuple[int, ...] = SHOTS) -> str:
    counts = ", ".join(f"{s}: {result['tasks'].get(s, 0)} tasks ({result['with_folds'].get(s, 0)} with fine-tune fold scores)"
                       for s in shots)
    short = {"always probe": "probe", "always default LoRA": "LoRA", "prior only": "prior", "argmax CV": "argmax",
             "one-SE rule": "1-SE", "flat-prior Bayes": "flat", "meta-prior Bayes": "meta", "auto's rule": "auto"}
    picks = ["| task | test accuracy (%) | " + " | ".join(short[r] for r in RULES) + " |",
             "|:---|:---|" + ":---|" * len(RULES)]
    for c in sorted(result.get("choices", []), key=lambda c: (c["shots"], c["task"])):
        acc = ", ".join(f"{m} {v:.1f}" for m, v in sorted(c["test"].items()))
        picks.append(f"| {c['task']} | {acc} | " + " | ".join(str(c["chosen"][r]) for r in RULES) + " |")
    return "\n".join([
        "# Leave-one-dataset-out regret of the decision rules",
        "",
        f"`{command}`",
        "",
        "Regret: the per-task best test accuracy minus the chosen method's, in points (0 = the best was chosen; lower "
        f"is better); mean over tasks, the worst in brackets. Cost margin {margin:g} points. For every dataset the "
        f"prior is refitted without its tasks. Datasets: {len(result['datasets'])} ({', '.join(result['datasets'])}); "
        f"{counts}.",
        "",
        "## Every rule on the same tasks",
        "",
        "The tasks where every rule could decide (the probe's and a fine-tune's fold scores and test accuracies), every "
        "rule choosing among the same methods (those with fold scores; the regret is still against the best of every "
        "method tested on the task): the comparison the rules are judged by.",
        "",
        *_table(result["common"], shots, True),
        "",
        "## Each rule on every task it could decide",
        "",
        *_table(result["regrets"], shots, False),
        "",
        "## The choices, task by task (the tasks of the first table)",
        "",
        *picks,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", type=Path, default=TABLE)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--cost-margin", type=float, default=0.0, help="points (as visiontune auto --cost-margin)")
    args = p.parse_args(argv)
    rows = read_table(args.table)
    result = evaluate(rows, args.cost_margin / 100)
    command = " ".join(["python benchmarks/meta/regret.py", *(sys.argv[1:] if argv is None else argv)])
    text = markdown(result, command, args.cost_margin)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
