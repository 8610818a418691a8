"""Tiny random-init backbones for tests and demos: the real timm classes at toy sizes (32 px input).

Each covers a structure the methods must handle: a plain ViT with fused qkv and a class token
(``test_vit``), a DINOv2/DINOv3-style ViT with register tokens and layer-scale (``test_vit_reg``), a
windowed Swin transformer (``test_swin``) and a ResNet (``test_resnet``). They are built through
:func:`timm.models.build_model_with_cfg`, so local weight files load into them exactly as into real
timm models (same filter functions, pos-embed resampling included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg
from timm.models.resnet import BasicBlock, ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter

from visiontune.registry import BACKBONES

TINY_IMG_SIZE = 32


def _cfg(first_conv: str, classifier: str) -> dict[str, Any]:
    return {
        "input_size": (3, TINY_IMG_SIZE, TINY_IMG_SIZE),
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "num_classes": 0,
        "first_conv": first_conv,
        "classifier": classifier,
        "license": "apache-2.0",
        "description": "tiny random-init test model (no pretrained weights)",
    }


@dataclass(frozen=True)
class TinyBackbone:
    """A registered toy backbone: called like a timm entrypoint, ``(pretrained=False, **kwargs)``.

    Attributes:
        variant: the registered name.
        model_cls: the timm model class.
        model_args: the toy sizes (callers' kwargs override them).
        pretrained_cfg: preprocessing metadata and classifier name, as timm keeps per model.
        filter_fn: timm's checkpoint filter for the family (resamples position tables on load).
        size_agnostic: the class takes no ``img_size`` (CNNs): input size only affects preprocessing.
        doc: one line for ``visiontune list backbones``.
    """

    variant: str
    model_cls: type[nn.Module]
    model_args: dict[str, Any]
    pretrained_cfg: dict[str, Any]
    filter_fn: Callable[..., Any] | None = None
    size_agnostic: bool = False
    doc: str = field(default="", compare=False)

    def __call__(self, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        """Build the model; ``pretrained=True`` needs ``pretrained_cfg_overlay`` with a file or state dict."""
        if self.size_agnostic:
            kwargs.pop("img_size", None)
        args = {**self.model_args, **kwargs}
        return build_model_with_cfg(
            self.model_cls,
            self.variant,
            pretrained,
            pretrained_cfg=dict(self.pretrained_cfg, architecture=self.variant),
            pretrained_filter_fn=self.filter_fn,
            **args,
        )


def _register(spec: TinyBackbone) -> None:
    BACKBONES.register(spec.variant, spec, help=spec.doc)


_register(
    TinyBackbone(
        "test_vit",
        VisionTransformer,
        dict(img_size=TINY_IMG_SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
        _cfg("patch_embed.proj", "head"),
        vit_filter,
        doc="tiny random ViT (fused qkv, class token), 32 px, for tests",
    )
)
_register(
    TinyBackbone(
        "test_vit_reg",
        VisionTransformer,
        # The DINOv2-with-registers layout in timm: register tokens, layer-scale, and a position
        # embedding that covers the patch grid only (no_embed_class).
        dict(
            img_size=TINY_IMG_SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
            reg_tokens=4, init_values=1e-5, no_embed_class=True,
        ),
        _cfg("patch_embed.proj", "head"),
        vit_filter,
        doc="tiny random DINOv2-style ViT (4 register tokens, layer-scale), 32 px, for tests",
    )
)
_register(
    TinyBackbone(
        "test_swin",
        SwinTransformer,
        dict(
            img_size=TINY_IMG_SIZE, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
            mlp_ratio=2.0,
        ),
        _cfg("patch_embed.proj", "head.fc"),
        swin_filter,
        doc="tiny random Swin transformer (window 4, two stages), 32 px, for tests",
    )
)
_register(
    TinyBackbone(
        "test_resnet",
        ResNet,
        dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8),
        _cfg("conv1", "fc"),
        None,
        size_agnostic=True,
        doc="tiny random ResNet (BasicBlock, 8-64 channels), 32 px, for tests",
    )
)
