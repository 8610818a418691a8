"""Active-learning simulation: does ``visiontune suggest`` pick better images to label than a random draw?

For each dataset (features from ``benchmarks/suggest/features.py``: offline DINOv2-S, 112 px, pooled pre-logits),
a fixed test split of ``--test-per-class`` images per class is held out (seed 0) and the rest is the unlabeled
pool, its labels hidden. Starting from 0 labels, each round asks a strategy of :mod:`visiontune.suggest.strategies`
(the same ``select`` the command runs) for the images that bring the labeled set to K labels per class on average
(K in ``--per-class``), reveals their labels, fits the linear probe as ``method.name=linear`` does (``fit_probe_head``:
standardised features, L2 logistic regression; C by grouped CV, or fixed with ``--probe-c``: the committed results
use ``--probe-c 0.1``, the C the CV chose at 20 and 50 labels/class in a pilot, because the CV made every round
~20x dearer on the shared 2-core CPU) and records its test accuracy.
Uncertainty strategies (margin, entropy, BADGE) have no model before the first labels: their first round is a random
draw. ``--strategies auto`` with ``--auto-coverage/--auto-uncertainty/--auto-switch`` and ``--label`` simulates a
composition as a whole policy; ``--strategies auto`` alone, the shipped constants.

Usage (repo root; ``benchmarks/suggest/README.md`` has every command of the committed results)::

    python benchmarks/suggest/simulate.py --cache runs/suggest/features --out benchmarks/suggest/results \\
        --datasets neu_steel6 flowers5 pbc_blood8 aid_aerial10 dtd10 isic_skin7 --seeds 0 1 2 \\
        --strategies random typiclust probcover margin entropy badge --probe-c 0.1
    python benchmarks/suggest/simulate.py ... --strategies auto --auto-coverage random --auto-uncertainty margin \\
        --auto-switch 5 --probe-c 0.1 --label random-then-margin@5
    python benchmarks/suggest/analyze.py --choose      # -> results/auto_choice.json, table.md, criterion.md, curves.png

Rows go to ``--out/rounds.jsonl`` (one per dataset x strategy x seed x round; a finished (dataset, strategy,
seed) is skipped when the script runs again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from visiontune.methods.baselines import fit_probe_head
from visiontune.suggest import strategies as st


def load_dataset(cache: Path, name: str, test_per_class: int) -> dict:
    with np.load(cache / f"dinov2-112--{name}.npz", allow_pickle=False) as z:
        ids, x = z["ids"].tolist(), z["x"].astype(np.float32)
    names = [i.replace("\\", "/").split("/")[-2] for i in ids]
    classes = sorted(set(names))
    y = np.array([classes.index(c) for c in names])
    rng = np.random.default_rng(0)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:test_per_class] for c in range(len(classes))])
    pool = np.setdiff1d(np.arange(len(y)), test)
    return {"x": x, "y": y, "classes": classes, "test": np.sort(test), "pool": pool, "ids": ids}


PROBE_C: float | None = None
"""Fixed inverse L2 strength of the probe (``--probe-c``); None = chosen by grouped CV as ``method.name=linear`` does."""


CV_AT: tuple[int, ...] = ()
"""Budgets (labels per class) at which the row also records ``accuracy_cv``: the probe refitted with C chosen by grouped
CV, as ``method.name=linear`` does (``--cv-at``); the picks still come from the fixed-C probe, so the policy is the
same and only the scoring probe differs."""


def probe(x: np.ndarray, y: np.ndarray, n_classes: int, c: float | None = None) -> nn.Linear:
    head = nn.Linear(x.shape[1], n_classes)
    fit_probe_head(head, (torch.from_numpy(x), torch.from_numpy(y), np.arange(len(y))), None, c=c)
    return head


def predict(head: nn.Linear, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(head(torch.from_numpy(x)), 1).numpy()


def run_one(d: dict, strategy: str, seed: int, per_class: list[int], keep_labeled: bool = False) -> list[dict]:
    """One whole policy from 0 labels: a row per round; ``keep_labeled`` adds the round's labeled set to its row
    (``labeled``: indices into ``d["x"]``, in the order they were picked; ``lora_rounds.py`` fine-tunes on it)."""
    x, y, C = d["x"], d["y"], len(d["classes"])
    pool = d["pool"]
    labeled: list[int] = []  # indices into x
    head = None
    rows = []
    for r, k in enumerate(per_class):
        target = min(k * C, len(pool))
        budget = target - len(labeled)
        if budget <= 0:
            continue
        unl = np.setdiff1d(pool, labeled)
        name = strategy
        if strategy in ("margin", "entropy", "badge") and head is None:
            name = "random"  # no model before the first labels
        t0 = time.perf_counter()
        probs = None if head is None else (lambda h=head, u=unl: (predict(h, x[u]), d["classes"]))
        picks = st.select(name, x[unl], budget, seed * 1000 + r, labeled=x[labeled] if labeled else None,
                          probs=probs, n_classes=C)
        sel_s = time.perf_counter() - t0
        labeled += [int(unl[p.index]) for p in picks]
        ly = y[labeled]
        if len(set(ly.tolist())) >= 2:
            head = probe(x[labeled], ly, C, PROBE_C)
            acc = float((predict(head, x[d["test"]]).argmax(1) == y[d["test"]]).mean())
        else:  # one class seen: the probe can only predict it
            head, acc = None, float((y[d["test"]] == ly[0]).mean())
        extra = {}
        if k in CV_AT and head is not None:
            t1 = time.perf_counter()
            cv = probe(x[labeled], ly, C, None)
            extra = {"accuracy_cv": float((predict(cv, x[d["test"]]).argmax(1) == y[d["test"]]).mean()),
                     "cv_s": round(time.perf_counter() - t1, 3)}
        rows.append({"per_class": k, "labels": len(labeled), "accuracy": acc, "classes_seen": int(len(set(ly.tolist()))),
                     "select_s": round(sel_s, 3), "rule": st.auto_choice(len(labeled) - budget, C, budget, probs is not None)
                     if strategy == "auto" else name, **extra, **({"labeled": list(labeled)} if keep_labeled else {})})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path("runs/suggest/features"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/suggest/results"))
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--strategies", nargs="+", default=["random", "typiclust", "probcover", "margin"])
    p.add_argument("--per-class", nargs="+", type=int, default=[2, 5, 10, 20, 30, 50])
    p.add_argument("--test-per-class", type=int, default=30)
    p.add_argument("--auto-switch", type=float, default=None, help="override AUTO_SWITCH_PER_CLASS (labels per class)")
    p.add_argument("--auto-coverage", default=None, help="override AUTO_COVERAGE")
    p.add_argument("--auto-uncertainty", default=None, help="override AUTO_UNCERTAINTY")
    p.add_argument("--probe-c", type=float, default=None, help="fix the probe's C (default: grouped CV, as the product)")
    p.add_argument("--cv-at", nargs="*", type=int, default=[], help="budgets (labels per class) at which the row also "
                   "records accuracy_cv, the probe with C chosen by grouped CV (the picks keep the fixed-C probe)")
    p.add_argument("--label", default=None, help="strategy name written to the rows (default: the strategy)")
    args = p.parse_args()
    global PROBE_C, CV_AT
    PROBE_C, CV_AT = args.probe_c, tuple(args.cv_at)
    if args.auto_switch is not None:
        st.AUTO_SWITCH_PER_CLASS = args.auto_switch
    if args.auto_coverage is not None:
        st.AUTO_COVERAGE = args.auto_coverage
    if args.auto_uncertainty is not None:
        st.AUTO_UNCERTAINTY = args.auto_uncertainty
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "rounds.jsonl"
    done = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["dataset"], r["strategy"], r["seed"]))
    jobs = [(n, s, seed) for n in args.datasets for s in args.strategies for seed in args.seeds]
    cache: dict[str, dict] = {}
    for name, strategy, seed in tqdm(jobs, desc="simulation", file=sys.stdout):
        label = args.label or strategy
        if (name, label, seed) in done:
            continue
        if name not in cache:
            cache[name] = load_dataset(args.cache, name, args.test_per_class)
        rows = run_one(cache[name], strategy, seed, args.per_class)
        with path.open("a") as f:
            for r in rows:
                f.write(json.dumps({"dataset": name, "strategy": label, "seed": seed, **r}) + "\n")


if __name__ == "__main__":
    main()
