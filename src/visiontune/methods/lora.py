"""LoRA, DoRA, QLoRA and QDoRA on any timm backbone, with peft's layers and bitsandbytes' NF4.

* ``lora``  - low-rank update ``W + (alpha/r) B A`` on the chosen layers (Hu et al., ICLR'22,
  https://arxiv.org/abs/2106.09685).
* ``dora``  - weight-decomposed LoRA: a trained per-row magnitude times the LoRA-updated direction
  (Liu et al., ICML'24, https://arxiv.org/abs/2402.09353); peft's ``use_dora=True``.
* ``qlora`` - LoRA over a frozen backbone whose Linears are stored in 4-bit NormalFloat (NF4), with
  optional double quantization of the block scales (Dettmers et al., NeurIPS'23,
  https://arxiv.org/abs/2305.14314); bitsandbytes ``Linear4bit``. The head stays full precision.
* ``qdora`` - DoRA over the same NF4 backbone.

What is written here and why: peft supplies the adapter layers, merging and the 4-bit LoRA layer,
bitsandbytes the NF4 kernels. Written by hand: target resolution (:mod:`visiontune.methods.targets`,
the study's ``q_proj`` / ``all-linear`` on timm module names), the fused-qkv split
(:mod:`visiontune.methods.qkv`), swapping timm Linears for ``Linear4bit`` (:mod:`visiontune.methods.nf4`;
transformers does that for HF models only), and merging a 4-bit model into a full-precision copy. Adapters are injected in
place with ``peft.inject_adapter_in_model``, so the returned object is still the timm model:
``get_classifier``, ``forward_features``, ``forward_head``, ``pretrained_cfg`` and
``set_grad_checkpointing`` keep working and adapter parameter names are plain module paths
(``blocks.0.attn.qkv.q.lora_A.default.weight``).

Defaults, chosen from how the update scales rather than from one dataset:

* ``rank=8``, ``targets=qv``: the LoRA paper's best budget use on attention (query + value), also
  peft's ViT example; ``all-linear`` (the study's best at rank 16-64) is one option away.
* ``alpha=None`` resolves to ``2 * sqrt(8 * rank)``, i.e. the common ``alpha = 16`` at rank 8 (scale
  ``alpha / r = 2``) carried to other ranks with rank-stabilised scaling ``alpha / r ~ 1 / sqrt(r)``
  (Kalajdzievski 2023, rsLoRA, https://arxiv.org/abs/2312.03732): with Adam, ``alpha / r`` scaling
  (fixed alpha) makes high ranks learn slower and a constant scale (alpha = 2r) makes them learn faster,
  while ``1 / sqrt(r)`` keeps the size of the update independent of the rank, so one learning rate serves
  the study's grid of ranks 8, 16 and 64. Rank 16 gets alpha 22.6, rank 64 gets 45.3. An explicit
  ``method.alpha`` is used as given.
* ``lr = 1e-3`` for adapters and ``head_lr = 1e-3``: ``B`` starts at zero and the head is fresh, so
  both start from nothing and need a "from scratch" step size for AdamW; the frozen backbone is
  not touched, so the small rates full fine-tuning needs to protect pretrained weights (3e-5) do not
  apply. The same rate for both keeps the comparison with the linear probe / full fine-tuning about
  the method, not the schedule. DoRA magnitudes are 1-d, so the loop exempts them from weight decay.
* ``dropout = 0``: augmentation and weight decay already regularise; LoRA dropout also makes peft's
  DoRA recompute the base projection in training (about 2x its cost). Set ``method.dropout=0.1`` for
  very small sets.
* QLoRA: NF4 with double quantization (the QLoRA paper's setting); compute dtype ``auto`` = float32
  on CPU (bf16 is emulated and slow there) and bfloat16 on CUDA, decided at the first forward from
  the input's device so the same run config works on both.

Why just over 500 lines: the four methods share one configuration, target resolution and save/load path
(the NF4 layers moved to :mod:`visiontune.methods.nf4`).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from visiontune.config import MethodConfig
from visiontune.errors import WeightsError
from visiontune.methods.base import Method, classifier_of, freeze, register_method, shared_copy
from visiontune.methods.nf4 import (  # backbone_bytes, quantize_linears: also imported from here by callers
    NF4_BLOCKS, backbone_bytes, dequantize_linears, is_4bit, nf4_blocksize, quantize_linears,
)
from visiontune.methods.qkv import fuse_qkv, split_qkv
from visiontune.methods.targets import PRESETS, block_spec_problems, resolve_targets, target_problems

ADAPTER = "default"  # peft adapter name; one adapter per model (the multi-adapter host keeps one model per task)


def default_alpha(rank: int) -> float:
    """``2 * sqrt(8 * rank)``: alpha 16 at rank 8, rank-stabilised (scale ~ 1/sqrt(r)) elsewhere."""
    return 2.0 * math.sqrt(8.0 * rank)


# ----------------------------------------------------------------------------- configs


@dataclass
class LoraConfig(MethodConfig):
    """Options of LoRA (also the base of DoRA, QLoRA and QDoRA)."""

    name: str = "lora"
    rank: int = field(default=8, metadata={"help": "rank r of the low-rank update"})
    alpha: float | None = field(
        default=None, metadata={"help": "scale numerator (update = alpha/r * B A); null = 2*sqrt(8*rank): 16 at r=8"}
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input during training"})
    targets: list[str] = field(
        default_factory=lambda: ["qv"],
        metadata={"help": f"presets ({', '.join(PRESETS)}) and/or module-name regexes"},
    )
    blocks: str = field(default="all", metadata={"help": "blocks that get adapters: all, last:N, first:N, or 0-3,10,11"})

    # peft builds an adapter of any rank >= 1 (see problems()) on any Linear / ungrouped conv: a rank, alpha or
    # dropout grid never changes which cells can run, so a dry run checks one per targets/blocks setting.
    size_only_fields: ClassVar[tuple[str, ...]] = ("rank", "alpha", "dropout")

    def problems(self) -> list[str]:
        out = []
        if not isinstance(self.rank, int) or self.rank < 1:
            out.append(f"method.rank={self.rank} must be an integer >= 1")
        if self.alpha is not None and self.alpha <= 0:
            out.append(f"method.alpha={self.alpha} must be > 0 (or null for 2*sqrt(8*rank))")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"method.dropout={self.dropout} must be in [0, 1)")
        out.extend(target_problems(list(self.targets or [])))
        out.extend(block_spec_problems(self.blocks))
        return out


@dataclass
class DoraConfig(LoraConfig):
    """Options of DoRA (same as LoRA)."""

    name: str = "dora"


@dataclass
class QLoraConfig(LoraConfig):
    """Options of QLoRA: LoRA's plus how the frozen Linears are quantized."""

    name: str = "qlora"
    quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type of the frozen Linears"})
    double_quant: bool = field(default=True, metadata={"help": "quantize the per-block scales too (saves ~0.4 bit/weight)"})
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "dtype the 4-bit weights are dequantized to; auto = fp32 on CPU, bf16 on CUDA"}
    )


@dataclass
class QDoraConfig(QLoraConfig):
    """Options of QDoRA (same as QLoRA)."""

    name: str = "qdora"


# ----------------------------------------------------------------------------- 4-bit helpers

# ----------------------------------------------------------------------------- adapter helpers


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every peft LoRA/DoRA layer in ``model``."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def merge_adapters(model: nn.Module) -> None:
    """Fold every LoRA/DoRA update into its base weight in place (undo with :func:`unmerge_adapters`).

    Raises:
        ValueError: on a 4-bit model: folding into NF4 re-quantizes ``W + dW`` and the rounding
            (about as large as the update itself) would destroy it; use ``Method.merge`` instead,
            which merges into a full-precision copy.
    """
    for name, layer in lora_layers(model):
        if is_4bit(layer.get_base_layer()):
            raise ValueError(
                f"{name} is 4-bit: merging in place would re-quantize the adapter away; use method.merge(model), "
                "which returns a full-precision merged copy"
            )
        layer.merge(safe_merge=True)


def unmerge_adapters(model: nn.Module) -> None:
    """Subtract merged LoRA/DoRA updates again (inverse of :func:`merge_adapters`, up to float rounding)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def strip_adapters(model: nn.Module) -> int:
    """Replace every LoRA layer by the layer it wraps (dropping the adapter, merged or not), in place."""
    count = 0
    for name, layer in lora_layers(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer.get_base_layer())
        count += 1
    if "peft_config" in model.__dict__:
        del model.peft_config
    return count


def _private_module(model: nn.Module, name: str) -> None:
    """Give ``model`` its own copy of module ``name`` (its tensors are otherwise shared with another model)."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, copy.deepcopy(getattr(parent, attr)))


def _merged_weight(
    layer: nn.Module, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor | None = None, scaling: float = 1.0,
) -> torch.Tensor | None:
    """The weight of ``layer`` with a LoRA update folded in (DoRA's when ``magnitude`` is given), computed as
    peft's ``merge(safe_merge=True)`` does, or None for a layer or tensors it does not handle.

    ``a`` is lora_A's weight (``[r, in]``, a conv's ``[r, in, kh, kw]``), ``b`` lora_B's (``[out, r]``, a conv's
    ``[out, r, 1, 1]``); the update is ``scaling * B A`` contracted over ``r``, peft's delta for a Linear and
    for an ungrouped conv (its 1x1 product, or the conv of A's transpose with B for larger kernels).
    """
    if type(layer) is nn.Linear:
        pass
    elif type(layer) is nn.Conv2d and layer.groups == 1 and b.dim() == 4 and b.shape[2:] == (1, 1):
        b = b.flatten(1)
    else:
        return None
    w = layer.weight
    if a.shape[1:] != w.shape[1:] or b.shape != (w.shape[0], a.shape[0]) or not w.is_floating_point():
        return None
    delta = torch.einsum("or,r...->o...", b.to(w.dtype), a.to(w.dtype)) * scaling
    out = w + delta
    if magnitude is None:
        return out
    if magnitude.numel() != w.shape[0]:
        return None
    norm = out.flatten(1).norm(p=2, dim=1)  # per output row (conv: channel) of the unmerged W + s B A
    factor = magnitude.reshape(-1).to(w.dtype) / norm
    return factor.view(-1, *[1] * (w.dim() - 1)) * out


# ----------------------------------------------------------------------------- methods


@register_method("lora")
class LoRA(Method):
    """Low-rank adapters on the chosen Linears/convs of a frozen backbone, classifier trained in full."""

    config_cls = LoraConfig
    default_lr = 1e-3
    default_head_lr = 1e-3
    summary = "low-rank update on chosen layers (q, v, all-linear, ...), head trained"
    use_dora = False
    # peft starts B at zero: base output + 0. Not DoRA (its magnitude/direction recomputation rounds), nor a
    # 4-bit base (NF4 weights are not the backbone's).
    starts_as_backbone = True
    quantized = False
    cfg: LoraConfig

    def __init__(self, cfg: LoraConfig):
        super().__init__(cfg)
        self.targeted: list[str] = []
        self._report: dict[str, Any] = {}

    @property
    def alpha(self) -> float:
        """The resolved alpha (``method.alpha`` or the rank-stabilised default)."""
        return float(self.cfg.alpha) if self.cfg.alpha is not None else default_alpha(self.cfg.rank)

    @classmethod
    def check_config(cls, cfg: MethodConfig, sections: dict[str, Any]) -> list[str]:
        out = []
        if cls.quantized:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                out.append(
                    f"method.name={cfg.name} needs bitsandbytes; pip install 'visiontune[quant]' (or bitsandbytes), "
                    "or use method.name=lora/dora"
                )
            optim = sections.get("optim")
            if getattr(optim, "precision", None) == "fp16" and getattr(cfg, "compute_dtype", "auto") == "bf16":
                out.append("optim.precision=fp16 with method.compute_dtype=bf16 mixes two half types; pick one")
            if getattr(sections.get("run"), "parallel", "ddp") == "fsdp":
                # Tried (torch 2.14, bitsandbytes 0.50, CPU): FSDP2 turns each Params4bit into a plain DTensor shard
                # and its quantization state is lost, so the first forward fails ("quant_state is required").
                out.append(f"method.name={cfg.name} with run.parallel=fsdp: FSDP cannot shard bitsandbytes 4-bit weights "
                           "(their quantization state lives outside the tensor it splits); use run.parallel=ddp")
        return out

    # ------------------------------------------------------------------ backbone preparation
    def backbone_key(self) -> str:
        """Identifies what :meth:`prepare_backbone` does, so a multi-adapter host can share prepared backbones."""
        if not self.quantized:
            return "split-qkv"
        c = self.cfg
        return f"split-qkv+{c.quant_type}{'-dq' if c.double_quant else ''}-{c.compute_dtype}"

    def prepare_backbone(self, model: nn.Module, quantize: bool = True) -> nn.Module:
        """Task-independent surgery, idempotent: split fused qkv; for q-methods quantize the frozen Linears.

        Args:
            quantize: False skips the 4-bit step (meta-device validation: bitsandbytes needs real weights).
        """
        self._report["qkv_split"] = len(split_qkv(model))
        if quantize and self.quantized and not getattr(model, "is_loaded_in_4bit", False):
            cfg: QLoraConfig = self.cfg  # type: ignore[assignment]
            before = backbone_bytes(model)
            done = quantize_linears(model, cfg.quant_type, cfg.double_quant, cfg.compute_dtype, self.device)
            after = backbone_bytes(model)
            self._report["quantization"] = {
                "quant_type": cfg.quant_type, "double_quant": cfg.double_quant, "compute_dtype": cfg.compute_dtype,
                "quantized_linears": done.count, "block32_linears": len(done.block32),
                "full_precision_linears": done.kept_full_precision,
                "backbone_mb_before": before / 2**20, "backbone_mb_after": after / 2**20,
                "ratio": after / before if before else None,
            }
            if done.kept_full_precision:
                warnings.warn(
                    f"{self.name}: {len(done.kept_full_precision)} Linear layer(s) stay in full precision because "
                    f"their input width is not a multiple of {NF4_BLOCKS[-1]} (e.g. "
                    f"{next(iter(done.kept_full_precision))}); they are frozen as in QLoRA, only not 4-bit. "
                    "metrics.json lists them under method.quantization.full_precision_linears.",
                    stacklevel=2,
                )
        return model

    # ------------------------------------------------------------------ model surgery
    def _peft_config(self, names: list[str]) -> Any:
        from peft import LoraConfig as PeftLoraConfig  # heavy (transformers): only LoRA runs import it

        from visiontune.methods.lean_lora import use_lean_layers  # imports peft at module level

        return use_lean_layers(
            PeftLoraConfig(
                r=self.cfg.rank, lora_alpha=self.alpha, lora_dropout=self.cfg.dropout, use_dora=self.use_dora,
                bias="none",
                # A full-match regex of exact names: peft's list form would also match name suffixes.
                target_modules="(?:" + "|".join(re.escape(n) for n in names) + ")",
            )
        )

    def _inject(self, model: nn.Module, names: list[str]) -> None:
        from peft import inject_adapter_in_model

        with warnings.catch_warnings():
            # peft warns that a non-transformers model has no config / tied embeddings: irrelevant for timm.
            warnings.filterwarnings("ignore", message=".*(tie_word_embeddings|model config|Unsupported layer).*")
            inject_adapter_in_model(self._peft_config(names), model, adapter_name=ADAPTER)

    def apply(self, model: nn.Module, quantize: bool = True) -> nn.Module:
        """Split qkv (and quantize), freeze everything, add adapters to the targets, train the classifier.

        Args:
            quantize: False leaves a q-method's Linears in full precision (see :meth:`apply_on_meta`).

        Returns:
            The same timm model object, with peft LoRA/DoRA layers injected in place.
        """
        names = self._prepare_and_resolve(model, quantize)
        freeze(model)
        self._inject(model, names)
        for p in classifier_of(model).parameters():
            p.requires_grad_(True)
        return model

    def _prepare_and_resolve(self, model: nn.Module, quantize: bool = True) -> list[str]:
        """:meth:`prepare_backbone`, then the names of the modules that get adapters (recorded for :meth:`report`)."""
        model_name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        self.prepare_backbone(model, quantize=quantize)
        names = resolve_targets(model, list(self.cfg.targets), self.cfg.blocks, model_name)
        self.targeted = names
        self._report.update(
            adapted_modules=len(names), rank=self.cfg.rank, alpha=self.alpha, scaling=self.alpha / self.cfg.rank,
            dora=self.use_dora, targets=list(self.cfg.targets), blocks=self.cfg.blocks,
        )
        return names

    def apply_on_meta(self, model: nn.Module) -> list[str]:
        """Everything :meth:`apply` does on a meta-device backbone except 4-bit quantization.

        bitsandbytes quantizes real values, and a meta tensor has none; what can fail on a given architecture
        is elsewhere anyway: the qkv split, target resolution and peft's injection, which run here on the
        full-precision layers the 4-bit ones would replace (``Linear4bit`` is an ``nn.Linear``, so the same
        modules are targeted). The note says what was skipped and which Linears would stay full precision.
        """
        self.apply(model, quantize=False)
        if not self.quantized:
            return []
        head = {id(m) for m in classifier_of(model).modules()}
        kept = [n for n, m in model.named_modules()
                if type(m) is nn.Linear and id(m) not in head and nf4_blocksize(m.in_features) is None and ".lora_" not in n]
        note = f"{self.name}: 4-bit quantization not run on the meta device (bitsandbytes needs real weights)"
        if kept:
            note += (f"; {len(kept)} Linear(s) will stay full precision, input width not a multiple of "
                     f"{NF4_BLOCKS[-1]} (e.g. {kept[0]})")
        return [note]

    # ------------------------------------------------------------------ inference
    def merge(self, model: nn.Module) -> nn.Module:
        """A plain timm model with the adapters folded in and q/k/v fused again: zero inference overhead.

        ``model`` itself is left untouched (it can keep training, be saved, or be unmerged-compared);
        the copy shares every tensor it does not change. For 4-bit backbones the copy is full
        precision (float32): its Linears hold the dequantized NF4 weights plus the adapter update.
        Folding into 4-bit instead would re-quantize ``W + dW``, and NF4's rounding step is as large as
        a typical low-rank update, so most of what was trained would be lost. Outputs match the
        unmerged model to ~1e-5 (float32 rounding of a different summation order).
        """
        layers = lora_layers(model)
        if not layers:
            return model
        # peft's injection below freezes every non-adapter parameter it sees, and the copy shares the
        # source's parameters (the head): remember the flags to give them back.
        flags = [(p, p.requires_grad) for p in model.parameters()]
        names = [n for n, _ in layers]
        state = {k: v for k, v in self.trainable_state_dict(model).items() if ".lora_" in k}
        out = shared_copy(model)
        strip_adapters(out)
        if getattr(out, "is_loaded_in_4bit", False):
            dequantize_linears(out)
        source = {id(t) for t in model.parameters()}
        for n in names:
            if any(id(p) in source for p in out.get_submodule(n).parameters()):
                _private_module(out, n)  # merging writes into these weights; the source model must not see it
        devices = [d for d in {p.device for p in out.parameters()} if d.type == "cuda"]
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            self._inject(out, names)  # fresh (float) LoRA layers on the same names; init is overwritten below
            params = dict(out.named_parameters())
            missing = [k for k in state if k not in params]
            if missing:
                raise RuntimeError(f"merge could not place adapter tensors {missing[:3]}; this is a visiontune bug")
            for k, v in state.items():
                params[k].copy_(v)
            merge_adapters(out)
            strip_adapters(out)
            fuse_qkv(out)
        for p in out.parameters():
            p.requires_grad_(False)
        for p, flag in flags:
            p.requires_grad_(flag)
        return out.train(model.training)

    def load_merged(self, backbone: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module | None:
        """:meth:`merge`'s result built from a saved adapter without peft: ``W + (alpha/r) B A`` written into each
        adapted layer (DoRA: then each output row scaled to its trained magnitude, ``m / ||W + (alpha/r) B A||``,
        the norm of the unmerged weight as peft takes it), q/k/v fused again.

        The backbone gets the same surgery as in :meth:`apply` (qkv split; for q-methods NF4 quantization with
        bitsandbytes, then dequantized to float32 as :meth:`merge` does), so the weights the update is added to
        are the ones the adapter was trained on. Only plain Linears and ungrouped convs with exactly the
        tensors :meth:`apply` would create are merged here; anything else gives None (peft's path then loads
        the file and names what does not fit).
        """
        names = self._prepare_and_resolve(backbone)
        if getattr(backbone, "is_loaded_in_4bit", False):
            dequantize_linears(backbone)
        parts = ("lora_A", "lora_B", "lora_magnitude_vector") if self.use_dora else ("lora_A", "lora_B")
        adapters = {n: [state.get(f"{n}.{part}.{ADAPTER}.weight") for part in parts] for n in names}
        rest = {k: v for k, v in state.items() if ".lora_" not in k}
        if len(rest) + len(parts) * len(names) != len(state) or any(t is None for ts in adapters.values() for t in ts):
            return None
        freeze(backbone)
        for p in classifier_of(backbone).parameters():
            p.requires_grad_(True)
        try:
            self.load_trainable_state_dict(backbone, rest)  # the head and BatchNorm statistics
        except WeightsError:
            return None
        scaling = self.alpha / self.cfg.rank
        with torch.no_grad():
            for name, tensors in adapters.items():
                layer = backbone.get_submodule(name)
                a, b, *magnitude = tensors
                # The rank must be the config's: the scale alpha/r comes from it, and peft would refuse another.
                merged = _merged_weight(layer, a, b, magnitude[0] if magnitude else None, scaling)
                if merged is None or a.shape[0] != self.cfg.rank:
                    return None
                layer.weight.copy_(merged)
        fuse_qkv(backbone)
        return backbone.requires_grad_(False)

    def report(self) -> dict[str, Any]:
        """Facts for metrics.json: adapted modules, rank/alpha/scale, qkv split count, quantization memory."""
        return dict(self._report)

    def describe(self) -> str:
        c = self.cfg
        text = f"{self.name} r{c.rank} alpha{self.alpha:g} {'+'.join(c.targets)}"
        if c.blocks != "all":
            text += f" blocks {c.blocks}"
        if self.quantized:
            q: QLoraConfig = c  # type: ignore[assignment]
            text += f" {q.quant_type}{'+dq' if q.double_quant else ''}"
        return text


@register_method("dora")
class DoRA(LoRA):
    """Weight-decomposed LoRA: trained magnitude x LoRA-updated direction, on a frozen backbone."""

    starts_as_backbone = False
    config_cls = DoraConfig
    summary = "magnitude + low-rank direction update (DoRA), head trained"
    use_dora = True


@register_method("qlora")
class QLoRA(LoRA):
    """LoRA over a frozen backbone stored in 4-bit NF4 (bitsandbytes), full-precision head."""

    starts_as_backbone = False
    config_cls = QLoraConfig
    summary = "LoRA over a 4-bit NF4 frozen backbone, head trained"
    quantized = True


@register_method("qdora")
class QDoRA(LoRA):
    """DoRA over a frozen backbone stored in 4-bit NF4 (bitsandbytes), full-precision head."""

    starts_as_backbone = False
    config_cls = QDoraConfig
    summary = "DoRA over a 4-bit NF4 frozen backbone, head trained"
    use_dora = True
    quantized = True
