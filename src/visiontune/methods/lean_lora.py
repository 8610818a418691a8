"""peft's LoRA ``Linear`` with a leaner forward: the same function, fewer (tokens x features) temporaries.

peft computes an adapted layer as ``base(x) + B(A(dropout(x))) * scaling``, out of place: the base
output, B's output, the scaled copy and the sum are four ``(tokens, out_features)`` tensors per layer and
step, plus three passes over them. :class:`LeanLoraLinear` computes the base output as one GEMM and lets
B's GEMM accumulate into it (``out.addmm_(A(x), B^T, alpha=scaling)``): one output tensor and no
element-wise passes. Autograd is unchanged in substance (``addmm`` saves its inputs, not its output, so
accumulating in place is legal) and outputs equal peft's to float rounding (tests compare forward
outputs and every gradient).

DoRA (one active adapter, no dropout in training) goes the same way: peft computes
``base + (m/n - 1) * (base - bias) + (m/n) * B(A(x)) * scaling`` with ``n = ||W + scaling B A||`` per
output row (detached), which saves two output-sized tensors for backward and allocates about six; the
same function is ``(x W^T + B(A(x)) * scaling) * (m/n) + bias``: the bias-free GEMM, B accumulated into
it, one product (saving one tensor) and the bias added in place.

Only LoRA/DoRA on a plain ``nn.Linear`` in float, outside autocast, with no forward hooks, takes the
lean path; adapters being disabled, mixed-batch ``adapter_names``, 4-bit bases under DoRA, several
active DoRA adapters and anything else run peft's own forward. The class is plugged in through peft's
custom-module dispatch (``LoraConfig._register_custom_module``), so peft still owns everything else:
``update_layer``, merging, multiple adapters, the state-dict names (``...q.lora_A.default.weight``).

:func:`lean_terms`, :func:`accumulate` and :func:`rescale` also serve the fused q/k/v path
(:mod:`visiontune.methods.qkv`), which adds three parts' terms into one fused output.

Written by hand: peft has no in-place path for the LoRA sum or the DoRA rescaling.
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


def lean_terms(layer: nn.Module, x: torch.Tensor, any_base: bool = False) -> tuple[list[Term], torch.Tensor | None] | None:
    """The active adapter terms of a peft LoRA ``Linear`` for input ``x`` and DoRA's output scale, or None
    when peft must run the layer.

    The layer computes ``(base(x) - bias) * scale + bias`` after ``accumulate(base(x), terms, x)`` with
    ``scale = None`` meaning 1 (plain LoRA). An empty term list means the base layer alone (adapters merged
    or none active). ``any_base`` accepts any base layer that maps ``x`` to an output of its dtype (e.g.
    bitsandbytes' 4-bit Linear, whose peft layer adds the same ``B(A(x)) * scaling``) for plain LoRA; by
    default the base must be a plain float ``nn.Linear``.
    """
    if layer.disable_adapters or _hooked(layer):
        return None
    # A meta tensor (sweep --dry-run's shape check) has no autocast state to ask about: it is never autocast.
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        return None
    base = layer.get_base_layer()
    if _hooked(base):
        return None
    if not any_base and (type(base) is not nn.Linear or x.dtype != base.weight.dtype):
        return None
    if not hasattr(layer, "lora_variant") or not hasattr(layer, "scaling"):
        return None
    if layer.merged:
        return [], None
    active = [name for name in layer.active_adapters if name in layer.lora_A.keys()]
    terms: list[Term] = []
    scale = None
    for name in active:
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        if type(lora_b) is not nn.Linear or lora_b.bias is not None or _hooked(lora_b) or lora_b.weight.dtype != x.dtype:
            return None
        term = (lora_a, layer.lora_dropout[name], lora_b.weight, float(layer.scaling[name]))
        if name in layer.lora_variant:
            scale = _dora_scale(layer, name, term, len(active))
            if scale is None:
                return None
        terms.append(term)
    return terms, scale


def _dora_scale(layer: nn.Module, name: str, term: Term, n_active: int) -> torch.Tensor | None:
    """DoRA's ``magnitude / ||W + scaling * B A||`` per output row (the norm detached, as peft and the paper
    do), or None when peft's own DoRA forward must run: another variant, several active adapters (peft then
    rescales the running sum), dropout in training (peft then recomputes the base on the dropped input),
    a non-float base."""
    from peft.tuners.lora.variants import DoraLinearVariant

    lora_a, dropout, b_weight, scaling = term
    base = layer.get_base_layer()
    if type(layer.lora_variant[name]) is not DoraLinearVariant or n_active != 1 or type(base) is not nn.Linear:
        return None
    if getattr(layer, "fan_in_fan_out", False) or type(lora_a) is not nn.Linear or lora_a.bias is not None:
        return None
    if layer.training and not isinstance(dropout, nn.Identity):
        return None
    magnitude = layer.lora_magnitude_vector[name]
    if _hooked(magnitude) or _hooked(lora_a):
        return None
    with torch.no_grad():  # peft's own norm ||W + scaling * B A|| per output row
        norm = magnitude.get_weight_norm(base.weight, b_weight @ lora_a.weight, scaling)
    return magnitude.weight / norm


def accumulate(out: torch.Tensor, terms: list[Term], x: torch.Tensor) -> None:
    """``out += B(A(dropout(x))) * scaling`` for every term, in place. ``out`` and ``x`` are 2-d (tokens first)."""
    for lora_a, dropout, b_weight, scaling in terms:
        hidden = lora_a(dropout(x))
        out.addmm_(hidden, b_weight.t(), alpha=scaling)


def rescale(out: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """DoRA's output from the bias-free sum ``out`` = x W^T + B(A(x)) s: ``out * scale + bias``.

    The product is out of place (autograd saves ``out`` for the magnitude's gradient); the bias is added in
    place (nothing saved the product). With ``scale=None`` (plain LoRA) the bias must already be in ``out``.
    """
    if scale is None:
        return out
    out = out * scale
    if bias is not None:
        out += bias
    return out


class LeanLoraLinear(_PeftLinear):
    """peft's LoRA ``Linear`` (subclass) whose LoRA/DoRA forward accumulates B's product into the output."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        lean = None if (args or kwargs) else lean_terms(self, x)
        if lean is None:
            return super().forward(x, *args, **kwargs)
        terms, scale = lean
        base = self.get_base_layer()
        flat = x.reshape(-1, x.shape[-1])
        out = F.linear(flat, base.weight, base.bias if scale is None else None)
        accumulate(out, terms, flat)
        out = rescale(out, scale, base.bias)
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
