"""benchmarks/meta/run.py end to end on two tiny tasks: the table's schema, the fixed splits, and a rerun that
adds nothing (resumable)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "meta" / "run.py"

ROW_KEYS = {"task", "dataset", "family", "backbone", "backbone_family", "shots", "seed", "classes", "pool", "n_test",
            "meta", "folds", "test", "seconds", "machine", "code"}
META_KEYS = {"shots_per_class", "classes", "pool", "gray", "image_px_median", "probe_cv_accuracy", "probe_cv_logloss",
             "probe_train_accuracy", "probe_gap", "prototype_cv_accuracy", "prototype_gap"}


@pytest.fixture(scope="module")
def meta(script_module):
    return script_module("visiontune_bench_meta", SCRIPT)


def _argv(tmp: Path) -> list[str]:
    # 2 tasks: digits cut to 3 classes (the class-subset path), 2 and 3 shots per class, seed 0, on a tiny random ViT
    # (2 blocks: the last-blocks LoRA adapts 1); fine-tunes of 2 optimizer steps x 2 epochs, in this process.
    return ["run", "--datasets", "digits", "--backbones", "tiny-vit", "--shots", "2", "3", "--seeds", "0",
            "--methods", "lora", "lora_lastk", "--fold-methods", "lora", "--finetune-folds", "2", "--test-per-class", "3", "--pool-per-class", "4", "--max-classes", "3",
            "--steps", "2", "--overrides", "optim.epochs=2", "--workers", "0",
            "--out", str(tmp / "out"), "--cache", str(tmp / "cache"), "--runs", str(tmp / "runs")]


def test_harness_end_to_end_schema_and_resume(meta, tmp_path: Path) -> None:
    assert meta.main(_argv(tmp_path)) == 0
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "tasks.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == ["digits/k3/s2/seed0", "digits/k3/s3/seed0"]
    for r in rows:
        assert ROW_KEYS <= set(r) and META_KEYS <= set(r["meta"])
        assert r["family"] == "handwriting" and r["backbone_family"] == "transformer"
        assert r["classes"] == 3 and r["pool"] == 3 * r["shots"] and r["n_test"] == 9
        assert r["meta"]["shots_per_class"] == r["shots"] and r["meta"]["gray"] is True
        assert set(r["test"]) == {"probe", "prototype", "lora", "lora_lastk"}
        assert all(0.0 <= v <= 1.0 for v in r["test"].values())
        k = min(5, r["shots"])  # auto's k = min(--folds 5, smallest class)
        assert len(r["folds"]["probe"]) == len(r["folds"]["prototype"]) == k
        assert r["meta"]["probe_cv_accuracy"] == pytest.approx(np.mean(r["folds"]["probe"]))
        assert r["meta"]["probe_gap"] == pytest.approx(r["meta"]["probe_train_accuracy"] - r["meta"]["probe_cv_accuracy"])
        assert {"features", "cheap", "lora", "lora_lastk", "lora_per_fold"} <= set(r["seconds"])
        # The fold unit fine-tuned LoRA on the task's first 2 folds: a score per fold, in [0, 1].
        assert len(r["folds"]["lora"]) == 2 and all(0.0 <= v <= 1.0 for v in r["folds"]["lora"])
        assert "torch" in r["machine"] and r["code"]
    assert (out / "README.md").read_text().startswith("# Meta-benchmark results")
    # Every feature is cached once per image; the run directories of the fine-tunes are not kept.
    assert len(list((tmp_path / "cache").glob("tiny-vit--digits.npz"))) == 1
    assert not any((tmp_path / "runs").glob("*/adapter.safetensors"))

    units = (out / "units.jsonl").read_text()
    assert len(units.splitlines()) == 8  # 2 tasks x (cheap + 2 fine-tunes + 1 fold unit)
    fold_units = [json.loads(line) for line in units.splitlines() if json.loads(line)["method"] == "lora_folds"]
    assert [u["folds_k"] for u in fold_units] == [2, 3] and all(u["fold_n"] == [3, 3] for u in fold_units)
    assert meta.main(_argv(tmp_path)) == 0
    assert (out / "units.jsonl").read_text() == units  # a rerun adds nothing
    assert meta.main(["collect", "--out", str(out)]) == 0
    assert [json.loads(line) for line in (out / "tasks.jsonl").read_text().splitlines()] == rows


def test_fixed_test_set_and_nested_shots(meta) -> None:
    d = meta.cut("digits", "digits", test_per_class=5, pool_per_class=10, max_classes=4)
    assert d.classes == 4 and len(d.test) == 20
    pool = np.concatenate(list(d.pool.values()))
    assert not set(pool) & set(d.test)
    again = meta.cut("digits", "digits", test_per_class=5, pool_per_class=10, max_classes=4)
    assert np.array_equal(d.test, again.test)  # the test set does not depend on anything but the dataset
    for seed in (0, 1):
        five, ten = d.shots(5, seed), d.shots(10, seed)
        assert set(five) <= set(ten) <= set(pool)  # nested, drawn from the pool only
        assert np.bincount(d.records.labels[five]).tolist() == [5] * 4
    assert not np.array_equal(np.sort(d.shots(5, 0)), np.sort(d.shots(5, 1)))


def test_schedule_runs_the_core_first(meta) -> None:
    U = meta.Unit
    units = [U(ds, 5, s, seed, b, m) for ds in ("a", "b") for s in (2, 10, 50) for seed in (0, 1)
             for b in ("dinov2-112", "lite0-224") for m in ("cheap", "lora", "lora_lastk", "dora")]
    order = meta.schedule(units, ["dinov2-112", "lite0-224"], [0, 1])
    assert sorted(order, key=str) == sorted(units, key=str)
    first_cheap = order[:2]  # 2 datasets x shots 10 (the core shot level present here)
    assert all(u.method == "cheap" and u.backbone == "dinov2-112" and u.seed == 0 for u in first_cheap)
    tunes = [u for u in order if u.method != "cheap"]
    assert (tunes[0].backbone, tunes[0].seed, tunes[0].shots, tunes[0].method) == ("dinov2-112", 0, 10, "lora")
    assert tunes[-1].backbone == "lite0-224"
    folds = meta.schedule(units + [U(ds, 5, 10, 0, "dinov2-112", "lora_folds") for ds in ("a", "b")],
                          ["dinov2-112", "lite0-224"], [0, 1])
    tunes = [(u.dataset, u.method) for u in folds if u.method != "cheap"][:4]
    assert tunes == [("a", "lora"), ("a", "lora_folds"), ("b", "lora"), ("b", "lora_folds")]  # a task at a time
