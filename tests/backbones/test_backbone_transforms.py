"""Preprocessing from the backbone's pretrained cfg: RGB conversion, normalisation, train vs eval."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.backbones import ToRGB, build_transform, create_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _model(bb, **kw):
    return create_backbone(bb(name="test_vit", **kw), 2)


def test_grayscale_to_three_normalised_channels(bb):
    model = _model(bb)
    value = 100
    img = Image.new("L", (50, 40), value)
    out = build_transform(model, None, train=False)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (value / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-4)
    assert torch.allclose(out.std(dim=(1, 2)), torch.zeros(3), atol=1e-4)


def test_mean_std_follow_the_model(bb):
    model = _model(bb)
    model.pretrained_cfg.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = build_transform(model, None, train=False)(Image.new("RGB", (32, 32), (255, 0, 255)))
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor([1.0, -1.0, 1.0]), atol=1e-4)


@pytest.mark.parametrize(
    "img",
    [
        Image.new("RGBA", (40, 40), (10, 20, 30, 255)),
        Image.new("LA", (40, 40), (10, 255)),
        Image.new("P", (40, 40), 3),
        Image.new("1", (40, 40), 1),
        Image.fromarray(np.full((40, 40), 60000, dtype=np.uint16)),
        Image.new("CMYK", (40, 40), (0, 0, 0, 0)),
    ],
    ids=lambda im: im.mode,
)
def test_any_mode_becomes_three_channels(bb, img):
    out = build_transform(_model(bb), 24, train=False)(img)
    assert out.shape == (3, 24, 24) and torch.isfinite(out).all()


def test_to_rgb_details():
    # Transparent pixels become white, not the colour hidden under alpha 0.
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert ToRGB()(rgba).getpixel((0, 0)) == (255, 255, 255)
    # 16-bit gray is scaled, not clipped to white.
    deep = Image.fromarray(np.full((2, 2), 32896, dtype=np.uint16))
    assert ToRGB()(deep).getpixel((0, 0)) == (128, 128, 128)
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert ToRGB()(rgb) is rgb


def test_img_size_override_and_model_size(bb):
    model = _model(bb)
    img = Image.new("RGB", (100, 80), (120, 60, 30))
    assert build_transform(model, 48, train=False)(img).shape == (3, 48, 48)
    assert build_transform(model, 48, train=True)(img).shape == (3, 48, 48)
    # A model built at another size carries it, so img_size=None follows the model.
    bigger = _model(bb, img_size=64)
    assert build_transform(bigger, None, train=False)(img).shape == (3, 64, 64)


def test_train_is_random_and_eval_deterministic(bb):
    model = _model(bb)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    train_tf, eval_tf = build_transform(model, None, True), build_transform(model, None, False)
    torch.manual_seed(0)
    views = [train_tf(img) for _ in range(4)]
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(eval_tf(img), eval_tf(img))
    names = [type(t).__name__ for t in train_tf.transforms]
    assert names[0] == "ToRGB" and "RandomHorizontalFlip" in names and any("RandomResizedCrop" in n for n in names)
    assert not any("ColorJitter" in n or "AutoAugment" in n or "RandAugment" in n for n in names)
    eval_names = [type(t).__name__ for t in eval_tf.transforms]
    assert eval_names[:3] == ["ToRGB", "Resize", "CenterCrop"]


def test_transform_is_picklable(bb):
    import pickle

    tf = build_transform(_model(bb), None, train=True)
    again = pickle.loads(pickle.dumps(tf))
    assert again(Image.new("L", (40, 40), 5)).shape == (3, 32, 32)
