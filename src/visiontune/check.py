"""Validate a run configuration against the real model classes, without weights, data or memory.

A config can be valid field by field and still be unable to run: a target preset that selects nothing on
that architecture (``qv`` on a ResNet), a timm name that does not exist, an ``img_size`` the patch size does
not divide. Those surface today only when a run builds its model, after its data is loaded and possibly
after hours of other runs. :func:`check_config` finds them up front by doing what a run does to its
model on PyTorch's meta device (tensors with shapes and no storage): build the backbone with timm, apply
the method (qkv split, target resolution, peft injection, Mona's block surgery ...), and push a batch of
the run's input size through the result. A 7B ViT costs a fraction of a second this way.

What it cannot check, by construction: the data (``data.dataset`` is not read), the hub (nothing is
downloaded: an existing hub entry is assumed to be reachable), whether a weight file's keys fit (the
file's existence is checked, its contents are not read), 4-bit quantization (bitsandbytes needs real
values; see :meth:`visiontune.methods.base.Method.apply_on_meta`) and anything that depends on values
(out-of-memory, NaNs). Used by ``visiontune sweep --dry-run``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from visiontune.errors import ConfigError
from visiontune.backbones import create_meta_backbone, default_img_size, input_size
from visiontune.registry import METHODS

DRY_RUN_CLASSES = 2
"""Classifier size used for the check: the data is not read, and the class count never decides validity."""


class MetaDeviceLimit(Exception):
    """A step could not run on the meta device (it needs tensor values); the config is not known to be wrong."""


def _meta_limitation(e: BaseException) -> bool:
    """Whether ``e`` comes from the meta device itself (a data-dependent op) rather than from the config."""
    text = str(e).lower()
    return isinstance(e, NotImplementedError) or "meta tensor" in text or "on meta" in text or "'meta'" in text


def check_key(cfg: Any) -> str:
    """What decides whether ``cfg``'s model can be built: configs with equal keys share one :func:`check_config`.

    The backbone section and the method's options, less the method's ``size_only_fields`` (LoRA's rank, alpha,
    dropout). Seeds, optimiser settings, data and run options never reach the model a run builds.
    """
    method = {k: v for k, v in dataclasses.asdict(cfg.method).items() if k not in type(cfg.method).size_only_fields}
    return json.dumps({"backbone": dataclasses.asdict(cfg.backbone), "method": method}, sort_keys=True, default=str)


def check_config(cfg: Any, num_classes: int = DRY_RUN_CLASSES) -> list[str]:
    """Build ``cfg``'s model on the meta device as a run would, and pass a batch of its input size through it.

    Args:
        cfg: a validated :class:`~visiontune.config.Config`.
        num_classes: classifier size (irrelevant to validity; the data is not read).

    Returns:
        Notes on what could not be checked (e.g. 4-bit quantization); empty when everything was.

    Raises:
        VisiontuneError: the run cannot start (ConfigError / WeightsError, naming the value and the fix).
        MetaDeviceLimit: a step needs real tensor values, so this config cannot be checked here.
        Exception: whatever timm or peft raise for this architecture and setting (the run would fail alike).
    """
    import torch

    method = METHODS.get(cfg.method.name)(cfg.method)
    # As in a run: a method that starts from random init (scratch) never loads weights.
    backbone = cfg.backbone if method.pretrained else dataclasses.replace(cfg.backbone, weights="none")
    try:
        model = create_meta_backbone(backbone, num_classes)
        notes = list(method.apply_on_meta(model))
    except Exception as e:
        if _meta_limitation(e):
            raise MetaDeviceLimit(f"{type(e).__name__}: {_first_line(e)}") from e
        raise
    size = input_size(model, cfg.backbone.img_size)
    x = torch.empty(2, cfg.data.input_bands(), size, size, device="meta")
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as e:
        if _meta_limitation(e):
            notes.append(f"forward pass not checked on the meta device ({type(e).__name__}: {_first_line(e)})")
            return notes
        fix = ""
        if cfg.backbone.img_size:
            default = default_img_size(cfg.backbone.name)
            fix = (f" Set backbone.img_size to a size this model accepts, or null for its pretrained size"
                   f"{f' ({default} px)' if default else ''}.")
        raise ConfigError(
            f"backbone.name={cfg.backbone.name!r} with method.name={cfg.method.name} fails a forward pass at "
            f"{size}x{size} px (backbone.img_size={cfg.backbone.img_size}): {type(e).__name__}: "
            f"{_first_line(e).rstrip('.')}.{fix}"
        ) from e
    return notes


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"
