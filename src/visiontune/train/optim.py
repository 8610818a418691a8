"""AdamW with per-group learning rates and a linear-warmup + cosine-decay schedule (per optimizer step)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_ratio: float) -> LambdaLR:
    """Scale every group's lr linearly from ~0 to its peak over ``warmup_steps``, then cosine to ``min_ratio``.

    A multiplicative schedule keeps the head/body lr ratio constant through training, which an
    absolute ``lr_min`` (timm's CosineLRScheduler) would not.
    """
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)
