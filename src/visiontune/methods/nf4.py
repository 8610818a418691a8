"""4-bit NormalFloat (NF4) frozen backbones for QLoRA and QDoRA (Dettmers et al., NeurIPS'23,
https://arxiv.org/abs/2305.14314): timm ``nn.Linear`` layers swapped for bitsandbytes' ``Linear4bit`` and back.

Written by hand because transformers' quantization applies to Hugging Face models only; the kernels and the NF4
format are bitsandbytes'. Kept apart from :mod:`visiontune.methods.lora` (the adapter method) because the memory
estimate (:mod:`visiontune.estimate`) sizes NF4 layers without building any LoRA, and because the CPU quirks of
bitsandbytes documented here are about the 4-bit layers alone. bitsandbytes is imported on first use
(:func:`require_bitsandbytes`): it is an optional extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from visiontune.errors import ConfigError
from visiontune.methods.base import classifier_of, tensors_bytes

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def require_bitsandbytes() -> Any:
    """The ``bitsandbytes`` module, or a ConfigError naming the extra that installs it."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # optional heavy dependency
        raise ConfigError(
            "method.name=qlora/qdora needs bitsandbytes; install it with pip install 'visiontune[quant]' "
            "(or pip install bitsandbytes), or use method.name=lora/dora"
        ) from e
    return bnb


def is_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit``."""
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def backbone_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer except the classifier's (each shared tensor counted once)."""
    head = {id(t) for t in [*classifier_of(model).parameters(), *classifier_of(model).buffers()]}
    return tensors_bytes(t for t in [*model.parameters(), *model.buffers()] if id(t) not in head)


def keep_portable_4bit_layout(layer: nn.Module) -> None:
    """Keep a ``Linear4bit`` in bitsandbytes' portable NF4 layout on every CPU (no AVX-512 BF16 repacking).

    On a CPU with AVX-512 BF16, bitsandbytes (0.48-0.50 at least) rewrites a 4-bit weight into a packed
    layout for its bf16 CPU kernel the first time the layer runs in eval mode without gradients, and keeps it
    that way. Three things then break: (1) the packed branch of ``matmul_4bit`` has no autograd, so the next
    training step after any eval pass (the probe's head initialisation, a validation epoch) fails with "a view
    of a leaf Variable that requires grad is being used in an in-place operation"; (2) the repacking reshapes
    the block scales to ``[out, in / 64]`` and crashes for layers whose ``in_features`` is not a multiple of the
    64-value block (32, 96, 160: Swin-T, tiny models); (3) it computes in bf16, so NF4 features drift further
    from fp32 (cosine 0.984 vs >= 0.99). Turning the kernel off per layer gives the same dequantize-then-fp32
    path on every CPU (the one AVX2 machines take anyway): identical numbers on both kinds of CPU, and
    inference speed is unaffected where it matters, because predictors use the merged full-precision model.
    """
    if not hasattr(layer, "support_avx512bf16_for_cpu"):
        # A bitsandbytes release without the CPU repacking (or with it renamed): nothing to switch off here;
        # tests/methods/test_qlora_cpu.py fails on the locked version if this attribute ever disappears.
        return
    layer.support_avx512bf16_for_cpu = False


def _auto_compute_dtype(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: 4-bit layers compute in bf16 on CUDA and fp32 elsewhere (emulated bf16 is slow on CPU)."""
    x = args[0] if args else None
    if not torch.is_tensor(x):
        return
    dtype = torch.bfloat16 if x.device.type == "cuda" else torch.float32
    if getattr(module, "_visiontune_compute_dtype", None) == dtype:
        return
    for m in module.modules():
        if is_4bit(m):
            m.compute_dtype = dtype
            m.compute_type_is_set = True
    module._visiontune_compute_dtype = dtype


NF4_BLOCKS = (64, 32)  # 64: bitsandbytes' default and the QLoRA paper's; 32 where a row is not whole 64-blocks


def nf4_blocksize(in_features: int) -> int | None:
    """The NF4 block size for a Linear with ``in_features`` inputs: 64, else 32, else None (keep it fp32).

    Blocks must tile each weight row exactly. bitsandbytes counts blocks over the flattened weight when it
    quantizes, but its native CPU dequantize kernel on AVX-512 machines (0.50.2, seen on AMD EPYC Zen 4)
    indexes the block scales row by row; the two agree only when every row holds whole blocks. With 64-blocks
    on 32-, 96- or 160-wide rows the dequantized weight was 18-40 % off (relative Frobenius error) instead of
    NF4's usual 9 %; with 32-blocks it is exact on every CPU. CUDA supports both sizes.
    """
    return next((b for b in NF4_BLOCKS if in_features % b == 0), None)


@dataclass
class Quantized:
    """What :func:`quantize_linears` did: layers quantized, which of them use 32-value blocks, which stayed fp32."""

    count: int = 0
    block32: list[str] = field(default_factory=list)
    kept_full_precision: dict[str, str] = field(default_factory=dict)


def quantize_linears(
    model: nn.Module, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "auto",
    device: torch.device | str | None = None,
) -> Quantized:
    """Replace every frozen ``nn.Linear`` except the classifier by a bitsandbytes ``Linear4bit``, in place.

    Quantization happens on ``device`` when it is a CUDA device (each layer's fp32 weight goes there, is
    quantized, and only the 4-bit layer stays: the GPU never holds the whole fp32 backbone), else on the
    device the weight is on (bitsandbytes >= 0.45 has CPU kernels). A Linear whose input width is not a
    multiple of 32 stays in full precision (see :func:`nf4_blocksize`); the returned record names it.
    """
    target = torch.device(device) if device is not None and torch.device(device).type == "cuda" else None
    bnb = require_bitsandbytes()
    head = {id(m) for m in classifier_of(model).modules()}
    done = Quantized()
    for parent_name, parent in list(model.named_modules()):
        if id(parent) in head:
            continue
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or id(child) in head:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            blocksize = nf4_blocksize(child.in_features)
            if blocksize is None:
                done.kept_full_precision[name] = (
                    f"in_features={child.in_features} is not a multiple of {NF4_BLOCKS[-1]} (the NF4 block)"
                )
                continue
            dev = child.weight.device
            q = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None,
                compute_dtype=_DTYPES.get(compute_dtype), compress_statistics=double_quant, quant_type=quant_type,
                device="meta",  # no throw-away fp32 init of a weight that is replaced right below
            )
            q.weight = bnb.nn.Params4bit(
                child.weight.detach().float().contiguous(), requires_grad=False, quant_type=quant_type,
                compress_statistics=double_quant, blocksize=blocksize,
            )
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
            keep_portable_4bit_layout(q)
            setattr(parent, child_name, q.to(target or dev))  # .to() is what quantizes a Params4bit
            done.count += 1
            if blocksize != NF4_BLOCKS[0]:
                done.block32.append(name)
    if compute_dtype == "auto" and done.count and _auto_compute_dtype not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_auto_compute_dtype)
    # peft picks its 4-bit LoRA layer (dequantize-aware, DoRA-aware) only when the model says so.
    model.is_loaded_in_4bit = True
    return done


def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every ``Linear4bit`` by a plain ``nn.Linear`` holding its dequantized weight, in place.

    Returns:
        How many layers were dequantized.
    """
    bnb = require_bitsandbytes()
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not is_4bit(child):
                continue
            data, qs = child.weight.data, child.weight.quant_state
            if getattr(qs, "packing_format_for_cpu", False):
                # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs at inference; undo it before dequantizing.
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                data, qs = _convert_weight_packed_for_cpu_inverse(data, qs)
            w = bnb.functional.dequantize_4bit(data, qs).to(dtype)
            lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            lin.weight = nn.Parameter(w, requires_grad=False)
            if child.bias is not None:
                lin.bias = nn.Parameter(child.bias.detach().to(dtype).clone(), requires_grad=False)
            setattr(parent, child_name, lin)
            count += 1
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _auto_compute_dtype:
            del model._forward_pre_hooks[key]
    for attr in ("is_loaded_in_4bit", "_visiontune_compute_dtype"):
        if attr in model.__dict__:
            delattr(model, attr)
    return count


__all__ = ["NF4_BLOCKS", "Quantized", "backbone_bytes", "dequantize_linears", "is_4bit", "keep_portable_4bit_layout",
           "nf4_blocksize", "quantize_linears", "require_bitsandbytes"]
