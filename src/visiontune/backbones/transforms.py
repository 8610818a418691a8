"""Preprocessing derived from the backbone's own pretrained cfg (mean/std, interpolation, crop).

Every transform starts with :class:`~visiontune.data.images.ToRGB` (re-exported here).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision import transforms as T

from visiontune.data.bands import BandSpec, BandTransform
from visiontune.data.images import ToRGB


def input_size(model: nn.Module, img_size: int | None = None) -> int:
    """The square input size of ``model``: ``img_size`` when given, else what its preprocessing metadata records.

    :func:`~visiontune.backbones.create_backbone` keeps ``pretrained_cfg["input_size"]`` truthful (it records
    ``backbone.img_size``), and every method keeps that metadata, so a built model answers for itself; timm's
    default 224 stands in for a model without any.
    """
    if img_size:
        return int(img_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def data_config(model: nn.Module, img_size: int | None = None) -> dict:
    """timm's data config for ``model`` (input size, interpolation, mean, std, crop), size overridden.

    A multi-band model (:func:`set_band_preprocessing`) adds ``bands``: the file band count, the bands fed and
    their per-band statistics.
    """
    cfg = resolve_data_config({}, model=model)
    pre = getattr(model, "pretrained_cfg", None) or {}
    chans = int(tuple(pre.get("input_size", (3,)))[0])
    if img_size:
        cfg["input_size"] = (chans, int(img_size), int(img_size))
    if pre.get("bands"):
        cfg["bands"] = dict(pre["bands"])
    return cfg


def set_band_preprocessing(model: nn.Module, spec: BandSpec | None) -> None:
    """Make a model's preprocessing metadata describe multi-band input ``spec`` (nothing for photos).

    The statistics then travel with the model: :func:`build_transform` normalises with them and the ONNX
    export writes them (and the band count) into its JSON.
    """
    if spec is None:
        return
    cfg = model.pretrained_cfg
    cfg["bands"] = spec.to_dict()
    cfg["mean"], cfg["std"] = tuple(spec.selected(spec.mean)), tuple(spec.selected(spec.std))
    cfg["input_size"] = (spec.in_chans, *tuple(cfg.get("input_size", (3, 224, 224)))[1:])


def build_transform(
    model: nn.Module, img_size: int | None = None, train: bool = False, crop_scale: float = 0.5
) -> Callable[[Image.Image], torch.Tensor]:
    """Image -> normalised tensor transform matching the backbone's pretraining preprocessing.

    Args:
        model: a backbone from :func:`~visiontune.backbones.create_backbone` (or any timm model): its
            ``pretrained_cfg`` supplies mean, std, interpolation, crop fraction and default input size.
        img_size: square input size; None (the usual) keeps the model's own, which for a model built by
            :func:`~visiontune.backbones.create_backbone` is ``backbone.img_size`` already.
        train: random-resized crop + horizontal flip (no colour jitter, no auto-augment: with a few
            hundred images those distort more than they help by default). Otherwise resize + center
            crop, deterministic.
        crop_scale: smallest area fraction a training crop keeps. 0.5 rather than ImageNet's 0.08:
            with few labels, a crop that cuts out the one small defect/lesion/animal changes the label
            (inspection, medical, remote sensing), and PEFT few-shot protocols (VTAB-1k) use little
            or no augmentation.

    Returns:
        A picklable callable mapping any PIL image (gray, palette, RGBA, 16-bit) to a ``3 x H x W`` tensor; for a
        multi-band model, a :class:`~visiontune.data.bands.BandTransform` (``[channels, H, W]`` float bands in).
    """
    cfg = data_config(model, img_size)
    if cfg.get("bands"):
        return _band_transform(cfg, train, crop_scale)
    if not train:
        return eval_transform(cfg)
    tf = create_transform(
        **cfg, is_training=True, scale=(crop_scale, 1.0), hflip=0.5, vflip=0.0, color_jitter=None, auto_augment=None, re_prob=0.0
    )
    return T.Compose([ToRGB(), *tf.transforms])


def eval_transform(cfg: dict) -> Callable[[Image.Image], torch.Tensor]:
    """The deterministic eval transform (RGB, resize, centre crop, normalise) of a timm data config.

    The one code path for eval preprocessing: :func:`build_transform` calls it with the backbone's
    config, and an ONNX export is loaded back with the config its JSON recorded
    (``preprocessing``: ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``,
    ``crop_mode``), so both backends see the same pixels.
    """
    if cfg.get("bands"):
        return _band_transform(cfg, False)
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    tf = create_transform(**{k: cfg[k] for k in keys if cfg.get(k) is not None}, is_training=False)
    return T.Compose([ToRGB(), *tf.transforms])


def _band_transform(cfg: dict, train: bool, crop_scale: float = 0.5) -> BandTransform:
    """The multi-band counterpart of the RGB transforms: same size, interpolation and eval crop, band statistics."""
    return BandTransform(BandSpec.from_dict(cfg["bands"]), int(cfg["input_size"][-1]), train, crop_scale,
                         str(cfg.get("interpolation") or "bilinear"), cfg.get("crop_pct"))
