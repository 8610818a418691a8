"""iBOT's block-wise patch masks, sampled the way DINOv2 samples them per batch.

A mask covers a target number of patches with random rectangles (aspect ratio log-uniform in
[0.3, 1/0.3], each of at least ``min_patches`` patches), as BEiT's block masking does, so the student
has to infer whole regions rather than isolated patches. Per batch, a fraction
(``probability``) of the global crops is masked, and their target ratios are spread evenly over
[min_ratio, max_ratio] (one stratum each) so every batch sees easy and hard masks.

Written here because timm, torchvision and peft have no mask generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def block_mask(
    height: int, width: int, num_masked: int, rng: np.random.Generator, min_patches: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3), max_attempts: int = 10,
) -> np.ndarray:
    """A ``[height, width]`` bool mask of at most ``num_masked`` patches made of random rectangles.

    Stops when the target is reached or when ``max_attempts`` rectangles in a row add nothing.

    Args:
        height: patch-grid rows.
        width: patch-grid columns.
        num_masked: target number of masked patches (clipped to the grid).
        rng: numpy generator (seeded by the caller for reproducibility).
        min_patches: smallest rectangle area tried.
        aspect: range of height/width ratios, sampled log-uniformly.
        max_attempts: rectangles tried per placement before giving up.
    """
    mask = np.zeros((height, width), dtype=bool)
    target = int(min(max(0, num_masked), height * width))
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    count = 0
    while count < target:
        budget = target - count
        added = 0
        for _ in range(max_attempts):
            area = rng.uniform(min(min_patches, budget), budget)
            ratio = math.exp(rng.uniform(log_lo, log_hi))
            h = int(round(math.sqrt(area * ratio)))
            w = int(round(math.sqrt(area / ratio)))
            if not (1 <= h <= height and 1 <= w <= width):
                continue
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            window = mask[top : top + h, left : left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window[:] = True
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


def sample_masks(
    n_images: int, grid: tuple[int, int], probability: float, ratio: tuple[float, float], rng: np.random.Generator
) -> torch.Tensor:
    """Masks for a batch of global crops, as DINOv2's collate samples them.

    ``int(n_images * probability)`` crops are masked; the i-th masked crop draws its ratio uniformly
    within the i-th of equal strata of ``ratio``; the rest get empty masks; the order is shuffled.

    Returns:
        ``[n_images, H, W]`` bool tensor.
    """
    h, w = grid
    n_masked = int(n_images * probability)
    strata = np.linspace(ratio[0], ratio[1], n_masked + 1)
    masks = [block_mask(h, w, int(h * w * rng.uniform(strata[i], strata[i + 1])), rng) for i in range(n_masked)]
    masks += [np.zeros((h, w), dtype=bool)] * (n_images - n_masked)
    order = rng.permutation(n_images)
    return torch.from_numpy(np.stack([masks[i] for i in order]) if n_images else np.zeros((0, h, w), dtype=bool))
