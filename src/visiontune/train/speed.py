"""Exact speed paths of the training loop and evaluation: the same function, less work.

* **Class-token-only last block.** A ViT whose head reads the class token (timm ``global_pool='token'``,
  DINOv2's default) only needs the last block's output at that token. The other tokens still provide
  keys and values there, but their query, attention output, projection, MLP and final norm are thrown
  away by the pooling. :class:`ClassTokenViT` computes them for the class token only, which removes
  about 85 % of the last block's work (a twelfth of ViT-S/B's total, forward and backward) and
  changes outputs only by float rounding. A self-check against the full forward guards every model it
  wraps; anything it does not recognise (other pooling, register-free variants with attention pooling,
  Mona's adapted blocks, a timm version with a different attention) runs the model as is.
* **Channels-last convolutions.** oneDNN's convolutions are faster on NHWC tensors on CPUs (ResNet-18
  eval 1.3x, EfficientNet-Lite0 training 1.5x measured here), and PyTorch picks NHWC kernels when the
  weights are channels-last, whatever the input layout.
* **torch.compile** (opt-in, ``run.compile``): measured on the 2-core CPU this project is developed on,
  compiling ViT-S LoRA training took ~160 s for ~10 % faster steps, a loss for every run shorter than
  ~30 minutes; on GPUs it can pay off.

Written by hand: timm has no per-token early exit, and neither timm nor PyTorch chooses the memory
format for a model.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visiontune.methods.qkv import SplitQKV


def _active_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


def class_token_blocker(model: nn.Module) -> str | None:
    """Why :class:`ClassTokenViT` cannot wrap ``model`` (None when it can)."""
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer) or type(model).forward_features is not VisionTransformer.forward_features:
        return f"{type(model).__name__} is not a timm VisionTransformer with the standard forward"
    if type(model).forward_head is not VisionTransformer.forward_head or type(model).forward is not VisionTransformer.forward:
        return "the model overrides forward / forward_head"
    if model._forward_hooks or model._forward_pre_hooks_with_kwargs:
        return "the model has forward hooks that expect its own forward"
    if model.global_pool != "token" or model.attn_pool is not None:
        return f"the head pools {model.global_pool!r}, not the class token"
    if not isinstance(model.blocks, nn.Sequential) or not len(model.blocks):
        return "blocks are not an nn.Sequential"
    last = model.blocks[-1]
    if type(last) is not Block or type(last.attn) is not Attention:
        return f"the last block is a {type(last).__name__} with {type(last.attn).__name__}, not timm's Block/Attention"
    return None


class ClassTokenViT(nn.Module):
    """A timm ViT with class-token pooling, computing its last block at the class token only.

    Shares every parameter with ``model``; ``forward``, ``forward_features`` (normalised class token,
    shape ``(B, 1, C)``) and ``forward_head`` behave like the model's. In train mode with an active
    dropout inside the last block the full block runs (a dropout mask over fewer tokens would draw
    different random numbers).

    Args:
        model: the ViT (check :func:`class_token_blocker` first).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = run_pre_hooks(m, x)
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        return run_blocks(m, x, 0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(self._tokens(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def run_pre_hooks(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Call ``model``'s forward pre-hooks as ``model(x)`` would (e.g. QLoRA's compute-dtype choice at the first
    input) for code that runs the model's parts itself; returns the possibly replaced input."""
    for hook in model._forward_pre_hooks.values():
        out = hook(model, (x,))
        if out is not None:
            x = out[0] if isinstance(out, tuple) else out
    return x


def run_blocks(model: nn.Module, x: torch.Tensor, start: int) -> torch.Tensor:
    """Blocks ``start..L`` of a timm ViT on tokens ``x``; the last at the class token only when that is exact.

    Returns ``(B, N, C)`` tokens, or ``(B, 1, C)`` (the class token) when the shortcut ran.
    """
    blocks = model.blocks
    shortcut = class_token_blocker(model) is None and not (model.training and _active_dropout(blocks[-1]))
    body = blocks[start : len(blocks) - 1] if shortcut else blocks[start:]
    if len(body):
        if getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled():
            from timm.models import checkpoint_seq

            x = checkpoint_seq(body, x)
        else:
            x = body(x)
    return last_block_class_token(blocks[-1], x) if shortcut else x


def last_block_class_token(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``Block.forward`` with ``Attention.forward`` (timm 1.0) evaluated for token 0 only: ``(B, 1, C)``."""
    attn = block.attn
    b, n, _ = x.shape
    h = block.norm1(x)
    heads, hd = attn.num_heads, attn.head_dim
    if isinstance(attn.qkv, SplitQKV):  # separate projections: the query of the class token alone
        q = attn.qkv.q(h[:, :1]).reshape(b, 1, heads, hd).transpose(1, 2)
        k = attn.qkv.k(h).reshape(b, n, heads, hd).transpose(1, 2)
        v = attn.qkv.v(h).reshape(b, n, heads, hd).transpose(1, 2)
    else:
        q, k, v = attn.qkv(h).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        q = q[:, :, :1]
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        o = attn.attn_drop((q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
    o = attn.norm(o.transpose(1, 2).reshape(b, 1, attn.attn_dim))
    if attn.gate is not None:
        o = o * attn.gate(h[:, :1]).sigmoid()
    o = attn.proj_drop(attn.proj(o))
    x0 = x[:, :1] + block.drop_path1(block.ls1(o))
    return x0 + block.drop_path2(block.ls2(block.mlp(block.norm2(x0))))


def fast_forward(model: nn.Module, check: bool = True) -> nn.Module:
    """``model`` wrapped in :class:`ClassTokenViT` when that applies and agrees with it, else ``model``.

    Args:
        model: any classifier.
        check: compare both paths once on a small random input (a private generator: the global
            random stream is untouched) and keep the model as is if they disagree beyond rounding.
    """
    if class_token_blocker(model) is not None:
        return model
    fast = ClassTokenViT(model)
    if check:
        # The shortcut is exact for any weights, so one check per model object is enough (a run wraps
        # the same model for the probe head init, training and validation).
        if model not in _CHECKED:
            _CHECKED[model] = _agrees(model, fast)
        if not _CHECKED[model]:
            return model
    return fast


_CHECKED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@torch.no_grad()
def _agrees(model: nn.Module, fast: nn.Module) -> bool:
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, model.patch_embed.proj.in_channels, *model.patch_embed.img_size, generator=gen)
        if ref is not None:
            x = x.to(ref.device, ref.dtype)
        a, b = model(x), fast(x)
        return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * (1 + float(a.abs().max()))))
    finally:
        for m, mode in modes:
            m.training = mode


def channels_last_if_convnet(model: nn.Module) -> bool:
    """Put a mostly-convolutional model's 4-d weights in channels-last layout (in place); True if done.

    Mostly convolutional = more than half of the parameters sit in ``nn.Conv2d`` layers, so a ViT's
    patch embedding alone does not qualify.
    """
    total = sum(p.numel() for p in model.parameters())
    conv = sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters(recurse=False))
    if not total or conv * 2 <= total:
        return False
    model.to(memory_format=torch.channels_last)
    return True


def maybe_compile(model: nn.Module, enabled: bool) -> Any:
    """``torch.compile(model)`` when ``enabled`` (see the module docstring for when that pays), else ``model``."""
    return torch.compile(model) if enabled else model
