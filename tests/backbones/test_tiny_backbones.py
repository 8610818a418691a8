"""The registered tiny backbones build through create_backbone and keep timm's model API."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from visiontune.backbones import ANY_TIMM_NOTE, TINY_IMG_SIZE, create_backbone, list_backbones
from visiontune.registry import BACKBONES

TINY = ["test_vit", "test_vit_reg", "test_swin", "test_resnet"]


def test_registered_and_listed():
    names = list_backbones()
    assert names[:4] == TINY and all(n in BACKBONES for n in TINY)
    # Architectures that have offline weights are listed after the registered names.
    assert "vit_small_patch14_dinov2" in names and "tf_efficientnet_lite0" in names
    assert "timm" in ANY_TIMM_NOTE
    assert all(BACKBONES.help(n) for n in TINY)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("num_classes", [1, 7])
def test_forward_any_num_classes(bb, name, num_classes):
    torch.manual_seed(0)
    model = create_backbone(bb(name=name), num_classes=num_classes)
    x = torch.randn(2, 3, TINY_IMG_SIZE, TINY_IMG_SIZE)
    feats = model.forward_features(x)
    pooled = model.forward_head(feats, pre_logits=True)
    logits = model(x)
    assert logits.shape == (2, num_classes)
    assert pooled.shape == (2, model.num_features)
    assert torch.allclose(model.forward_head(feats), logits, atol=1e-5)
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and head.out_features == num_classes
    assert model.pretrained_cfg["input_size"] == (3, TINY_IMG_SIZE, TINY_IMG_SIZE)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("name", TINY)
def test_img_size_drop_path_and_grad_checkpointing(bb, name):
    model = create_backbone(bb(name=name, img_size=64, drop_path=0.2, grad_checkpointing=True), num_classes=4)
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    drop_paths = [m for m in model.modules() if type(m).__name__ == "DropPath"]
    assert drop_paths and max(m.drop_prob for m in drop_paths) == pytest.approx(0.2)
    if name.startswith("test_vit"):
        assert model.patch_embed.grid_size == (8, 8)
    model.train()
    x = torch.randn(2, 3, 64, 64)
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_vit_reg_has_registers_and_layer_scale(bb):
    model = create_backbone(bb(name="test_vit_reg"), num_classes=2)
    assert model.num_reg_tokens == 4 and model.num_prefix_tokens == 5
    assert isinstance(model.blocks[0].ls1, nn.Module) and hasattr(model.blocks[0].ls1, "gamma")
    # Grid-only position embedding (DINOv2-reg layout): 4x4 patches, no prefix tokens.
    assert model.pos_embed.shape == (1, 16, 32)
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 5 + 16, 32)


def test_grad_checkpointing_matches_plain_forward(bb):
    torch.manual_seed(0)
    plain = create_backbone(bb(name="test_vit"), num_classes=3)
    ckpt = create_backbone(bb(name="test_vit", grad_checkpointing=True), num_classes=3)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    plain.train(), ckpt.train()
    assert torch.allclose(plain(x), ckpt(x), atol=1e-6)
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing


def test_timm_cnn_accepts_img_size(bb):
    # CNNs take no img_size argument; it then only sets the preprocessing size.
    model = create_backbone(bb(name="resnet10t", img_size=48), num_classes=2)
    assert model.pretrained_cfg["input_size"] == (3, 48, 48)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 2)
