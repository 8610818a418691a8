"""The candidates ``visiontune auto`` chooses between, defined per backbone family and checked against the backbone.

A recipe written for a 12-block ViT does not carry over: ``method.targets=qv`` selects nothing on a CNN, and
``method.blocks=last:4`` is refused on a backbone of 2 blocks. So the fine-tuning candidates are made for the
backbone the selection escalates on (:func:`family_candidates`), from what its structure says
(:func:`visiontune.methods.targets.find_blocks`: the block layout and depth; whether the blocks hold attention):

==============  =====================================  ===============================================
family          LoRA / DoRA targets                    other candidates
==============  =====================================  ===============================================
transformer     ``qv`` (r8), ``all-linear`` (r16)      Mona, full fine-tuning
(ViT, Swin)
CNN             ``conv`` (r8 and r16)                  full fine-tuning (Mona: skipped, no transformer
(ResNet, ...)                                          blocks)
==============  =====================================  ===============================================

The adapters-on-the-last-blocks candidate takes the last third of the blocks, at most 4 (:func:`last_blocks`): 4 of
a 12-block ViT as before, 1 of a 2-block one. Every candidate is then checked the way ``visiontune sweep --dry-run``
checks a run (:func:`visiontune.check.check_config`: the backbone built on the meta device, the method applied, a
batch through it; no weights, no data). One that cannot apply is skipped with the error's words as its reason, which
the leaderboard shows, instead of stopping the selection when its first fold builds the model.

Written by hand: which recipe suits which family is this project's choice, not a library's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from visiontune.backbones import create_meta_backbone
from visiontune.check import MetaDeviceLimit, check_config
from visiontune.config import Config
from visiontune.errors import VisiontuneError
from visiontune.methods.targets import find_blocks

LAST_BLOCKS_SHARE, LAST_BLOCKS_MAX = 1 / 3, 4
"""Adapters on the last blocks only: the last third of the blocks, at most 4 (4 of ViT-S/B's 12, as before)."""
PREFIX_VIEWS = 4
PREFIX_CACHE = ("run.prefix_cache=views", f"run.prefix_views={PREFIX_VIEWS}")
"""The last-blocks candidate's frozen prefix (patch embedding and the blocks below the adapted ones) is computed once
per job over ``PREFIX_VIEWS`` augmented crops of each image, epoch ``e`` training on crop ``e mod PREFIX_VIEWS``
(:mod:`visiontune.train.cache`; timm ViTs, other backbones train uncached with the reason in ``metrics.json``),
instead of at every step: with augmentation ``run.prefix_cache=auto`` caches nothing. A fold of 24 epochs then sees 4
distinct crops per image instead of 24."""


@dataclass(frozen=True)
class Candidate:
    """One configuration the selection can choose; ``cheap`` ones are fitted on cached features.

    ``cost`` is the candidate's optimizer step relative to a LoRA q,v step on the same backbone, a guess used only
    to order and plan candidates before any of its steps is measured (:mod:`visiontune.auto.schedule`); measured
    step times replace it as soon as the candidate has trained.
    """

    name: str
    overrides: tuple[str, ...]
    cheap: bool = False
    cost: float = 1.0


@dataclass(frozen=True)
class Family:
    """What the candidates depend on: ``kind`` (``transformer``, ``cnn`` or ``unknown``: no block layout visiontune
    knows) and ``depth`` (blocks in depth order, as ``method.blocks`` counts them)."""

    kind: str
    depth: int


def backbone_family(cfg: Config) -> Family:
    """The family of ``cfg``'s backbone, read from its structure on the meta device (no weights are loaded)."""
    model = create_meta_backbone(dataclasses.replace(cfg.backbone, weights="none"), 2)
    layout = find_blocks(model)
    if layout is None:
        return Family("unknown", 0)
    # A Linear under a block's ``attn`` (fused qkv, q/k/v, proj): transformer blocks, where the q,v and all-linear
    # recipes apply; blocks without one are convolutional (EfficientNet's squeeze-excite is ``se``, not attention).
    attention = any(
        isinstance(m, nn.Linear) and rel.split(".")[0] == "attn"
        for b in layout.names for rel, m in model.get_submodule(b).named_modules()
    )
    return Family("transformer" if attention else "cnn", len(layout.names))


def last_blocks(depth: int) -> int:
    """How many of the last blocks the last-blocks candidate adapts: a third of ``depth``, at least 1, at most 4."""
    return max(1, min(LAST_BLOCKS_MAX, math.ceil(depth * LAST_BLOCKS_SHARE)))


def _blocks_word(k: int) -> str:
    return f"last {k} block{'s' if k != 1 else ''}"


def family_candidates(family: Family) -> tuple[Candidate, ...]:
    """The fine-tuning candidates for ``family``, the most common configuration first.

    Costs (see :class:`Candidate`): DoRA 2x LoRA and full fine-tuning 0.9x (per-step CPU times of ViT-S/16 in
    ``/work/shared/OFFLINE.md``: LoRA 4.2 s, DoRA 8.9 s, full 3.5 s); the last-blocks LoRA the share of blocks it
    trains through, at least 0.25; Mona 1.2 (not measured: two adapters per block with depthwise convolutions).

    On a transformer the last-blocks LoRA trains on the frozen-prefix cache (:data:`PREFIX_CACHE`): the blocks below
    the adapted ones run over :data:`PREFIX_VIEWS` augmented views of each image once per job instead of over every
    image at every step (``benchmarks/fold_cost.py``: a DINOv2-S step on the last 4 blocks at 112 px was half
    spent in the 8 frozen blocks).
    """
    full = Candidate("full fine-tuning", ("method.name=full",), cost=0.9)
    mona = Candidate("mona", ("method.name=mona",), cost=1.2)
    if family.kind == "unknown":  # no block layout: presets and block ranges cannot be placed
        return full, mona
    first, wide = ("qv", "all-linear") if family.kind == "transformer" else ("conv", "conv")
    k = last_blocks(family.depth)
    shown = "q,v" if first == "qv" else first
    cached = PREFIX_CACHE if family.kind == "transformer" else ()
    return (
        Candidate(f"lora {shown} r8", ("method.name=lora", f"method.targets={first}", "method.rank=8")),
        Candidate(f"lora {wide} r16 {_blocks_word(k)}",
                  ("method.name=lora", f"method.targets={wide}", "method.rank=16", f"method.blocks=last:{k}", *cached),
                  cost=max(0.25, k / max(family.depth, 1))),
        Candidate(f"dora {wide} r16", ("method.name=dora", f"method.targets={wide}", "method.rank=16"), cost=2.0),
        mona,
        full,
    )


def balanced(candidate: Candidate) -> Candidate:
    """``candidate`` with a class-balanced loss (imbalanced pools get one such fine-tune)."""
    return dataclasses.replace(candidate, name=f"{candidate.name}, class-balanced",
                               overrides=(*candidate.overrides, "optim.class_weights=balanced"))


def why_not(cfg_of: Callable[[tuple[str, ...]], Config], candidate: Candidate) -> str | None:
    """Why ``candidate`` cannot run on the backbone (the error a run would raise, in its words), or None when it can.

    ``cfg_of(overrides)`` builds the candidate's config: a config-time refusal (Mona on a CNN) counts like one found
    when the method is applied on the meta device (a target preset that selects nothing, a block range beyond the
    depth), and so does an error timm or peft raise for this architecture and setting (the run would fail alike). A
    step the meta device cannot run is not held against the candidate.
    """
    try:
        check_config(cfg_of(candidate.overrides))
    except MetaDeviceLimit:
        return None
    except VisiontuneError as e:
        return " ".join(str(e).split())
    except Exception as e:  # noqa: BLE001 - a library's refusal of this architecture: the candidate's reason
        return f"{type(e).__name__}: {' '.join(str(e).split())}"
    return None


__all__ = ["PREFIX_CACHE", "PREFIX_VIEWS", "Candidate", "Family", "backbone_family", "balanced", "family_candidates", "last_blocks", "why_not"]
