"""peft's LoRA ``Linear`` with a leaner forward: the same function, fewer (tokens x features) temporaries.

peft computes an adapted layer as ``base(x) + B(A(dropout(x))) * scaling``, out of place: the base
output, B's output, the scaled copy and the sum are four ``(tokens, out_features)`` tensors per layer and
step, plus three passes over them. :class:`LeanLoraLinear` computes the base output as one GEMM and lets
B's GEMM accumulate into it (``out.addmm_(A(x), B^T, alpha=scaling)``): one output tensor and no
element-wise passes. Autograd is unchanged in substance (``addmm`` saves its inputs, not its output, so
accumulating in place is legal) and outputs equal peft's to float rounding (tests compare forward
outputs and every gradient).

Only plain LoRA on a plain ``nn.Linear`` in float, outside autocast, with no forward hooks, takes the
lean path; DoRA, adapters being disabled, mixed-batch ``adapter_names``, 4-bit bases and anything else
run peft's own forward. The class is plugged in through peft's custom-module dispatch
(``LoraConfig._register_custom_module``), so peft still owns everything else: ``update_layer``, merging,
multiple adapters, the state-dict names (``...q.lora_A.default.weight``).

:func:`plain_terms` and :func:`accumulate` also serve the fused q/k/v path
(:mod:`visiontune.backbones.qkv`), which adds three parts' terms into one fused output.

Written by hand: peft has no in-place path for the LoRA sum.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft.tuners.lora.layer import Linear as _PeftLinear

Term = tuple[nn.Module, nn.Module, torch.Tensor, float]
"""One adapter's pieces: (lora_A, dropout, lora_B weight, scaling)."""


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def plain_terms(layer: nn.Module, x: torch.Tensor, any_base: bool = False) -> list[Term] | None:
    """The active plain-LoRA terms of a peft LoRA ``Linear`` for input ``x``, or None when peft must run it.

    An empty list means the base layer alone (adapters merged or none active). ``any_base`` accepts any
    base layer that maps ``x`` to an output of its dtype (e.g. bitsandbytes' 4-bit Linear, whose peft
    layer adds the same ``B(A(x)) * scaling``); by default the base must be a plain float ``nn.Linear``.
    """
    if layer.disable_adapters or _hooked(layer):
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    base = layer.get_base_layer()
    if _hooked(base):
        return None
    if not any_base and (type(base) is not nn.Linear or x.dtype != base.weight.dtype):
        return None
    if not hasattr(layer, "lora_variant") or not hasattr(layer, "scaling"):
        return None
    if layer.merged:
        return []
    terms: list[Term] = []
    for name in layer.active_adapters:
        if name not in layer.lora_A.keys():
            continue
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        if name in layer.lora_variant or type(lora_b) is not nn.Linear or lora_b.bias is not None or _hooked(lora_b):
            return None
        if lora_b.weight.dtype != x.dtype:
            return None
        terms.append((lora_a, layer.lora_dropout[name], lora_b.weight, float(layer.scaling[name])))
    return terms


def accumulate(out: torch.Tensor, terms: list[Term], x: torch.Tensor) -> None:
    """``out += B(A(dropout(x))) * scaling`` for every term, in place. ``out`` and ``x`` are 2-d (tokens first)."""
    for lora_a, dropout, b_weight, scaling in terms:
        hidden = lora_a(dropout(x))
        out.addmm_(hidden, b_weight.t(), alpha=scaling)


class LeanLoraLinear(_PeftLinear):
    """peft's LoRA ``Linear`` (subclass) whose plain-LoRA forward accumulates B's product into the output."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        terms = None if (args or kwargs) else plain_terms(self, x)
        if terms is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        flat = x.reshape(-1, x.shape[-1])
        out = F.linear(flat, base.weight, base.bias)
        accumulate(out, terms, flat)
        return out.view(*x.shape[:-1], out.shape[-1])


def _lean_for_plain_linear(target: nn.Module, adapter_name: str, **kwargs: Any) -> nn.Module | None:
    """peft custom-dispatch factory: a :class:`LeanLoraLinear` for plain ``nn.Linear`` targets, else None
    (None hands the layer on to peft's own dispatchers: 4-bit, 8-bit and the rest)."""
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    if type(base) is not nn.Linear:
        return None
    return LeanLoraLinear(target, adapter_name, **kwargs)


def use_lean_layers(config: Any) -> Any:
    """Register :class:`LeanLoraLinear` for plain Linears on a peft ``LoraConfig`` (in place; returns it)."""
    config._register_custom_module({nn.Linear: _lean_for_plain_linear})
    return config
