"""benchmarks/suggest/lora_rounds.py on a tiny random ViT: the replayed picks are the simulation's, each fine-tune
trains on exactly that round's labeled images, a rerun adds nothing, and picks that differ from the simulation's
committed rows are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from visiontune.backbones import build_transform, create_backbone
from visiontune.config import load_config
from visiontune.data.sources import load_records

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "suggest" / "lora_rounds.py"


@pytest.fixture(scope="module")
def lr(script_module):
    return script_module("visiontune_bench_suggest_lora_rounds", SCRIPT)


@pytest.fixture
def toy(lr, tmp_path: Path, image_maker, tiny_backbone) -> tuple[Path, Path]:
    """A 3-class image folder (14 images a class) and its features in the simulation's cache layout (the tiny
    ViT's pooled features, so the LP-FT head fits the model that is fine-tuned)."""
    data = tmp_path / "data" / "toy"
    image_maker(data, 14, sub=True)
    records = load_records(str(data))
    cfg = load_config(None, overrides=["data.dataset=digits", *tiny_backbone])
    model = create_backbone(cfg.backbone, 0).eval()
    ob = lr.meta.ob  # the extraction of benchmarks/suggest/features.py, into the file name the simulation reads
    cache = ob.FeatureCache(tmp_path / "cache", ob.BACKBONES["dinov2-112"], "toy")
    ob.extract(model, build_transform(model, 32, train=False), records, list(range(len(records))), cache, "toy")
    cache.save()
    return tmp_path / "data", tmp_path / "cache"


def _argv(tmp: Path, data: Path, cache: Path, *extra: str) -> list[str]:
    # 4 test images a class, 10 in the pool; rounds to 1, 2 and 4 labels a class; fine-tunes of 2 steps x 2 epochs
    return ["--cache", str(cache), "--data-root", str(data), "--out", str(tmp / "out"), "--sim-rows", str(tmp / "sim.jsonl"),
            "--datasets", "toy", "--strategies", "random", "auto", "--per-class", "2", "4", "--rounds", "1", "2", "4",
            "--test-per-class", "4", "--backbone", "tiny-vit", "--steps", "2", "--runs", str(tmp / "runs"), *extra]


def test_replay_is_the_simulation_and_each_finetune_uses_its_picks(lr, toy, tmp_path: Path, monkeypatch) -> None:
    data, cache = toy
    sim, meta = lr.sim, lr.meta
    sim.PROBE_C = 0.1
    d = sim.load_dataset(cache, "toy", 4)
    # the simulation's own rows (what rounds.jsonl holds) for the policies, then written as its committed rows
    plain = {s: sim.run_one(d, s, 0, [1, 2, 4]) for s in ("random", "auto")}
    kept = lr.rounds(d, "auto", 0, [1, 2, 4], [2, 4])
    assert [(r["per_class"], r["labels"], r["accuracy"]) for r in kept] == \
        [(r["per_class"], r["labels"], r["accuracy"]) for r in plain["auto"][1:]]
    assert len(kept[1]["labeled"]) == 12 and set(kept[0]["labeled"]) < set(kept[1]["labeled"])
    assert not set(kept[1]["labeled"]) & set(d["test"].tolist())
    with pytest.raises(SystemExit, match="not a round"):
        lr.rounds(d, "auto", 0, [1, 2, 4], [3])
    (tmp_path / "sim.jsonl").write_text("".join(json.dumps({"dataset": "toy", "strategy": s, "seed": 0, **r}) + "\n"
                                                for s, rows in plain.items() for r in rows))

    seen = []  # what each fine-tune got: its training ids, test ids and LP-FT head features

    def spy(overrides, train_recs, test_recs, head, threads):
        seen.append((list(train_recs.ids), list(test_recs.ids), head))
        return real(overrides, train_recs, test_recs, head, threads)

    real = meta.finetune_unit
    monkeypatch.setattr(meta, "finetune_unit", spy)
    assert lr.main(_argv(tmp_path, data, cache)) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "lora_rounds.jsonl").read_text().splitlines()]
    assert [(r["strategy"], r["per_class"], r["labels"]) for r in rows] == \
        [("random", 2, 6), ("random", 4, 12), ("auto", 2, 6), ("auto", 4, 12)]
    replay = {(s, r["per_class"]): r for s in ("random", "auto") for r in lr.rounds(d, s, 0, [1, 2, 4], [2, 4])}
    for row, (train_ids, test_ids, (hx, hy)) in zip(rows, seen, strict=True):
        picked = replay[(row["strategy"], row["per_class"])]["labeled"]
        assert train_ids == [d["ids"][i] for i in picked]  # exactly the round's labeled images, in pick order
        assert test_ids == [d["ids"][i] for i in d["test"]]
        np.testing.assert_array_equal(hx, d["x"][picked])
        np.testing.assert_array_equal(hy, d["y"][picked])
        assert row["n_test"] == 12 and 0.0 <= row["lora_accuracy"] <= 1.0 and row["epochs"] >= 2
        assert row["probe_accuracy"] == replay[(row["strategy"], row["per_class"])]["accuracy"]
        assert row["probe_matches_simulation"] is True
    md = (tmp_path / "out" / "lora_rounds.md").read_text()
    assert "| 4 | toy | 0 |" in md and "**mean of 1**" in md

    # a rerun fine-tunes nothing and adds no row
    seen.clear()
    assert lr.main(_argv(tmp_path, data, cache)) == 0
    assert not seen and len((tmp_path / "out" / "lora_rounds.jsonl").read_text().splitlines()) == 4


def test_picks_other_than_the_simulations_are_refused(lr, toy, tmp_path: Path) -> None:
    data, cache = toy
    (tmp_path / "sim.jsonl").write_text(json.dumps({"dataset": "toy", "strategy": "random", "seed": 0, "per_class": 2,
                                                    "labels": 6, "accuracy": -1.0}) + "\n")
    with pytest.raises(SystemExit, match="not the same picks"):
        lr.main(_argv(tmp_path, data, cache))
    assert not (tmp_path / "out" / "lora_rounds.jsonl").exists()
