"""Exact speed paths: class-token-only last ViT block (outputs and gradients as the full model), channels-last CNNs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import visiontune as vt
from visiontune.registry import METHODS
from visiontune.runs import build_model
from visiontune.train import speed
from visiontune.runtime import make_loader
from visiontune.train.loop import extract_features


def _model(tiny_overrides, *extra):
    cfg = vt.load_config(None, [*tiny_overrides, *extra])
    method = METHODS.get(cfg.method.name)(cfg.method)
    model = build_model(cfg, method, 10)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # adapters start at zero (an identity): make them matter
                p.normal_(0, 0.05)
    return model, method


def _grads(model, fwd, x, y):
    model.zero_grad()
    F.cross_entropy(fwd(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backbone", ["test_vit", "test_vit_reg"])
@pytest.mark.parametrize("method", [["method.name=lora", "method.targets=[qkv]"], ["method.name=dora", "method.targets=[all-linear]"], ["method.name=full"]])
def test_class_token_last_block_matches_model(tiny_overrides, backbone, method):
    model, m = _model(tiny_overrides, f"backbone.name={backbone}", *method)
    fast = speed.fast_forward(model)
    assert isinstance(fast, speed.ClassTokenViT)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)
        assert fast.forward_features(x).shape[1] == 1  # only the class token left the last block
    model.train()
    ga, gb = _grads(model, model, x, y), _grads(model, fast, x, y)
    assert max(float((ga[k] - gb[k]).abs().max()) for k in ga) < 1e-5
    merged = speed.fast_forward(m.merge(model))  # the evaluation path: merged, fused qkv
    merged.eval()
    with torch.no_grad():
        assert torch.allclose(merged(x), model.eval()(x), atol=1e-4)


def test_features_through_wrapper_equal_model_features(tiny_overrides):
    model, _ = _model(tiny_overrides, "method.name=linear")
    data = torch.utils.data.TensorDataset(torch.randn(6, 3, 32, 32), torch.arange(6))
    loader = make_loader(data, 4, False, 0, 0)
    a, _ = extract_features(model, loader, torch.device("cpu"))
    b, _ = extract_features(speed.fast_forward(model), loader, torch.device("cpu"))
    assert torch.allclose(a, b, atol=1e-5)


def test_dropout_in_last_block_trains_on_every_token(tiny_overrides):
    model, _ = _model(tiny_overrides, "method.name=lora", "method.dropout=0.2")
    fast = speed.fast_forward(model)
    tokens = torch.randn(2, 5, model.embed_dim)
    model.train()
    assert speed.run_blocks(model, tokens, 0).shape[1] == 5  # dropout masks must see the same shapes
    model.eval()
    assert speed.run_blocks(model, tokens, 0).shape[1] == 1
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    a = model.train()(x)
    torch.manual_seed(0)
    assert torch.equal(fast(x), a)


@pytest.mark.parametrize("extra", [["method.name=mona"], ["backbone.name=test_swin", "method.name=lora"], ["backbone.name=test_resnet", "method.name=full"]])
def test_other_models_run_as_they_are(tiny_overrides, extra):
    model, _ = _model(tiny_overrides, *extra)
    assert speed.class_token_blocker(model) is not None
    assert speed.fast_forward(model) is model


def test_self_check_rejects_a_wrong_shortcut(tiny_overrides, monkeypatch):
    model, _ = _model(tiny_overrides, "method.name=full")
    real = speed.last_block_class_token
    monkeypatch.setattr(speed, "last_block_class_token", lambda block, x: real(block, x).flip(-1))  # (a constant shift would vanish in the final LayerNorm)
    assert speed.fast_forward(model) is model
    monkeypatch.setattr(speed, "last_block_class_token", real)
    assert speed.fast_forward(model) is model  # the verdict is kept per model object
    state = torch.random.get_rng_state()
    speed.fast_forward(model)
    assert torch.equal(state, torch.random.get_rng_state())  # the check draws from its own generator


def test_channels_last_only_for_convnets(tiny_overrides):
    resnet, _ = _model(tiny_overrides, "backbone.name=test_resnet", "method.name=full")
    x = torch.randn(2, 3, 32, 32)
    ref = resnet.eval()(x)
    assert speed.channels_last_if_convnet(resnet)
    conv = next(m for m in resnet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(resnet(x), ref, atol=1e-5)
    vit, _ = _model(tiny_overrides, "method.name=full")
    assert not speed.channels_last_if_convnet(vit)
