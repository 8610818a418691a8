"""``train(head_features=...)``: the LP-FT head fitted on features the caller already has (``visiontune auto``
shares its cheap stage's features with its folds, issue 28 part 5) is the head a feature pass would fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from visiontune.train import loop
from visiontune.backbones import build_transform
from visiontune.config import load_config
from visiontune.data import load_records, make_splits
from visiontune.registry import METHODS
from visiontune.runs import build_model
from visiontune.runtime import make_loader
from visiontune.data.cache import image_dataset
from visiontune.train.speed import fast_forward


def _backbone_features(cfg, records) -> tuple[torch.Tensor, torch.Tensor]:
    """What auto's cheap stage computes: the plain backbone (linear probe model), clean views, fp32."""
    probe_cfg = load_config(None, overrides=[f"data.dataset={cfg.data.dataset}", f"backbone.name={cfg.backbone.name}",
                                             "backbone.weights=none", "method.name=linear"])
    model = build_model(probe_cfg, METHODS.get("linear")(probe_cfg.method), len(records.classes)).eval()
    tf = build_transform(model, cfg.backbone.img_size, train=False)
    loader = make_loader(image_dataset(records, tf, cfg.data.cache), 64, False, 0, 0)
    return loop.extract_features(fast_forward(model), loader, torch.device("cpu"))


@pytest.mark.parametrize("method, shared", [("lora", True), ("full", True), ("mona", False), ("dora", False)])
def test_shared_head_features_fit_the_head_a_feature_pass_would(tiny_overrides, tmp_path: Path, method: str,
                                                                shared: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = {}
    real = loop._view_features
    passes: list[int] = []
    monkeypatch.setattr(loop, "_view_features", lambda *a, **k: passes.append(1) or real(*a, **k))
    for name, give in (("computed", False), ("given", True)):
        cfg = load_config(None, overrides=[*tiny_overrides, f"method.name={method}", f"run.name={name}",
                                           "optim.head_init=probe"])
        records = load_records(cfg.data.dataset, root=cfg.data.root, limits=cfg.data.image_limits())
        splits = make_splits(records, cfg.data)
        splits["val"] = splits["val"].subset(np.array([], dtype=int))  # as auto's small folds: no inner validation
        feats = _backbone_features(cfg, splits["train"]) if give else None
        passes.clear()
        result = loop.train(cfg, splits=splits, head_features=feats)
        runs[name] = (json.loads((result.run_dir / "metrics.json").read_text())["train"], len(passes))
    computed, given = runs["computed"], runs["given"]
    assert computed[0]["head_init_features"] == "computed" and computed[1] == 1
    # Where the method starts as the backbone, no feature pass; else the features are not the method's own
    assert given[0]["head_init_features"] == ("shared" if shared else "computed") and given[1] == (0 if shared else 1)
    assert given[0]["head_init_c"] == computed[0]["head_init_c"]
    for a, b in zip(given[0]["history"], computed[0]["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
