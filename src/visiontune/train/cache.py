"""Frozen-prefix cache: compute the blocks below the first trained one once, not every epoch.

When adapters only sit in blocks ``k..L`` of a ViT (``method.blocks=last:4``, ExPLoRA-style partial
unfreezing, a probe on intermediate blocks ...), the patch embedding and blocks ``0..k-1`` are a fixed
function of the image. The uncached loop recomputes them for every image in every epoch (autograd
already skips their backward); here their output, the tokens entering block ``k``, is computed once
per image and training runs blocks ``k..L`` + norm + head on it.

When it is exact (``run.prefix_cache=auto``, the default): the training transform is deterministic
(``data.augment=false``) and the prefix has no stochastic layer (dropout, drop-path, patch dropout).
Then each epoch sees exactly the tensors the uncached loop would compute, batches come in the same
order (same sampler generator), and no random number is drawn differently, so results match the
uncached run to float rounding (a test pins this). The validation split is always evaluated with the
eval transform, so its prefix is cached whenever a prefix exists, augmentation or not.

With augmentation (the default for gradient methods) every epoch sees a new random crop of every
image, so a cache cannot be exact. ``run.prefix_cache=views`` (opt-in) caches ``run.prefix_views``
augmented views per image and epoch ``e`` trains on view ``e mod V``: the prefix costs V passes
instead of one per epoch, at the price of only V distinct crops per image. It pays off when
``V < epochs``; with ``V >= epochs`` it computes as much as the uncached loop and only reorders the
random draws. ``run.prefix_cache=none`` turns caching off.

Written by hand: timm has no notion of "run the model from block k", and peft/accelerate cache
nothing between epochs. Supported models: timm ``VisionTransformer`` (ViT, DeiT, DINOv2, CLIP ViT,
the tiny test ViTs) whose ``forward_features`` is timm's own; anything else trains uncached, with the
reason recorded in ``metrics.json`` (``train.prefix_cache``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import visiontune.distributed as distributed
from visiontune.runtime import batches, make_loader
from visiontune.train.speed import run_blocks, run_pre_hooks

DEFAULT_BUDGET_MB = 2048
"""Largest cache (all views) built; above it training runs uncached (the reason is recorded)."""


def _stochastic(parts: list[tuple[str, nn.Module]]) -> str | None:
    """Name of the first layer among ``parts`` that is random (or stateful) in train mode, or None."""
    from timm.layers import DropPath, PatchDropout

    for prefix, module in parts:
        for name, m in module.named_modules(prefix=prefix):
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                return name
            if isinstance(m, DropPath) and m.drop_prob > 0:
                return name
            if isinstance(m, PatchDropout) and m.prob > 0:
                return name
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                return name  # running statistics change in train mode
    return None


def _trains(*parts: Any) -> bool:
    for part in parts:
        if isinstance(part, nn.Parameter) and part.requires_grad:
            return True
        if isinstance(part, nn.Module) and any(p.requires_grad for p in part.parameters()):
            return True
    return False


@dataclass
class FrozenPrefix:
    """A ViT split at its first trained block ``start``: ``prefix(images)`` -> tokens, ``suffix`` -> logits."""

    model: nn.Module
    start: int

    @classmethod
    def find(cls, model: nn.Module) -> tuple[FrozenPrefix | None, str]:
        """The frozen prefix of ``model``, or None and the reason there is none worth caching."""
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer) or type(model).forward_features is not VisionTransformer.forward_features:
            return None, f"{type(model).__name__} is not a timm VisionTransformer with the standard forward"
        if not isinstance(model.blocks, nn.Sequential):
            return None, "blocks are not an nn.Sequential"
        if getattr(model, "dynamic_img_size", False):
            return None, "dynamic_img_size models are not supported"
        if model._forward_hooks or model._forward_pre_hooks_with_kwargs:
            return None, "the model has forward hooks that expect its own forward"
        if _trains(model.patch_embed, model.cls_token, model.reg_token, model.pos_embed, model.norm_pre):
            return None, "the patch embedding / tokens / position embedding train: no frozen prefix"
        start = next((i for i, b in enumerate(model.blocks) if _trains(b)), len(model.blocks))
        if start == 0:
            return None, "block 0 trains: the frozen prefix is only the patch embedding, not worth caching"
        if start == len(model.blocks):
            return None, "no block trains (the head alone is cached by the linear probe instead)"
        parts = [(n, getattr(model, n)) for n in ("patch_embed", "pos_drop", "patch_drop", "norm_pre")]
        noisy = _stochastic([*parts, *[(f"blocks.{i}", model.blocks[i]) for i in range(start)]])
        if noisy is not None:
            return None, f"the frozen prefix has a random layer in train mode ({noisy}): its output is not a fixed function of the image"
        return cls(model, start), ""

    @torch.no_grad()
    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens entering block ``start`` (no autograd: nothing below it trains)."""
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(run_pre_hooks(m, x)))))
        return m.blocks[: self.start](x)

    @property
    def suffix(self) -> nn.Module:
        """Module mapping cached tokens to logits (shares every parameter with ``model``)."""
        return _Suffix(self.model, self.start)

    def compute(
        self, loader: DataLoader, device: torch.device, amp: Callable[[], Any], progress: bool = False, desc: str = "prefix"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix tokens (on CPU) and labels of every batch of ``loader``, in order."""
        outs, labels = [], []
        for x, y in batches(loader, desc, progress):
            with amp():
                outs.append(self.prefix(x.to(device, non_blocking=True)).cpu())
            labels.append(y)
        return distributed.gather_in_order(loader, outs, labels)


class _Suffix(nn.Module):
    """Blocks ``start..L``, final norm and head of a timm ViT (what ``forward_features`` + ``forward_head`` do there)."""

    def __init__(self, model: nn.Module, start: int):
        super().__init__()
        self.model = model
        self.start = start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.forward_head(m.norm(run_blocks(m, tokens, self.start)))


class _Views(Dataset):
    """Cached prefix tokens of V views x N images; ``view`` picks which one ``__getitem__`` returns."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor):
        self.tokens, self.labels, self.view = tokens, labels, 0

    def __len__(self) -> int:
        return self.tokens.shape[1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[self.view, index], self.labels[index]


@dataclass
class PrefixCache:
    """What the training loop uses when the prefix is cached: the suffix model and loaders over cached tokens."""

    frozen: FrozenPrefix
    train_views: _Views | None
    val: tuple[torch.Tensor, torch.Tensor] | None

    @property
    def suffix(self) -> nn.Module:
        """Cached tokens -> logits; shares every parameter with the model."""
        return self.frozen.suffix

    def train_loader(self, batch_size: int, seed: int) -> DataLoader | None:
        """Shuffled batches of cached training tokens: the sampler draws the same order as the image loader's."""
        return None if self.train_views is None else make_loader(self.train_views, batch_size, True, seed, 0)

    def val_loader(self, batch_size: int) -> DataLoader | None:
        return None if self.val is None else make_loader(TensorDataset(*self.val), batch_size, False, 0, 0)

    def set_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` (1-based) trains on view ``(epoch - 1) mod V``."""
        if self.train_views is not None:
            self.train_views.view = (epoch - 1) % self.train_views.tokens.shape[0]


def build_prefix_cache(
    model: nn.Module,
    mode: str,
    views: int,
    augment: bool,
    train_dataset: Dataset,
    val_loader: DataLoader | None,
    batch_size: int,
    device: torch.device,
    amp: Callable[[], Any],
    progress: bool = False,
    budget_mb: float = DEFAULT_BUDGET_MB,
) -> tuple[PrefixCache | None, dict[str, Any]]:
    """Decide whether and what to cache, and compute it.

    Args:
        model: the model after ``method.apply`` (trainable flags set).
        mode: ``auto`` (cache only what is exact), ``views`` (cache ``views`` augmented views), ``none``.
        views: views per image for ``mode=views``.
        augment: whether ``train_dataset`` applies a random transform.
        train_dataset: the training images with the training transform.
        val_loader: validation images (eval transform), cached whenever a prefix exists.
        batch_size: batch size for computing the prefix.
        device: where the model runs.
        amp: zero-argument factory of the autocast context the loop uses.
        progress: show progress bars.
        budget_mb: memory bound of the cached tokens.

    Returns:
        The cache (its ``train_views`` None when only validation is cached) or None, and a dict for
        ``metrics.json`` saying what was cached or why not.
    """
    if mode == "none":
        return None, {"used": False, "reason": "run.prefix_cache=none"}
    frozen, reason = FrozenPrefix.find(model)
    if frozen is None:
        return None, {"used": False, "reason": reason}
    m = frozen.model
    bytes_per_view = (m.patch_embed.num_patches + m.num_prefix_tokens) * m.embed_dim * 4
    if augment and mode == "auto":
        n_views, why_not = 0, "training augmentation draws a new crop every epoch (run.prefix_cache=views caches a few)"
    else:
        n_views, why_not = (max(1, views) if augment else 1), ""
    n_val = len(val_loader.dataset) if val_loader is not None else 0
    if n_views == 0 and n_val == 0:
        return None, {"used": False, "reason": why_not}
    need_mb = (n_views * len(train_dataset) + n_val) * bytes_per_view / 2**20
    if need_mb > budget_mb:
        return None, {"used": False, "reason": f"the cache would need {need_mb:.0f} MB (> {budget_mb:.0f} MB budget)"}
    info: dict[str, Any] = {
        "used": True, "start_block": frozen.start, "blocks": len(m.blocks), "train_views": n_views,
        "val": val_loader is not None, "cached_mb": round(need_mb, 1),
    }
    if why_not:
        info["train_reason"] = why_not
    was_training = m.training
    m.train()  # the mode the uncached loop runs the prefix in (the prefix has no mode-dependent layer)
    train_views = None
    if n_views:
        loader = distributed.shard_eval(make_loader(train_dataset, batch_size, False, 0, 0))
        parts, labels = [], torch.empty(0)
        for v in range(n_views):
            tokens, labels = frozen.compute(loader, device, amp, progress, f"prefix cache view {v + 1}/{n_views}")
            parts.append(tokens)
        train_views = _Views(torch.stack(parts), labels)
    val = frozen.compute(val_loader, device, amp) if val_loader is not None else None
    m.train(was_training)
    return PrefixCache(frozen, train_views, val), info
