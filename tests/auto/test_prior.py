"""The prior learned on the meta-benchmark (issue 28, part 2): leave-one-dataset-out fitting, the JSON file's round
trip and its refusal of malformed or hostile files, keys and fallbacks, widening outside the fitted range."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from visiontune.auto.candidates import Candidate, Family, family_candidates
from visiontune.auto.prior import (
    FEATURES, MAX_BYTES, MetaPrior, backbone_key, candidate_kind, feature_vector, fit_prior, load_prior, lodo_residuals, one_se_choice,
    resolve_prior,
)
from visiontune.auto.schedule import FlatPrior
from visiontune.errors import ConfigError

VIT = {"backbone": "vit_small_patch14_dinov2", "img_size": 112, "family": "transformer", "shots_per_class": 10,
       "classes": 5, "probe_cv_accuracy": 0.6, "probe_cv_logloss": 0.9, "probe_train_accuracy": 1.0, "probe_gap": 0.4,
       "prototype_gap": -0.03, "gray": False}
LORA = family_candidates(Family("transformer", 12))[0]


def test_candidates_map_to_the_meta_benchmark_kinds() -> None:
    kinds = [candidate_kind(c) for c in family_candidates(Family("transformer", 12))]
    assert kinds == ["lora", "lora_lastk", "dora", "mona", "full"]
    assert [candidate_kind(c) for c in family_candidates(Family("cnn", 16))] == kinds  # Mona: skipped later, on a CNN
    assert candidate_kind(Candidate("bitfit", ("method.name=bitfit",))) is None
    assert candidate_kind(Candidate("nearest prototype", ("method.name=prototype",), cheap=True)) == "prototype"
    assert candidate_kind(Candidate("linear probe", ("method.name=linear",), cheap=True)) is None  # the reference
    assert candidate_kind(Candidate("odd", ("method.name=lora", "method.blocks=0:3"))) is None
    assert backbone_key("vit_small_patch14_dinov2.lvd142m", 112) == "dinov2-112"
    assert backbone_key("tf_efficientnet_lite0", None) == "lite0-224"
    assert backbone_key("vit_small_patch14_dinov2", None) is None and backbone_key("test_vit", 32) is None


def test_lodo_residuals_never_use_the_held_out_dataset() -> None:
    from sklearn.dummy import DummyRegressor

    # A mean-only model: each dataset's residual is its value minus the mean of the *other* datasets' rows.
    y = np.array([1.0, 1.0, 2.0, 2.0, 2.0, 6.0])
    sets = ["a", "a", "b", "b", "b", "c"]
    res, rms = lodo_residuals(np.zeros((6, 1)), y, sets, DummyRegressor)
    assert list(res) == pytest.approx([1 - 12 / 4, 1 - 12 / 4, 2 - 8 / 3, 2 - 8 / 3, 2 - 8 / 3, 6 - 8 / 5])
    per_set = [(1 - 3) ** 2, (2 - 8 / 3) ** 2, (6 - 8 / 5) ** 2]  # each dataset weighs the same
    assert rms == pytest.approx(math.sqrt(sum(per_set) / 3))


def test_fitted_prior_sd_comes_from_other_datasets(meta_table) -> None:
    data = fit_prior(meta_table())
    m = data["models"]["dinov2-112"]["lora"]
    assert m["datasets"] == 6 and m["rows"] == 36
    # Per-dataset offsets are invisible to a model that never saw the dataset: the LODO sd exceeds the in-sample one.
    assert m["sd"] > m["fit_sd"]
    assert set(data["models"]) == {"dinov2-112", "lite0-224", "family transformer", "family cnn", "pooled"}
    assert "mona" not in data["models"]["pooled"]  # no row ran it: no model, a flat prior
    assert data["models"]["dinov2-112"]["prototype"]["intercept"] == pytest.approx(-0.03, abs=0.01)  # it trails the probe
    few = fit_prior(meta_table(datasets=2))
    assert few["models"] == {}  # two datasets cannot be judged leave-one-dataset-out


def test_round_trip_keys_fallbacks_and_widening(tmp_path: Path, meta_table) -> None:
    # datasets that differ little beyond what the features say: the features' model wins by more than one SE
    data = fit_prior(meta_table(offset_sd=0.01), provenance={"date": "2026-12-07", "code": "abc1234"})
    assert data["models"]["dinov2-112"]["lora"]["model"] == "all features"
    path = tmp_path / "prior.json"
    path.write_text(json.dumps(data))
    prior = load_prior(path)
    direct = MetaPrior(data)
    g = prior.gain(LORA, VIT)
    assert g == direct.gain(LORA, VIT) and g.source == "dinov2-112" and g.kind == "lora" and not g.outside
    # the synthetic gain is 0.20 - 0.25 * probe accuracy (+ dataset offsets): about +5 points at 0.6
    assert g.mean == pytest.approx(0.05, abs=0.04) and 0 < g.sd < 0.1
    assert prior.gain(LORA, {**VIT, "backbone": "test_vit", "img_size": None}).source == "family transformer"
    assert prior.gain(LORA, {**VIT, "backbone": "x", "family": "unknown"}).source == "pooled"
    assert prior.gain(Candidate("bitfit", ("method.name=bitfit",)), VIT).flat
    assert prior.gain(family_candidates(Family("transformer", 12))[3], VIT).flat  # mona: never run, flat
    far = prior.gain(LORA, {**VIT, "shots_per_class": 500})
    assert far.outside == ("shots_per_class",) and far.sd > 2 * g.sd
    missing = prior.gain(LORA, {k: v for k, v in VIT.items() if k != "shots_per_class"})
    assert missing.missing == ("shots_per_class",) and missing.sd > g.sd
    # scheduling: the expected improvement is positive, and higher where the prior expects more
    def task(acc: float) -> dict:
        return {**VIT, "probe_cv_accuracy": acc, "probe_cv_logloss": 1.6 - 1.2 * acc, "probe_gap": 1 - acc}

    def fewer(shots: int) -> dict:  # fewer shots, a lower probe accuracy: more to gain (what the table holds)
        return {**task(0.45 + 0.08 * math.log2(shots / 5)), "shots_per_class": shots}

    assert prior.gain(LORA, fewer(5)).mean > prior.gain(LORA, fewer(20)).mean
    assert 0 < prior.expected_gain(LORA, fewer(20)) < prior.expected_gain(LORA, fewer(5))
    near = prior.describe(VIT)["nearest"]
    assert len(near) == 3 and all(t["backbone"] == "dinov2-112" for t in near)
    assert near[0]["distance"] <= near[1]["distance"] <= near[2]["distance"]
    assert prior.describe(VIT)["provenance"]["code"] == "abc1234"
    assert len(feature_vector(VIT)) == len(FEATURES) and None not in feature_vector(VIT)



def _one_model(gain, n_sets: int = 6, per_set: int = 8, seed: int = 0) -> dict:
    """A prior fitted on rows whose LoRA gain is ``gain(meta, rng)``, for one backbone (dinov2-112)."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n_sets):
        for t in range(per_set):
            meta = {**{k: VIT[k] for k in ("classes", "probe_cv_logloss", "probe_gap", "prototype_gap", "gray")},
                    "shots_per_class": (5, 10, 20, 50)[t % 4], "probe_cv_accuracy": float(rng.uniform(0.3, 0.9))}
            rows.append({"task": f"s{d}/{t}", "dataset": f"s{d}", "backbone": "dinov2-112", "backbone_family": "transformer",
                         "meta": meta, "test": {"probe": 0.5, "lora": 0.5 + gain(meta, rng)}})
    return fit_prior(rows)["models"]["dinov2-112"]["lora"]


def test_the_prior_keeps_the_model_that_predicts_other_datasets_best() -> None:
    # No feature says anything about the gain: the mean gain predicts a new dataset best, and is kept
    flat = _one_model(lambda meta, rng: 0.08 + rng.normal(0, 0.03))
    assert flat["model"] == "intercept only" and flat["coef"] == [0.0] * len(FEATURES)
    assert flat["intercept"] == pytest.approx(0.08, abs=0.01) and flat["sd"] == pytest.approx(flat["lodo_sd"]["intercept only"], abs=1e-5)
    prior = MetaPrior({**fit_prior([]), "models": {"dinov2-112": {"lora": flat}}})
    far = prior.gain(LORA, {**VIT, "probe_cv_accuracy": 5.0, "shots_per_class": 4096})
    assert far.outside == () and far.sd == pytest.approx(flat["sd"])  # features it does not read widen nothing
    assert prior.gain(LORA, {k: v for k, v in VIT.items() if k != "probe_gap"}).missing == ()
    # The gain falls with the probe's accuracy: every feature's model wins, and reads it
    slope = _one_model(lambda meta, rng: 0.3 - 0.4 * meta["probe_cv_accuracy"] + rng.normal(0, 0.01))
    assert slope["model"] == "all features" and slope["sd"] < slope["lodo_sd"]["intercept only"] / 3
    assert slope["coef"][[n for n, _ in FEATURES].index("probe_cv_accuracy")] < 0


def test_a_richer_model_must_beat_the_simpler_by_more_than_one_standard_error() -> None:
    simple = np.array([0.004, 0.002, 0.006, 0.003, 0.005])  # mean squared residual per left-out dataset
    assert one_se_choice([simple, simple * 0.97, simple * 0.95]) == 0  # 3-5 % lower: chance, the mean gain is kept
    assert one_se_choice([simple, simple * 0.3, simple * 0.29]) == 1  # far lower: log2 shots; the richest adds nothing
    assert one_se_choice([simple, simple * 0.9, simple * 0.1]) == 2
    assert one_se_choice([simple * 0.5, simple, simple]) == 0
    assert one_se_choice([np.array([0.004])]) == 0  # one dataset: no standard error, the lowest

def _good(meta_table) -> dict:
    return fit_prior(meta_table(datasets=3, tasks=3))


@pytest.mark.parametrize("damage, words", [
    (lambda d: d["models"]["pooled"]["lora"].update(coef=[1.0]), "coef must be 7 finite numbers"),
    (lambda d: d["models"]["pooled"]["lora"].update(sd=-0.1), "sd must be a finite number above zero"),
    (lambda d: d["models"]["pooled"]["lora"].update(intercept="__import__('os')"), "intercept must be a finite number"),
    (lambda d: d["models"]["pooled"].update(explora={}), "unknown kind"),
    (lambda d: d.update(format="pickle"), "format/version"),
    (lambda d: d["features"][0].update(transform="eval"), "transform in"),
    (lambda d: d["tasks"].append({"task": 1}), "tasks["),
    (lambda d: d.pop("provenance"), "'provenance' must be an object"),
])
def test_malformed_prior_files_are_refused_naming_the_problem(tmp_path: Path, meta_table, damage, words) -> None:
    data = _good(meta_table)
    damage(data)
    path = tmp_path / "prior.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="malformed") as e:
        load_prior(path)
    assert words in str(e.value) and str(path) in str(e.value) and "fit_prior.py" in str(e.value)


def test_hostile_prior_files_are_refused_without_running_anything(tmp_path: Path, meta_table) -> None:
    text = json.dumps(_good(meta_table))
    cases = {
        "nan.json": text.replace('"sd": ', '"sd": NaN, "x": ', 1),  # JSON's non-standard constants
        "huge.json": text.replace('"sd": ', '"sd": 1e400, "x": ', 1),  # parses to inf
        "deep.json": "[" * 200_000 + "]" * 200_000,
        "pickle.json": pickle.dumps({"a": 1}),
        "list.json": "[1, 2]",
        "empty.json": "",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ConfigError, match="prior file"):
            load_prior(path)
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(MAX_BYTES + 1)
    with pytest.raises(ConfigError, match="more than"):
        load_prior(big)


def test_prior_option_resolves(tmp_path: Path, meta_table) -> None:
    assert isinstance(resolve_prior("flat"), FlatPrior)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_good(meta_table)))
    assert isinstance(resolve_prior(str(path)), MetaPrior)
    with pytest.raises(ConfigError, match="neither"):
        resolve_prior(str(tmp_path / "absent.json"))


def test_auto_dry_run_names_the_prior_it_was_given(tmp_path: Path, meta_table, capsys) -> None:
    from visiontune.cli import main

    path = tmp_path / "p.json"
    path.write_text(json.dumps(fit_prior(meta_table(), provenance={"left_out": ["set9"]})))
    tiny = ["backbone.name=test_vit", "backbone.weights=none", "data.train_per_class=4", "data.test_per_class=3"]
    assert main(["auto", "digits", *tiny, "--dry-run", "--prior", str(path), "--cost-margin", "1.5",
                 "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert f"meta, learned on 6 datasets ({path})" in out and "cost margin 1.5 points" in out
    assert main(["auto", "digits", *tiny, "--dry-run", "--prior", "flat", "--out", str(tmp_path / "y")]) == 0
    assert "flat (the folds alone)" in capsys.readouterr().out
