"""An RGB-pretrained backbone on N input bands: the widened first layer and its documented initialisation.

A backbone pretrained on photos has a first layer (a ViT's patch embedding, a CNN's stem convolution)
with 3 input channels. For multi-band data (``data.channels=N``) it is replaced by one with N channels,
initialised from the pretrained filters rather than at random (:func:`rgb_init`):

* the bands named red, green and blue (``backbone.rgb_bands``, e.g. ``[3, 2, 1]`` of Sentinel-2's 13)
  get the pretrained filter of that colour;
* every other band gets the mean of the three filters (the filter of a gray image);
* everything is scaled by 3/N, so a flat input of the same value in every band produces the same
  first-layer activation as the same value in the three colours of a photo.

This is timm's ``adapt_input_conv`` idea (repeat the RGB filters cyclically, scale by 3/N) with the
colours put on the bands that carry them; the mean for the other bands follows the practice of
SatMAE / TorchGeo users who start infrared bands from the average RGB filter. A backbone whose
weights already have N bands (``visiontune pretrain data.channels=N``, ExPLoRA) loads as it is.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from visiontune.errors import ConfigError


def first_conv_name(model: nn.Module) -> str:
    """The module name of the first convolution (timm's ``pretrained_cfg["first_conv"]``).

    Raises:
        ConfigError: the model does not declare one, or it is not a ``Conv2d``.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("first_conv")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    module = model.get_submodule(name) if name else None
    if not isinstance(module, nn.Conv2d):
        raise ConfigError(
            f"{type(model).__name__} declares no first convolution (pretrained_cfg first_conv={name!r}), so its input "
            "cannot be widened to more bands; use a timm ViT or CNN (vit_small_patch14_dinov2, resnet50, ...)"
        )
    return str(name)


def rgb_init(weight: torch.Tensor, in_chans: int, rgb_bands: Sequence[int] | None) -> torch.Tensor:
    """``[out, 3, k, k]`` RGB filters -> ``[out, in_chans, k, k]`` by the rule of the module docstring."""
    if weight.shape[1] != 3:
        raise ConfigError(f"the first layer has {weight.shape[1]} input channels, not 3; only RGB weights are widened")
    w = weight.detach().float()
    out = w.mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1)
    for colour, band in enumerate(rgb_bands or ()):
        out[:, band] = w[:, colour]
    return (out * (3.0 / in_chans)).to(weight.dtype)


def describe_init(in_chans: int, rgb_bands: Sequence[int] | None) -> str:
    """One line for the run record: how the widened layer was initialised."""
    where = f"RGB filters copied to bands {list(rgb_bands)}, their mean on the other bands" if rgb_bands else \
        f"the mean RGB filter on all {in_chans} bands"
    return f"widened from RGB: {where}, scaled by 3/{in_chans}"


def replace_first_conv(model: nn.Module, in_chans: int, weight: torch.Tensor | None = None, name: str | None = None) -> nn.Conv2d:
    """Swap the first convolution for one with ``in_chans`` inputs, in place (bias and geometry kept).

    Args:
        weight: the new filters; None = PyTorch's default initialisation (trained from scratch).
        name: the module (default :func:`first_conv_name`).
    """
    name = name or first_conv_name(model)
    old = model.get_submodule(name)
    new = nn.Conv2d(in_chans, old.out_channels, kernel_size=old.kernel_size, stride=old.stride, padding=old.padding,
                    dilation=old.dilation, groups=old.groups, bias=old.bias is not None, padding_mode=old.padding_mode,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        if weight is not None:
            new.weight.copy_(weight)
        if old.bias is not None and weight is not None:
            new.bias.copy_(old.bias)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    embed = getattr(model, "patch_embed", None)
    if embed is not None and hasattr(embed, "in_chans"):
        embed.in_chans = in_chans
    set_input_channels(model, in_chans)
    return new


def widen_rgb(model: nn.Module, in_chans: int, rgb_bands: Sequence[int] | None = None) -> str:
    """Widen an RGB-pretrained model's first layer to ``in_chans`` bands (:func:`rgb_init`); returns the description."""
    name = first_conv_name(model)
    replace_first_conv(model, in_chans, rgb_init(model.get_submodule(name).weight, in_chans, rgb_bands), name)
    return describe_init(in_chans, rgb_bands)


def set_input_channels(model: nn.Module, in_chans: int) -> None:
    """Keep ``pretrained_cfg["input_size"]`` truthful about the channel count."""
    cfg: Any = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        cfg["input_size"] = (int(in_chans), *tuple(cfg.get("input_size", (3, 224, 224)))[1:])
