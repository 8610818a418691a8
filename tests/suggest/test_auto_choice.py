"""``auto``'s shipped rule is the one the simulation chose (benchmarks/suggest), and the choice is mechanical."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from visiontune.suggest import strategies as st

ROOT = Path(__file__).resolve().parents[2]
CHOICE = ROOT / "benchmarks" / "suggest" / "results" / "auto_choice.json"


@pytest.fixture(scope="module")
def analyze(script_module):
    return script_module("visiontune_bench_suggest_analyze", ROOT / "benchmarks" / "suggest" / "analyze.py")


def test_shipped_constants_are_the_committed_choice(analyze) -> None:
    choice = json.loads(CHOICE.read_text())
    switch = choice["switch_per_class"]
    assert st.AUTO_COVERAGE == choice["coverage"]
    assert st.AUTO_SWITCH_PER_CLASS == (math.inf if switch is None else switch)
    if switch is not None:
        assert st.AUTO_UNCERTAINTY == choice["uncertainty"]
    assert analyze.rule_of(choice["chosen"]) == {k: choice[k] for k in ("coverage", "uncertainty", "switch_per_class")}
    assert choice["ranking"][0] == choice["chosen"]
    assert choice["auto_rows_equal_chosen_rows"] is True  # the committed `auto` rows are the shipped constants' run


def test_policy_names_map_to_auto_constants(analyze) -> None:
    assert analyze.rule_of("badge") == {"coverage": "random", "uncertainty": "badge", "switch_per_class": 0.0}
    assert analyze.rule_of("typiclust") == {"coverage": "typiclust", "uncertainty": None, "switch_per_class": None}
    assert analyze.rule_of("random-then-margin@10") == {"coverage": "random", "uncertainty": "margin",
                                                        "switch_per_class": 10.0}
    assert analyze.rule_of("auto") is None and analyze.rule_of("typiclust-then-random@5") is None


def _rows(curves: dict[str, dict[int, float]]) -> str:
    """rounds.jsonl for two datasets and two seeds with the given mean accuracy per policy and budget."""
    out = []
    for d in ("a", "b"):
        for s, curve in curves.items():
            for seed, jitter in ((0, -0.01), (1, 0.01)):
                for k, y in curve.items():
                    out.append(json.dumps({"dataset": d, "strategy": s, "seed": seed, "per_class": k,
                                           "accuracy": y + jitter}))
    return "\n".join(out) + "\n"


def test_choice_is_the_lowest_criterion_then_the_smallest_loss_at_small_budgets(analyze, tmp_path) -> None:
    ks = (2, 5, 10, 20, 30, 50)
    random = dict(zip(ks, (0.30, 0.40, 0.50, 0.60, 0.65, 0.70)))
    # margin reaches random@20 at 10/class and random@50 at 30/class (ratios 0.5, 0.6) but trails at 5/class;
    # badge gets the same ratios without the loss; typiclust is random shifted down (never reaches)
    margin = dict(zip(ks, (0.30, 0.35, 0.60, 0.65, 0.70, 0.75)))
    badge = dict(zip(ks, (0.30, 0.40, 0.60, 0.65, 0.70, 0.75)))
    typi = {k: y - 0.05 for k, y in random.items()}
    (tmp_path / "rounds.jsonl").write_text(_rows({"random": random, "margin": margin, "badge": badge,
                                                  "typiclust": typi}))
    acc, by_seed = analyze.load(tmp_path)
    choice = analyze.choose(acc, by_seed, ["a", "b"], list(ks))
    assert choice["ranking"] == ["badge", "margin", "random", "typiclust"]
    assert choice["chosen"] == "badge" and choice["switch_per_class"] == 0.0 and choice["uncertainty"] == "badge"
    assert choice["ratio"] == {20: 0.5, 50: 0.6} and choice["meets_0.8"] == {20: True, 50: True}
    assert choice["policies"]["margin"]["loss_to_random_small_budgets_points"] == pytest.approx(-5 / 3, abs=0.01)
    assert choice["policies"]["typiclust"]["ratio"] == {20: 1.5, 50: 1.0}  # 50: never reached, max budget / N
    assert analyze.ratios(acc, ["a", "b"], list(ks), "typiclust", 50) == [None, None]
    assert choice["chosen_minus_runner_up_ratio"][20]["mean"] == 0.0


@pytest.mark.parametrize("switch", [0.0, 5.0, 10.0])
def test_auto_switches_after_the_switch_point(monkeypatch, switch) -> None:
    monkeypatch.setattr(st, "AUTO_SWITCH_PER_CLASS", switch)
    assert st.auto_choice(0, 0, 10, has_model=False) == st.AUTO_COVERAGE  # cold start: nothing to be uncertain about
    assert st.auto_choice(50, 5, 5, has_model=False) == st.AUTO_COVERAGE
    assert st.auto_choice(50, 1, 5, has_model=True) == st.AUTO_COVERAGE  # one class: no decision boundary
    if switch > 0:
        assert st.auto_choice(int(switch * 5) - 5, 5, 5, has_model=True) == st.AUTO_COVERAGE  # exactly `switch` after
    assert st.auto_choice(int(switch * 5), 5, 5, has_model=True) == st.AUTO_UNCERTAINTY


def test_auto_with_a_model_at_the_shipped_switch_picks_what_its_uncertainty_rule_picks() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6)).astype(np.float32)
    lab = x[:8]  # 2 labels per class for 4 classes: the simulation's first labeled round

    p = rng.dirichlet(np.ones(4), len(x))

    def probs():
        return p, ["a", "b", "c", "d"]

    n_after = (len(lab) + 4) / 4
    want = st.AUTO_UNCERTAINTY if n_after > st.AUTO_SWITCH_PER_CLASS else st.AUTO_COVERAGE
    auto = [p.index for p in st.select("auto", x, 4, 3, labeled=lab, probs=probs, n_classes=4)]
    rule = [p.index for p in st.select(want, x, 4, 3, labeled=lab, probs=probs, n_classes=4)]
    assert auto == rule
    cold = [p.index for p in st.select("auto", x, 4, 3, n_classes=4)]
    assert cold == [p.index for p in st.select(st.AUTO_COVERAGE, x, 4, 3, n_classes=4)]
