"""Backbones shared across the builds of one process (``visiontune auto``'s folds, issue 28 part 5)."""

from __future__ import annotations

import pytest
import torch

from visiontune.backbones import create_backbone


def test_shared_backbones_build_once_and_hand_out_copies_that_change_no_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import visiontune.backbones.factory as factory
    from visiontune.backbones import shared_backbones
    from visiontune.config import load_config

    cfg = load_config(None, overrides=["data.dataset=digits", "backbone.name=test_vit", "backbone.weights=none"]).backbone
    torch.manual_seed(0)
    fresh = create_backbone(cfg, 3)
    after_fresh = torch.rand(4)  # what the caller draws next (adapter init)
    builds = []
    real = factory._create_backbone
    monkeypatch.setattr(factory, "_create_backbone", lambda *a: builds.append(1) or real(*a))
    with shared_backbones():
        got = []
        for _ in range(2):
            torch.manual_seed(0)
            got.append(create_backbone(cfg, 3))
            assert torch.equal(torch.rand(4), after_fresh)
        torch.manual_seed(1)  # another random state is another build
        create_backbone(cfg, 3)
    assert len(builds) == 2 and got[0] is not got[1]
    for m in got:
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), fresh.state_dict().values()))
    with torch.no_grad():
        got[0].head.weight.add_(1.0)  # a copy is the caller's own
    assert not torch.equal(got[0].head.weight, got[1].head.weight)
    create_backbone(cfg, 3)
    assert len(builds) == 3  # outside the block every call builds
