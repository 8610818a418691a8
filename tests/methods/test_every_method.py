"""The same checks on every registered method (the peft ``test_custom_models`` habit): a method added as one
module is covered here without being named."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from visiontune.backbones import create_backbone
from visiontune.config import config_from_dict, load_config
from visiontune.methods import Method
from visiontune.methods.base import classifier_of
from visiontune.registry import METHODS

NUM_CLASSES = 3


def _build(name: str, seed: int = 0) -> tuple[Method, nn.Module]:
    cfg = load_config(overrides=["data.dataset=x", "backbone.name=test_vit_reg", "backbone.weights=none", f"method.name={name}"])
    method = METHODS.get(name)(cfg.method)
    torch.manual_seed(seed)
    return method, method.apply(create_backbone(cfg.backbone, num_classes=NUM_CLASSES))


def _perturb(model: nn.Module) -> None:
    """Stand-in for training: move every trainable tensor."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(params=METHODS.names())
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_the_registry_names_the_method_and_its_config(name: str) -> None:
    cls = METHODS.get(name)
    assert issubclass(cls, Method) and cls.name == name
    assert dataclasses.is_dataclass(cls.config_cls) and cls.config_cls().name == name
    assert config_from_dict({"data": {"dataset": "x"}, "method": {"name": name}}).method.name == name
    assert cls.summary and METHODS.help(name)


def test_parameter_groups_hold_exactly_the_trainable_parameters(name: str) -> None:
    method, model = _build(name)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in method.param_groups(model, 1e-3, 1e-2, 0.05) for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)
    if trainable:  # the head trains under every gradient method
        assert all(p.requires_grad for p in classifier_of(model).parameters())


def test_saved_state_reloads_into_a_fresh_model_with_the_same_outputs(name: str) -> None:
    method, model = _build(name)
    _perturb(model)
    state = method.trainable_state_dict(model)
    fresh_method, fresh = _build(name)
    fresh_method.load_trainable_state_dict(fresh, state)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.allclose(model(_x()), fresh(_x()), atol=1e-5)


def test_merged_model_predicts_as_the_trained_one(name: str) -> None:
    method, model = _build(name)
    _perturb(model)
    model.eval()
    x = _x()
    with torch.no_grad():
        expected = model(x)
        merged = method.merge(model)
        atol = 0.05 if getattr(method, "quantized", False) else 1e-4  # 4-bit: the merged copy is dequantized
        assert torch.allclose(merged(x), expected, atol=atol)
        assert torch.equal(model(x), expected)  # merging left the trained model as it was


def test_capabilities_have_defaults_every_caller_can_rely_on(name: str) -> None:
    method, model = _build(name)
    assert isinstance(method.report(), dict)
    assert isinstance(method.backbone_key(), str)
    assert isinstance(method.describe(), str) and method.describe()
    assert isinstance(method.apply_on_meta(_meta_backbone()), list)
    if method.feature_cache:  # the cached-features path calls fit_cached instead of the gradient loop
        assert type(method).fit_cached is not Method.fit_cached
    else:
        with pytest.raises(NotImplementedError):
            method.fit_cached(model, (torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), torch.zeros(1)), None, None, 0)


def _meta_backbone() -> nn.Module:
    cfg = load_config(overrides=["data.dataset=x", "backbone.name=test_vit_reg", "backbone.weights=none"])
    with torch.device("meta"):
        return create_backbone(cfg.backbone, num_classes=NUM_CLASSES)
