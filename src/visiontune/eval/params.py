"""Trainable / total parameter counts that stay right for tied weights and 4-bit quantized layers."""

from __future__ import annotations

import torch
from torch import nn


def _logical_numel(param: torch.Tensor) -> int:
    """Number of model values a parameter stands for, not the number of stored elements.

    bitsandbytes ``Params4bit`` stores two 4-bit values per byte of its storage dtype once quantized, so
    its ``numel()`` undercounts. The quantization state remembers the original shape, which is exact even
    when the value count is odd (the packed tensor is padded); without it, every storage byte holds two
    values. A ``Params4bit`` that has not been quantized yet (still a float tensor, before ``.to(device)``)
    is counted as it is.
    """
    if type(param).__name__ != "Params4bit" or param.is_floating_point():
        return param.numel()
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        return int(torch.Size(shape).numel())
    return param.numel() * param.element_size() * 2


def count_parameters(model: nn.Module) -> dict:
    """Counts trainable and total parameters.

    Parameters shared between modules (tied embeddings / heads) are counted once, because
    ``named_parameters`` de-duplicates by identity. 4-bit bitsandbytes weights count as the number of
    values they encode, so a QLoRA backbone reports the same total as its full-precision original.

    Args:
        model: any module (a peft ``PeftModel`` included).

    Returns:
        ``{"trainable": int, "total": int, "trainable_pct": float}`` with the percentage in 0..100.
    """
    trainable = 0
    total = 0
    for _, param in model.named_parameters():
        n = _logical_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return {
        "trainable": trainable,
        "total": total,
        "trainable_pct": 100.0 * trainable / total if total else 0.0,
    }
