"""Backbones: timm models built from ``backbone.*`` config, offline weight sources, preprocessing.

The tiny test backbones (``visiontune.registry.BACKBONES``) and the offline weight sources
(``visiontune.registry.WEIGHT_SOURCES``) are registered by ``tiny.py`` and ``offline.py``, which those registries
import on their first read.
"""

from visiontune.lazy import lazy_attributes

# Names load on first use: timm (and through it torchvision) takes seconds to import, and `visiontune doctor`, `list`
# or reading WEIGHT_SOURCES need none of it. The registries import tiny.py / offline.py themselves when first read.
_EXPORTS = {
    "factory": ("ANY_TIMM_NOTE", "backbone_identity", "create_backbone", "create_meta_backbone", "default_img_size",
                "describe_backbones", "list_backbones", "shared_backbones"),
    "offline": ("EFFICIENTNET_LITE", "MOBILENET_V2", "DinoV2ImgFocus", "OrderedStateDictSource"),
    "tiny": ("TINY_IMG_SIZE", "TinyBackbone"),
    "transforms": ("ToRGB", "build_transform", "data_config", "input_size", "set_band_preprocessing"),
    "weights": ("PackageWeightSource", "WeightSpec", "parse_weights", "weights_cache_dir"),
}
__getattr__ = lazy_attributes(__name__, {name: f"{__name__}.{module}" for module, names in _EXPORTS.items() for name in names})

__all__ = [
    "ANY_TIMM_NOTE",
    "DinoV2ImgFocus",
    "EFFICIENTNET_LITE",
    "MOBILENET_V2",
    "OrderedStateDictSource",
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
    "describe_backbones",
    "input_size",
    "list_backbones",
    "parse_weights",
    "set_band_preprocessing",
    "shared_backbones",
    "weights_cache_dir",
]
