"""Frozen-prefix cache: same results as no cache when it is exact, opt-in views otherwise, clear reasons when unused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import visiontune as vt
from visiontune.registry import METHODS
from visiontune.runs import build_model
from visiontune.train import loop
from visiontune.train.cache import FrozenPrefix

NO_PROBE = ["optim.head_init=zero"]  # the LP-FT probe's C search adds seconds and nothing to these checks


def _model(tiny_overrides, *extra):
    cfg = vt.load_config(None, [*tiny_overrides, *extra])
    return build_model(cfg, METHODS.get(cfg.method.name)(cfg.method), 10)


@pytest.mark.parametrize("backbone", ["test_vit", "test_vit_reg"])
def test_suffix_of_prefix_is_the_model(tiny_overrides, backbone):
    model = _model(tiny_overrides, f"backbone.name={backbone}", "method.name=lora", "method.blocks=last:1").eval()
    frozen, reason = FrozenPrefix.find(model)
    assert frozen is not None, reason
    assert frozen.start == len(model.blocks) - 1
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(frozen.suffix(frozen.prefix(x)), model(x), atol=1e-6)
    assert not frozen.prefix(x).requires_grad


@pytest.mark.parametrize(
    "extra, reason",
    [
        (["method.name=full"], "patch embedding"),
        (["method.name=lora"], "block 0 trains"),
        (["method.name=lora", "backbone.name=test_resnet", "method.targets=conv"], "not a timm VisionTransformer"),
        (["method.name=linear"], "no block trains"),
    ],
)
def test_no_prefix_reasons(tiny_overrides, extra, reason):
    frozen, why = FrozenPrefix.find(_model(tiny_overrides, *extra))
    assert frozen is None and reason in why


def test_random_layer_in_prefix_is_refused(tiny_overrides):
    model = _model(tiny_overrides, "method.name=lora", "method.blocks=last:1")
    model.pos_drop.p = 0.1  # timm's position-embedding dropout: the prefix output is no longer a function of the image
    frozen, why = FrozenPrefix.find(model)
    assert frozen is None and "pos_drop" in why


def _run(tiny_overrides, *extra):
    return vt.train(vt.load_config(None, [*tiny_overrides, *NO_PROBE, *extra]))


def _max_diff(a, b) -> float:
    sa, sb = load_file(str(a.run_dir / "adapter.safetensors")), load_file(str(b.run_dir / "adapter.safetensors"))
    assert sa.keys() == sb.keys()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def test_cached_training_matches_uncached_without_augmentation(tiny_overrides):
    # LoRA dropout keeps the global RNG in play: the cache must not shift any random draw.
    common = ["method.name=lora", "method.blocks=last:1", "method.dropout=0.1", "data.augment=false",
              "data.val_per_class=3", "optim.epochs=3"]
    ref = _run(tiny_overrides, *common, "run.prefix_cache=none", "run.name=ref")
    fast = _run(tiny_overrides, *common, "run.name=fast")
    info = fast.metrics["train"]["prefix_cache"]
    assert info["used"] and info["train_views"] == 1 and info["val"] and info["start_block"] == 1
    assert ref.metrics["train"]["prefix_cache"]["used"] is False
    assert _max_diff(ref, fast) < 1e-5
    for a, b in zip(ref.metrics["train"]["history"], fast.metrics["train"]["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_accuracy"] == b["val_accuracy"]
    assert ref.metrics["test"]["accuracy"] == fast.metrics["test"]["accuracy"]


def test_augmentation_caches_only_validation_unless_views(tiny_overrides, monkeypatch):
    common = ["method.name=lora", "method.blocks=last:1", "data.val_per_class=3", "optim.epochs=3"]
    auto = _run(tiny_overrides, *common, "run.name=auto")
    info = auto.metrics["train"]["prefix_cache"]
    assert info["used"] and info["train_views"] == 0 and info["val"] and "augmentation" in info["train_reason"]

    views_seen = []
    real = loop.train_one_epoch

    def spy(model, loader, *args, **kwargs):
        views_seen.append(loader.dataset.view)
        return real(model, loader, *args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", spy)
    views = _run(tiny_overrides, *common, "run.prefix_cache=views", "run.prefix_views=2", "run.name=views")
    assert views.metrics["train"]["prefix_cache"]["train_views"] == 2
    assert views_seen == [0, 1, 0]  # epoch e trains on view (e - 1) mod V
    assert _max_diff(auto, views) > 0  # a different augmentation stream: documented as not exact


def test_resume_with_cache_matches_uninterrupted(tiny_overrides, monkeypatch):
    common = ["method.name=lora", "method.blocks=last:1", "data.augment=false", "optim.epochs=3"]
    ref = _run(tiny_overrides, *common, "run.name=ref")
    real = loop.train_one_epoch
    calls = {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_overrides, *common, "run.name=crash")
    monkeypatch.setattr(loop, "train_one_epoch", real)
    res = _run(tiny_overrides, *common, "run.name=crash", "run.resume=true")
    assert res.metrics["train"]["prefix_cache"]["used"]
    assert _max_diff(ref, res) < 1e-6
