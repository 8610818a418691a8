"""``benchmarks/meta/fit_prior.py`` and ``benchmarks/meta/regret.py`` on a tiny synthetic meta-benchmark table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from visiontune.auto.prior import load_prior

META = Path(__file__).resolve().parents[2] / "benchmarks" / "meta"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"visiontune_meta_{name}", META / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _write(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_fit_prior_writes_a_valid_prior_leaving_datasets_out(tmp_path: Path, meta_table, capsys) -> None:
    fit = _script("fit_prior")
    table = _write(meta_table(datasets=4, tasks=3), tmp_path / "tasks.jsonl")
    out = tmp_path / "prior.json"
    assert fit.main(["--table", str(table), "--out", str(out), "--leave-out", "set1"]) == 0
    prior = load_prior(out)
    prov = prior.data["provenance"]
    assert prov["left_out"] == ["set1"] and "set1" not in prov["datasets"] and len(prov["datasets"]) == 3
    assert prov["table_sha256"] and prov["date"] and prov["code"] and "--leave-out set1" in prov["command"]
    assert "LODO sd" in capsys.readouterr().out
    assert fit.main(["--table", str(table), "--out", str(out), "--leave-out", "nope"]) == 2


def test_regret_is_leave_one_dataset_out_and_says_what_it_cannot_judge(meta_table, monkeypatch) -> None:
    regret = _script("regret")
    rows = meta_table(datasets=3, tasks=3)
    fitted_on: list[set[str]] = []
    real_fit = regret.fit_prior

    def spy(table_rows):
        fitted_on.append({r["dataset"] for r in table_rows})
        return real_fit(table_rows)

    monkeypatch.setattr(regret, "fit_prior", spy)
    result = regret.evaluate(rows)
    assert fitted_on == [{"set1", "set2"}, {"set0", "set2"}, {"set0", "set1"}]  # never the held-out dataset
    probe = result["regrets"]["always probe"][5]
    r5 = [r for r in rows if r["shots"] == 5]
    assert probe == pytest.approx([100 * (max(v for k, v in r["test"].items()) - r["test"]["probe"])
                                   for d in ("set0", "set1", "set2") for r in r5 if r["dataset"] == d])
    text = regret.markdown(result, "python benchmarks/meta/regret.py", 0.0)
    assert "| argmax CV | n/a (no fold scores)" in text and "| meta-prior Bayes | n/a (no fold scores)" in text
    assert "`python benchmarks/meta/regret.py`" in text

    monkeypatch.setattr(regret, "fit_prior", real_fit)
    folds = regret.evaluate(meta_table(datasets=3, tasks=3, fold_scores=True))
    for rule in regret.RULES:
        values = folds["regrets"][rule][10]
        assert values and min(values) >= 0 and np.isfinite(values).all(), rule
    assert "n/a" not in regret.markdown(folds, "x", 0.0)
    # the judged comparison: every rule on the same tasks (those where every rule could decide), one choice row each
    assert len({len(folds["common"][rule][10]) for rule in regret.RULES}) == 1
    assert len(folds["choices"]) == sum(len(folds["common"]["always probe"][s]) for s in regret.SHOTS)
    assert not any(result["common"][rule] for rule in regret.RULES)  # no fold scores: no common tasks
    # auto's rule: the prior alone where no fine-tune has fold scores, the meta-prior Bayes rule where one has
    assert result["regrets"]["auto's rule"][5] == result["regrets"]["prior only"][5]
    assert folds["common"]["auto's rule"][10] == folds["common"]["meta-prior Bayes"][10]
    # side by side, the zero-shot rule chooses among the methods with fold scores only, as the fold rules do
    from visiontune.auto.prior import MetaPrior, fit_prior

    prior = MetaPrior(fit_prior(rows))
    row = next(r for r in rows if r["shots"] == 10)
    assert regret._prior_only(row, prior, 0.0) in regret.KINDS  # the synthetic fine-tunes all gain
    assert regret._prior_only(row, prior, 0.0, {"probe", "prototype"}) in ("probe", "prototype")


def test_regret_cuts_every_methods_folds_to_those_the_fine_tunes_ran() -> None:
    regret = _script("regret")
    row = {"test": {"probe": 0.5, "prototype": 0.4, "lora": 0.6}, "meta": {"folds_k": 5},
           "folds": {"probe": [0.1, 0.2, 0.3, 0.4, 0.5], "prototype": [0.0] * 5, "lora": [0.6, 0.7]}}
    cut = regret._fold_ready(row)
    assert cut == {"probe": [0.1, 0.2], "prototype": [0.0, 0.0], "lora": [0.6, 0.7]}
    assert regret._k(row) == 5  # the held-out share stays 1/5 however many folds were fine-tuned
    assert regret._fold_ready({**row, "folds": {**row["folds"], "lora": [0.6]}}) is None  # one fold is no paired evidence
    no_test = {**row, "test": {"probe": 0.5, "prototype": 0.4}}
    assert regret._fold_ready(no_test) is None  # a fine-tune's folds without its test accuracy cannot be judged
