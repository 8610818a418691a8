"""Mona: multi-cognitive visual adapters (Yin et al., CVPR 2025, "5%>100%: Breaking Performance
Shackles of Full Fine-Tuning on Visual Recognition Tasks", https://arxiv.org/abs/2408.08345).

Two adapters per transformer block, one after the attention residual and one after the MLP residual;
only the adapters and the classification head train. One adapter maps tokens ``x`` (channel dim C) to::

    z = down(LN(x) * gamma + x * gamma_x)               # scaled LayerNorm, gamma=1e-6, gamma_x=1; C -> d
    y = z + (dw3(z) + dw5(z) + dw7(z)) / 3              # depthwise 3x3/5x5/7x7 on the H x W patch grid
    y = y + projector(y)                                # 1x1 conv with its own residual
    out = x + up(dropout(gelu(y)))                      # d -> C

Written by hand because no maintained library (peft, timm) provides Mona.

Decisions beyond the paper, each configurable or documented:
  * Where it goes. Blocks are found by walking the model's modules for known timm block types (ViT
    ``Block`` — ViT, DeiT, DINOv2, CLIP ViT —, ``EvaBlock`` — DINOv3, EVA —, Swin and Swin V2 blocks).
    Their class is swapped in place for a subclass whose ``forward`` adds the two adapters (the way
    ``torch.nn.utils.parametrize`` re-classes a module), so the timm model object, its state-dict
    names and its API (``forward_features``, ``forward_head``, ``get_classifier``, ``pretrained_cfg``,
    grad checkpointing) are untouched; adapter parameters appear as ``<block>.mona1.*`` /
    ``<block>.mona2.*``. ``method.blocks`` uses the block syntax shared with LoRA
    (:mod:`visiontune.methods.targets`): depth order, Swin blocks counted across stages.
  * Patch grid of a ViT. Token sequences are (B, prefix + H*W, C). The grid of the *current* input is
    recorded by a forward pre-hook on ``patch_embed`` (so dynamic image sizes and non-square inputs
    work); without it (blocks called directly) a square grid is inferred from the token count.
  * Class / register tokens (``prefix_tokens``). They have no place in the H x W grid. Default
    ``skip_conv``: they take every per-token step (scaled LayerNorm, down-projection, the 1x1 projector
    with its residual, GELU, dropout, up-projection) and skip only the spatial depthwise convolutions,
    i.e. their multi-scale term is zero. They neither see nor influence the patch grid inside the
    adapter (attention still mixes them). ``bypass`` leaves them unchanged (identity). A consequence
    of class-token pooling (DINOv2's default head): after the last block's attention nothing reaches
    the class token from the patches, so that block's depthwise kernels get zero gradient.
  * Swin. Blocks work on the full (B, H, W, C) feature map, so the adapter convolutions see the whole
    map across window borders, as in the authors' Swin code (adapters sit after the window merge).
  * Init (``init``). ``paper`` follows the released classification code: linear weights
    ``trunc_normal_(std=0.02)`` (whose default cut is at +-2 absolute, so in effect normal(0, 0.02)) with zero bias, LayerNorm (1, 0), PyTorch's default conv init, gamma=1e-6,
    gamma_x=1. ``zero`` also zeroes the up-projection, so training starts exactly at the pretrained
    network (the LoRA convention).
  * Speed. The three depthwise convolutions are averaged into one 7x7 kernel before convolving (exact:
    convolution is linear in its kernel and all three use zero padding); the three kernels stay separate
    parameters, so gradients and saved weights are those of the paper's module.

The grid recorded by the hook is per model, not per call: two threads running one model at different
image sizes at the same time would race (run one model per thread, or one image size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visiontune.config import MethodConfig
from visiontune.errors import ConfigError
from visiontune.methods.base import Method, classifier_of, freeze, register_method
from visiontune.methods.targets import block_spec_problems, parse_blocks
from visiontune.registry import BACKBONES

# timm modules whose models are built from the supported block types (used for the early config check).
SUPPORTED_TIMM_MODULES = ("vision_transformer", "eva", "swin_transformer", "swin_transformer_v2")
SUPPORTED_FAMILIES = "ViT / DeiT / DINOv2 / CLIP ViT (timm vision_transformer), DINOv3 / EVA (timm eva), Swin and Swin V2"
KERNEL_SIZES = (3, 5, 7)


# ============================================================================ the adapter


class MultiScaleConv(nn.Module):
    """Mona's spatial operator on a d-channel grid: averaged depthwise 3/5/7 convs + identity, then a
    1x1 projector with its own residual (the paper's "MonaOp").

    Args:
        dim: channels d (the adapter's inner width).
        kernel_sizes: odd depthwise kernel sizes, averaged.
    """

    def __init__(self, dim: int, kernel_sizes: Sequence[int] = KERNEL_SIZES, device: Any = None, dtype: Any = None):
        super().__init__()
        if any(k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel sizes must be odd to keep the grid size, got {list(kernel_sizes)}")
        dd = {"device": device, "dtype": dtype}
        self.kernel_sizes = tuple(kernel_sizes)
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, **dd) for k in self.kernel_sizes)
        self.projector = nn.Conv2d(dim, dim, 1, **dd)

    def _fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The average of the depthwise kernels, zero-padded to the largest size, and of their biases."""
        kmax = max(self.kernel_sizes)
        weight = sum(F.pad(c.weight, [(kmax - c.kernel_size[0]) // 2] * 4) for c in self.convs) / len(self.convs)
        bias = sum(c.bias for c in self.convs) / len(self.convs)
        return weight, bias

    def pointwise(self, z: torch.Tensor) -> torch.Tensor:
        """``z + projector(z)`` on channels-last values (..., d): the part that needs no spatial neighbours."""
        return z + F.linear(z, self.projector.weight.flatten(1), self.projector.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Args: z: channels-last grid (B, H, W, d). Returns: the same shape."""
        weight, bias = self._fused_kernel()
        # A permuted NHWC tensor is an NCHW tensor in channels_last memory format: no copy needed.
        spatial = F.conv2d(z.permute(0, 3, 1, 2), weight, bias, padding=max(self.kernel_sizes) // 2, groups=z.shape[-1])
        return self.pointwise(z + spatial.permute(0, 2, 3, 1))


class Mona(nn.Module):
    """One Mona adapter: ``x + up(dropout(gelu(MultiScaleConv(down(LN(x) * gamma + x * gamma_x)))))``.

    Args:
        dim: channels C of the tokens it adapts.
        inner_dim: bottleneck width d (paper: 64).
        dropout: dropout before the up-projection (paper: 0.1).
        prefix_tokens: ``skip_conv`` or ``bypass``; what class/register tokens do (see module docstring).
        init: ``paper`` or ``zero`` (zero up-projection: the adapter starts as the identity).
    """

    def __init__(
        self,
        dim: int,
        inner_dim: int = 64,
        dropout: float = 0.1,
        prefix_tokens: Literal["skip_conv", "bypass"] = "skip_conv",
        init: Literal["paper", "zero"] = "paper",
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__()
        if prefix_tokens not in ("skip_conv", "bypass"):
            raise ValueError(f"prefix_tokens={prefix_tokens!r} is not one of skip_conv, bypass")
        dd = {"device": device, "dtype": dtype}
        self.prefix_tokens = prefix_tokens
        self.norm = nn.LayerNorm(dim, **dd)
        self.gamma = nn.Parameter(torch.empty(dim, **dd))
        self.gamma_x = nn.Parameter(torch.empty(dim, **dd))
        self.down = nn.Linear(dim, inner_dim, **dd)
        self.mixer = MultiScaleConv(inner_dim, **dd)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(inner_dim, dim, **dd)
        self.reset_parameters(init)

    def reset_parameters(self, init: Literal["paper", "zero"] = "paper") -> None:
        """Initialise as the authors' released code does (``paper``), optionally with a zero up-projection."""
        if init not in ("paper", "zero"):
            raise ValueError(f"init={init!r} is not one of paper, zero")
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        nn.init.constant_(self.gamma, 1e-6)
        nn.init.ones_(self.gamma_x)
        for lin in (self.down, self.up):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        for conv in [*self.mixer.convs, self.mixer.projector]:
            conv.reset_parameters()
        if init == "zero":
            nn.init.zeros_(self.up.weight)

    def _project_in(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(x) * self.gamma + x * self.gamma_x)

    def _project_out(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(F.gelu(z)))

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None, num_prefix_tokens: int = 0) -> torch.Tensor:
        """Adapt ``x``.

        Args:
            x: a channels-last map (B, H, W, C), or tokens (B, P + H*W, C) with ``grid=(H, W)``
                and P = ``num_prefix_tokens`` class/register tokens first.
            grid: the patch grid of token input; unused for a 4-d map.
            num_prefix_tokens: leading tokens that are not on the grid.

        Returns:
            Same shape as ``x``.
        """
        if x.ndim == 4:
            return x + self._project_out(self.mixer(self._project_in(x)))
        if grid is None:
            raise ValueError("Mona on a token sequence needs grid=(H, W) of its patch tokens")
        b, n, c = x.shape
        h, w = grid
        p = num_prefix_tokens
        if n != p + h * w:
            raise ValueError(f"Mona got {n} tokens, expected {p} prefix + {h}x{w} grid = {p + h * w}")
        if self.prefix_tokens == "bypass" and p:
            patches = x[:, p:]
            z = self.mixer(self._project_in(patches).reshape(b, h, w, -1)).reshape(b, h * w, -1)
            return torch.cat([x[:, :p], patches + self._project_out(z)], dim=1)
        z = self._project_in(x)
        grid_z = self.mixer(z[:, p:].reshape(b, h, w, -1)).reshape(b, h * w, -1)
        z = torch.cat([self.mixer.pointwise(z[:, :p]), grid_z], dim=1) if p else grid_z
        return x + self._project_out(z)


# ============================================================================ the patch grid of token models


class PatchGrid:
    """Records the patch grid of the image being processed; a forward pre-hook on ``patch_embed``.

    A plain object (not a module) shared by the hook and every adapted block, so ``copy.deepcopy`` and
    pickling keep hook and blocks pointing at one instance.

    Args:
        num_prefix_tokens: class + register tokens in front of the patch tokens.
    """

    def __init__(self, num_prefix_tokens: int):
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.size: tuple[int, int] | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        h, w = args[0].shape[-2:]
        feat_size = getattr(module, "dynamic_feat_size", None)
        if callable(feat_size):
            self.size = tuple(int(s) for s in feat_size((h, w)))
        else:
            ph, pw = getattr(module, "patch_size", (1, 1))
            self.size = (h // ph, w // pw)

    def resolve(self, num_tokens: int) -> tuple[int, int]:
        """The (H, W) grid of a sequence of ``num_tokens`` tokens (prefix included)."""
        n = num_tokens - self.num_prefix_tokens
        if self.size is not None and self.size[0] * self.size[1] == n:
            return self.size
        side = math.isqrt(max(n, 0))
        if side * side == n:
            return side, side
        raise RuntimeError(
            f"Mona cannot place {n} patch tokens on a grid (last input grid {self.size}, "
            f"{self.num_prefix_tokens} prefix tokens); token dropping (patch_drop_rate) is not supported with Mona"
        )


# ============================================================================ adapted timm blocks


# Each forward mirrors timm's own and inserts the two adapters; the zero-up-projection test pins the equality.


def _vit_forward(
    self: Any, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    grid, p = self.mona_grid.resolve(x.shape[1]), self.mona_grid.num_prefix_tokens
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
    x = self.mona1(x, grid, p)
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    return self.mona2(x, grid, p)


def _eva_forward(
    self: Any, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    grid, p = self.mona_grid.resolve(x.shape[1]), self.mona_grid.num_prefix_tokens
    x_attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
    if self.gamma_1 is not None:
        x_attn = self.gamma_1 * x_attn
    x = self.mona1(x + self.drop_path1(x_attn), grid, p)
    x_mlp = self.mlp(self.norm2(x))
    if self.gamma_2 is not None:
        x_mlp = self.gamma_2 * x_mlp
    return self.mona2(x + self.drop_path2(x_mlp), grid, p)


def _swin_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    x = self.mona1(x + self.drop_path1(self._attn(self.norm1(x))))
    x = x.reshape(b, -1, c)
    x = x + self.drop_path2(self.mlp(self.norm2(x)))
    return self.mona2(x.reshape(b, h, w, c))


def _swin_v2_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    x = self.mona1(x + self.drop_path1(self.norm1(self._attn(x))))  # Swin V2 normalises after the branch
    x = x.reshape(b, -1, c)
    x = x + self.drop_path2(self.norm2(self.mlp(x)))
    return self.mona2(x.reshape(b, h, w, c))


# (timm module, block class) -> (name of its Mona subclass, forward with adapters, works on a token sequence)
_BLOCK_KINDS = {
    ("timm.models.vision_transformer", "Block"): ("MonaViTBlock", _vit_forward, True),
    ("timm.models.eva", "EvaBlock"): ("MonaEvaBlock", _eva_forward, True),
    ("timm.models.swin_transformer", "SwinTransformerBlock"): ("MonaSwinBlock", _swin_forward, False),
    ("timm.models.swin_transformer_v2", "SwinTransformerV2Block"): ("MonaSwinV2Block", _swin_v2_forward, False),
}


class MonaBlock:
    """Mixin of adapted timm blocks: ``mona1`` (after attention), ``mona2`` (after the MLP), and the
    :class:`PatchGrid` of token models (None for Swin, whose blocks see (B, H, W, C) maps)."""

    mona1: Mona
    mona2: Mona
    mona_grid: PatchGrid | None
    mona_tokens: bool = True


_TABLE: dict[type, type] = {}


def block_table() -> dict[type, type]:
    """Supported timm block class -> its Mona subclass.

    Built on first use so that importing visiontune (config validation, ``list methods``) does not pay
    timm's import time. The subclasses get module-level names here so adapted models pickle.
    """
    if not _TABLE:
        import importlib

        for (module, cls_name), (name, forward, tokens) in _BLOCK_KINDS.items():
            base = getattr(importlib.import_module(module), cls_name)
            sub = type(name, (base, MonaBlock), {
                "forward": forward, "mona_tokens": tokens, "__module__": __name__, "__qualname__": name,
                "__doc__": f"timm {cls_name} with Mona adapters after the attention and the MLP residuals.",
            })
            globals()[name] = sub
            _TABLE[base] = sub
    return _TABLE


def __getattr__(name: str) -> Any:
    # Unpickling an adapted model looks its block classes up here, possibly before anything built them.
    if any(name == kind[0] for kind in _BLOCK_KINDS.values()):
        block_table()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def mona_blocks(model: nn.Module) -> list[nn.Module]:
    """Supported transformer blocks of ``model`` in forward order (module registration order)."""
    table = block_table()
    return [m for m in model.modules() if type(m) in table]


def _block_dim(block: nn.Module) -> int:
    norm = getattr(block, "norm1", None)
    shape = getattr(norm, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    return int(block.attn.proj.out_features)


# ============================================================================ the method


@dataclass
class MonaConfig(MethodConfig):
    """Options of Mona adapters."""

    name: str = "mona"
    inner_dim: int = field(default=64, metadata={"help": "adapter bottleneck width d (paper: 64)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout before the up-projection (paper: 0.1)"})
    blocks: str = field(
        default="all",
        metadata={"help": "blocks that get adapters: all, last:N, first:N, or indices and inclusive ranges such as "
                          "0-3,10,11 (depth order; Swin blocks counted across stages)"},
    )
    # Default "zero": the authors' random up-projection perturbs a frozen DINOv2-S enough at step 0 to drop
    # its linear-probe CV accuracy on ELPV from 0.46 to 0.36, and a 10-epoch few-shot run then collapsed to
    # 28% test accuracy (49.7% with zero); starting as the identity, like LoRA's B=0, keeps the pretrained
    # function and the LP-FT head intact. "paper" remains available for large-data runs.
    init: Literal["paper", "zero"] = field(
        default="zero",
        metadata={"help": "zero: the authors' init but with a zero up-projection, so training starts exactly at the "
                          "pretrained network; paper: the authors' init (trunc-normal 0.02 linears, gamma=1e-6)"},
    )
    prefix_tokens: Literal["skip_conv", "bypass"] = field(
        default="skip_conv",
        metadata={"help": "class/register tokens of ViTs: skip_conv = all per-token steps but no spatial convs; "
                          "bypass = left unchanged by the adapters"},
    )

    def problems(self) -> list[str]:
        out = []
        if not isinstance(self.inner_dim, int) or self.inner_dim < 1:
            out.append(f"method.inner_dim={self.inner_dim!r} must be an integer >= 1 (paper: 64)")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            out.append(f"method.dropout={self.dropout!r} must be in [0, 1) (paper: 0.1)")
        out.extend(block_spec_problems(self.blocks))
        return out


@register_method("mona")
class MonaMethod(Method):
    """Mona adapters after attention and after the MLP of every chosen block; backbone frozen."""

    config_cls = MonaConfig
    # Adapter-style lr for short few-shot schedules; gamma/gamma_x/norms/biases get no weight decay (base class).
    default_lr = 1e-3
    default_head_lr = 1e-3
    summary = "multi-cognitive visual adapters (depthwise multi-scale convs) after attention and MLP"
    cfg: MonaConfig

    @classmethod
    def check_config(cls, cfg: MethodConfig, sections: dict[str, Any]) -> list[str]:
        """Refuse timm architectures without ViT / Eva / Swin blocks before any model is built."""
        name = str(getattr(sections.get("backbone"), "name", "") or "")
        import timm
        from timm.models import is_model_in_modules, split_model_name_tag

        arch = split_model_name_tag(name)[0]
        if name in BACKBONES or not timm.is_model(arch) or is_model_in_modules(arch, list(SUPPORTED_TIMM_MODULES)):
            return []  # registered and hub-prefixed models are checked structurally in apply()
        family = timm.models.model_entrypoint(arch).__module__.rsplit(".", 1)[-1]
        return [
            f"method.name=mona does not support backbone.name={name!r} (timm family {family!r}, no transformer "
            f"blocks Mona knows); Mona supports {SUPPORTED_FAMILIES}. Use a supported backbone, or "
            "method.name=lora / full / linear for this one"
        ]

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze ``model``, insert two Mona adapters into each chosen block, keep the head trainable.

        Raises:
            ConfigError: the model has no supported blocks, already has Mona, or ``blocks`` is out of range.
        """
        if any(isinstance(m, MonaBlock) for m in model.modules()):
            raise ConfigError(f"this {type(model).__name__} already has Mona adapters; apply mona to a fresh backbone")
        blocks = mona_blocks(model)
        if not blocks:
            raise ConfigError(
                f"method.name=mona found no transformer block it can adapt in {type(model).__name__}; Mona supports "
                f"{SUPPORTED_FAMILIES}. Use a supported backbone, or method.name=lora / full / linear"
            )
        chosen = parse_blocks(self.cfg.blocks, len(blocks))
        freeze(model)
        table = block_table()
        grid: PatchGrid | None = None
        if any(table[type(blocks[i])].mona_tokens for i in chosen):
            # One recorder per model, shared by its blocks: the grid is a property of the input image.
            grid = PatchGrid(getattr(model, "num_prefix_tokens", 0))
            patch_embed = getattr(model, "patch_embed", None)
            if isinstance(patch_embed, nn.Module):
                patch_embed.register_forward_pre_hook(grid)
        for i in chosen:
            block = blocks[i]
            ref = next(block.parameters())
            dim = _block_dim(block)
            block.__class__ = table[type(block)]
            for slot in ("mona1", "mona2"):
                setattr(block, slot, Mona(
                    dim, self.cfg.inner_dim, self.cfg.dropout, self.cfg.prefix_tokens, self.cfg.init,
                    device=ref.device, dtype=ref.dtype,
                ))
            block.mona_grid = grid if block.mona_tokens else None
        for p in classifier_of(model).parameters():
            p.requires_grad_(True)
        return model

    def describe(self) -> str:
        blocks = self.cfg.blocks
        extra = "" if self.cfg.init == "paper" else f" init={self.cfg.init}"
        return f"mona d{self.cfg.inner_dim}" + ("" if blocks == "all" else f" blocks {blocks}") + extra


def adapters(model: nn.Module) -> list[Mona]:
    """Every Mona adapter inserted in ``model``, in forward order."""
    return [m for m in model.modules() if isinstance(m, Mona)]
