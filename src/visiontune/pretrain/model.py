"""ExPLoRA's surgery on a timm ViT, the student/teacher forward with iBOT masks, and the export.

ExPLoRA (Khanna et al., ICML'25, https://arxiv.org/abs/2406.10973) continues a foundation model's
own self-supervised objective on unlabeled target-domain images while training only: every
parameter of one or two blocks (``[L]`` or ``[1,L]``), every normalisation layer, and LoRA on the
query and value projections of all other blocks. Afterwards the LoRA updates are merged, so the
result is a plain backbone of the same architecture that any fine-tuning method can start from.

Reused, not rewritten: the fused-qkv split (:mod:`visiontune.methods.qkv`), target resolution and
peft injection (:class:`visiontune.methods.lora.LoRA`), merging (:func:`merge_adapters`,
:func:`strip_adapters`, :func:`fuse_qkv`). Written here: the freezing pattern (no library knows
ExPLoRA's), multi-crop input sizes on a timm ViT (its ``dynamic_img_size`` path, switched on after
the weights are loaded), the iBOT mask token (a forward hook on ``patch_embed``, so the model's own
``forward_features`` runs unchanged: position embeddings, register tokens, layer-scale), and a new
C-channel patch embedding for multi-band input.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from visiontune.backbones.bands import replace_first_conv
from visiontune.errors import ConfigError
from visiontune.methods.lora import LoRA, LoraConfig, lora_layers, merge_adapters, strip_adapters
from visiontune.methods.qkv import fuse_qkv
from visiontune.methods.targets import find_blocks

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
"""Normalisation layers ExPLoRA unfreezes (timm's LayerNorm variants subclass nn.LayerNorm)."""


def _norm_types() -> tuple[type[nn.Module], ...]:
    extra: list[type[nn.Module]] = []
    try:
        from timm.layers import RmsNorm

        extra.append(RmsNorm)
    except ImportError:  # pragma: no cover - older timm
        pass
    return NORM_TYPES + tuple(extra)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (LayerNorm, GroupNorm, BatchNorm, RMSNorm)."""
    return isinstance(module, _norm_types())


@dataclass
class ExploraSurgery:
    """What :func:`apply_explora` did, for the lineage record and the tests.

    Attributes:
        unfrozen_blocks: 0-based indices of the blocks trained in full.
        lora_blocks: 0-based indices of the blocks that got LoRA.
        lora_modules: module names that carry LoRA.
        norm_modules: normalisation layers unfrozen (outside the unfrozen blocks too).
        new_patch_embed: a new multi-band patch embedding was created (and trains).
        trainable: trainable parameter count of the backbone.
        total: parameter count of the backbone (adapters included).
    """

    unfrozen_blocks: list[int]
    lora_blocks: list[int]
    lora_modules: list[str] = field(default_factory=list)
    norm_modules: list[str] = field(default_factory=list)
    new_patch_embed: bool = False
    trainable: int = 0
    total: int = 0


def check_vit(model: nn.Module, label: str) -> None:
    """ExPLoRA here needs a timm ViT with ``blocks``, ``patch_embed`` and a class token.

    Raises:
        ConfigError: naming what is missing and which backbones work.
    """
    missing = [a for a in ("blocks", "patch_embed", "cls_token", "pos_embed") if getattr(model, a, None) is None]
    if missing or not hasattr(model, "dynamic_img_size"):
        raise ConfigError(
            f"backbone.name={label!r} ({type(model).__name__}) is not a timm VisionTransformer with a class token "
            f"(missing: {', '.join(missing) or 'dynamic_img_size'}); ExPLoRA pretraining supports ViT / DeiT / DINOv2 "
            "models such as vit_small_patch14_dinov2 (or test_vit / test_vit_reg in tests)"
        )


def replace_patch_embed(model: nn.Module, channels: int) -> nn.Conv2d:
    """Give ``model`` a fresh patch embedding for ``channels`` input bands, trained from scratch.

    The pretrained RGB filters do not transfer to arbitrary bands, so the new projection starts from
    PyTorch's default init (:func:`visiontune.backbones.bands.replace_first_conv`); the rest of the network
    keeps its weights.
    """
    return replace_first_conv(model, channels, None, "patch_embed.proj")


def apply_explora(
    model: nn.Module, unfrozen: list[int], rank: int, alpha: float | None = None, targets: list[str] | None = None,
    dropout: float = 0.0, norms: bool = True, new_patch_embed: bool = False, label: str | None = None,
) -> ExploraSurgery:
    """ExPLoRA's freezing pattern, in place: blocks ``unfrozen`` + norms (+ a new patch embedding) train,
    LoRA on ``targets`` (q, v) of every other block, everything else frozen.

    Args:
        model: a timm ViT (classifier-free: ``num_classes=0``).
        unfrozen: 0-based indices of blocks trained in full.
        rank: LoRA rank.
        alpha: LoRA alpha (None = the LoRA method's default for the rank).
        targets: LoRA target presets/patterns (default ``["qv"]``).
        dropout: LoRA dropout.
        norms: unfreeze every normalisation layer.
        new_patch_embed: keep the patch embedding trainable (it was just created for multi-band input).
        label: backbone name for messages.

    Returns:
        What was done (:class:`ExploraSurgery`).
    """
    label = label or type(model).__name__
    check_vit(model, label)
    layout = find_blocks(model)
    n_blocks = len(layout.names) if layout else 0
    lora_blocks = [i for i in range(n_blocks) if i not in set(unfrozen)]
    patch_params = list(model.patch_embed.parameters()) if new_patch_embed else []
    surgery = ExploraSurgery(unfrozen_blocks=sorted(unfrozen), lora_blocks=lora_blocks, new_patch_embed=new_patch_embed)
    if lora_blocks:
        method = LoRA(LoraConfig(rank=rank, alpha=alpha, dropout=dropout, targets=list(targets or ["qv"]),
                                 blocks=",".join(map(str, lora_blocks))))
        method.apply(model)  # splits qkv, freezes everything, injects peft LoRA on the targets
        surgery.lora_modules = list(method.targeted)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    for i in unfrozen:
        for p in model.get_submodule(layout.names[i]).parameters():
            p.requires_grad_(True)
    if norms:
        for name, m in model.named_modules():
            if is_norm(m) and any(True for _ in m.parameters(recurse=False)):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)
                surgery.norm_modules.append(name)
    for p in patch_params:
        p.requires_grad_(True)
    surgery.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    surgery.total = sum(p.numel() for p in model.parameters())
    return surgery


# ----------------------------------------------------------------------------- multi-crop + masks


def enable_multicrop(model: nn.Module) -> None:
    """Let a timm ViT take any input size that is a multiple of its patch (global and local crops).

    timm builds this path with ``dynamic_img_size=True``; switching it on after loading keeps the
    weights and resamples the position grid per forward (a no-op at the built size).
    """
    from timm.layers import Format

    model.dynamic_img_size = True
    pe = model.patch_embed
    pe.strict_img_size = False
    pe.flatten = False
    pe.output_fmt = Format.NHWC


def _mask_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook on ``patch_embed``: replace masked patch embeddings by the mask token (iBOT)."""
    state = module.__dict__.get("_visiontune_mask")
    if state is None:
        return output
    mask, token = state
    m = mask.to(output.device).reshape(output.shape[:-1]).unsqueeze(-1)
    return torch.where(m, token.to(output.dtype).reshape(*([1] * (output.dim() - 1)), -1), output)


def install_mask_hook(model: nn.Module) -> None:
    """Register :func:`_mask_hook` once on ``model.patch_embed`` (inactive until :func:`masked` sets a mask)."""
    pe = model.patch_embed
    if not pe.__dict__.get("_visiontune_mask_hook"):
        pe.register_forward_hook(_mask_hook)
        pe._visiontune_mask_hook = True
        pe._visiontune_mask = None


@contextmanager
def masked(model: nn.Module, mask: torch.Tensor | None, token: torch.Tensor) -> Iterator[None]:
    """Within the block, ``model``'s patch embeddings at ``mask`` (``[B, H, W]`` bool) become ``token``."""
    pe = model.patch_embed
    pe._visiontune_mask = None if mask is None or not bool(mask.any()) else (mask, token)
    try:
        yield
    finally:
        pe._visiontune_mask = None


def tokens(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class token ``[B, D]``, patch tokens ``[B, N, D]``) after the final norm."""
    out = model.forward_features(x)
    return out[:, 0], out[:, model.num_prefix_tokens :]


def patch_size(model: nn.Module) -> int:
    """The (square) patch side of a timm ViT."""
    ps = model.patch_embed.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


# ----------------------------------------------------------------------------- teacher and export


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` that shares every frozen tensor (only trained ones are duplicated).

    The EMA only ever moves the trained parameters, so sharing the rest halves the memory of a
    large frozen backbone.
    """
    memo: dict[int, Any] = {id(p): p for p in student.parameters() if not p.requires_grad}
    memo.update({id(b): b for b in student.buffers()})
    teacher = copy.deepcopy(student, memo)
    for p in teacher.parameters():
        p.requires_grad_(False)  # shared tensors are frozen already; the copies of trained ones become frozen
    return teacher.eval()


def trained_pairs(student: nn.Module, teacher: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(teacher tensors, student tensors) of the parameters the student trains, matched by name."""
    t_params = dict(teacher.named_parameters())
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    s_params = dict(student.named_parameters())
    return [t_params[n] for n in names], [s_params[n] for n in names]


def export_backbone(model: nn.Module) -> nn.Module:
    """A plain timm model equal to ``model`` with LoRA merged in and q/k/v fused: the new backbone.

    ``model`` is left untouched (the copy is deep).
    """
    out = copy.deepcopy(model)
    pe = out.patch_embed
    pe._visiontune_mask = None
    for key in [k for k, hook in pe._forward_hooks.items() if hook is _mask_hook]:
        del pe._forward_hooks[key]
    pe.__dict__.pop("_visiontune_mask_hook", None)
    if lora_layers(out):
        with torch.no_grad():
            merge_adapters(out)
        strip_adapters(out)
    fuse_qkv(out)
    for p in out.parameters():
        p.requires_grad_(False)
    return out.eval()
