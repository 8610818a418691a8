"""Backbones: timm models built from ``backbone.*`` config, offline weight sources, preprocessing.

Importing this package registers the tiny test backbones (``visiontune.registry.BACKBONES``) and the
offline weight sources (``visiontune.registry.WEIGHT_SOURCES``).
"""

from visiontune.backbones import offline as _offline  # noqa: F401  (registers WEIGHT_SOURCES)
from visiontune.backbones import tiny as _tiny  # noqa: F401  (registers BACKBONES)
from visiontune.backbones.factory import (
    ANY_TIMM_NOTE, backbone_identity, create_backbone, create_meta_backbone, default_img_size, list_backbones,
    shared_backbones,
)
from visiontune.backbones.offline import DinoV2ImgFocus, EfficientNetLite0
from visiontune.backbones.tiny import TINY_IMG_SIZE, TinyBackbone
from visiontune.backbones.transforms import ToRGB, build_transform, data_config
from visiontune.backbones.weights import PackageWeightSource, WeightSpec, parse_weights, weights_cache_dir

__all__ = [
    "ANY_TIMM_NOTE",
    "DinoV2ImgFocus",
    "EfficientNetLite0",
    "PackageWeightSource",
    "TINY_IMG_SIZE",
    "TinyBackbone",
    "ToRGB",
    "WeightSpec",
    "backbone_identity",
    "build_transform",
    "create_backbone",
    "create_meta_backbone",
    "data_config",
    "default_img_size",
    "list_backbones",
    "parse_weights",
    "shared_backbones",
    "weights_cache_dir",
]
