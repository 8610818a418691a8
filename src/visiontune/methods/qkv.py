"""Split timm's fused ``qkv`` Linear into separate q, k and v Linears (and fuse them back).

timm computes queries, keys and values of a ViT/Swin/EVA attention with one ``nn.Linear(dim, 3 * dim)``
whose output channels are laid out ``[q | k | v]``. A LoRA adapter on that fused layer adapts all
three projections at once, so the ``q_proj``-only setting of the DINOv3 study (and LoRA's classic
``q, v``) cannot be expressed. :func:`split_qkv` replaces the fused layer by :class:`SplitQKV`, a
module holding three Linears whose concatenated outputs are the fused layer's output, so the
attention's own forward (fused SDPA, qk-norm, RoPE, register tokens, layer-scale: everything after
``self.qkv(x)``) runs unchanged. :func:`fuse_qkv` undoes it after adapters are merged, giving back a
plain timm model for zero-overhead inference.

Written by hand because neither timm nor peft offers it (peft can only target the fused module).

Only attention classes known to call ``self.qkv(x)`` with the ``[q | k | v]`` layout are split;
others (Swin-V2, BEiT: they call ``F.linear`` on ``qkv.weight`` directly, which a replacement module
would silently bypass) are left fused and reported by :func:`qkv_split_blocker`.

peft, and :mod:`visiontune.methods.lean_lora` that builds on it, are imported inside the forward helpers:
importing peft pulls in transformers and accelerate (seconds at every ``visiontune`` start), and splitting
q/k/v or running a model without LoRA layers never needs them.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn


class SplitQKV(nn.Module):
    """Drop-in replacement of a fused ``qkv`` Linear: three Linears, outputs concatenated ``[q | k | v]``.

    Args:
        q: query projection.
        k: key projection.
        v: value projection.
    """

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module, fused_weight: torch.Tensor | None = None):
        super().__init__()
        self.q = q
        self.k = k
        self.v = v
        # Not a parameter or buffer: the storage the parts' weights are views of, when they are (see _split_one).
        self._fused_weight = fused_weight

    @property
    def in_features(self) -> int:
        return int(_base(self.q).in_features)

    @property
    def out_features(self) -> int:
        return int(_base(self.q).out_features + _base(self.k).out_features + _base(self.v).out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = (self.q, self.k, self.v)
        bases = _fusable_bases(parts)
        if bases is None:
            if self._fused_weight is not None and not self._aliased():
                self._fused_weight = None  # the parts were replaced (e.g. quantized): free the float weight
            return _per_part_forward(x, parts)
        weight = self._shared_weight(bases)
        return _fused_forward(x, parts, bases, weight)

    def _aliased(self) -> bool:
        """Whether some part's weight still lives in the storage of ``_fused_weight``."""
        storage = self._fused_weight.untyped_storage().data_ptr()
        for part in (self.q, self.k, self.v):
            w = getattr(_base(part), "weight", None)
            if isinstance(w, torch.Tensor) and w.device == self._fused_weight.device:
                if w.untyped_storage().data_ptr() == storage:
                    return True
        return False

    def _shared_weight(self, bases: list[nn.Linear]) -> torch.Tensor:
        """The ``[q | k | v]`` weight: the shared storage while the parts are still views of it, else a copy.

        A merge that assigns new data (peft's DoRA merge), ``.to()``, or loading other tensors breaks the
        sharing; the reference is then dropped for good and the weights are concatenated per call. Trainable
        weights (ExPLoRA's unfrozen blocks) are always concatenated, so their gradients reach the parts.
        """
        fused = self._fused_weight
        if fused is not None:
            offset, size = fused.data_ptr(), fused.element_size()
            for b in bases:
                w = b.weight
                if w.requires_grad or w.dtype != fused.dtype or w.device != fused.device or w.data_ptr() != offset:
                    break
                if not w.is_contiguous():
                    break
                offset += w.numel() * size
            else:
                if offset == fused.data_ptr() + fused.numel() * size:
                    return fused
            if not any(b.weight.requires_grad for b in bases):
                self._fused_weight = None
        return torch.cat([b.weight for b in bases])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} (q|k|v)"


def _fusable_bases(parts: tuple[nn.Module, ...]) -> list[nn.Linear] | None:
    """The three plain ``nn.Linear`` layers under ``parts`` when one fused GEMM may replace three, else None.

    Allowed: each part a plain ``nn.Linear`` or a peft LoRA/DoRA ``Linear`` over one, adapters enabled
    (peft unmerges a merged layer when adapters are disabled, so that mode runs the parts themselves),
    without forward hooks (a hook expects its module's own call). Anything else (4-bit layers, other
    tuners, hooks) takes the per-part path.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear  # heavy: see the module docstring

    bases = []
    for part in parts:
        if type(part) is nn.Linear:
            base = part
        elif isinstance(part, LoraLinear):
            base = part.get_base_layer()
            if type(base) is not nn.Linear or part._forward_hooks or part._forward_pre_hooks or part.disable_adapters:
                return None
        else:
            return None
        if base._forward_hooks or base._forward_pre_hooks:
            return None
        bases.append(base)
    return bases


def _fused_forward(
    x: torch.Tensor, parts: tuple[nn.Module, ...], bases: list[nn.Linear], weight: torch.Tensor
) -> torch.Tensor:
    """``cat(q(x), k(x), v(x))`` with one GEMM on the concatenated frozen weights, adapters added per part.

    Same function as calling the parts (peft's ``lora.Linear.forward``: base output, then for every active
    adapter ``+ B(A(dropout(x))) * scaling``, or the DoRA variant's rescaling), but the base projection is
    one ``(dim -> 3 dim)`` matmul instead of three ``(dim -> dim)`` ones plus a concatenation: fewer,
    larger GEMMs forward and backward, and LoRA terms accumulate into the fused output in place
    (:func:`visiontune.methods.lean_lora.accumulate`; DoRA parts then rescale their columns in one
    product). ``weight`` is the storage the parts share, or a copy (see :meth:`SplitQKV._shared_weight`).
    """
    from visiontune.methods.lean_lora import lean_terms, rescale  # heavy: see the module docstring

    bias = None
    if any(b.bias is not None for b in bases):
        bias = torch.cat([b.bias if b.bias is not None else b.weight.new_zeros(b.out_features) for b in bases])
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    sizes = [b.out_features for b in bases]
    lean = [([], None) if part is base else lean_terms(part, flat) for part, base in zip(parts, bases)]
    if all(item is not None for item in lean):
        scales = [scale for _, scale in lean]
        dora = any(scale is not None for scale in scales)
        out = F.linear(flat, weight, None if dora else bias)
        _accumulate_parts(out, sizes, [terms for terms, _ in lean], flat)
        if dora:  # one product over the fused output: DoRA parts' scales, ones for the others
            scale = torch.cat([s if s is not None else out.new_ones(n) for s, n in zip(scales, sizes)])
            out = rescale(out, scale, bias)
        return out.view(*lead, out.shape[-1])
    # Some part needs peft's own semantics (e.g. DoRA with dropout recomputes the base): build each part's
    # output in order from its slice of the fused base output, exactly as peft's forward does.
    out = F.linear(flat, weight, bias)
    pieces = list(out.view(*lead, out.shape[-1]).split(sizes, dim=-1))
    for i, (part, base) in enumerate(zip(parts, bases)):
        if part is base:
            continue
        for name in part.active_adapters if not part.merged else ():
            if name not in part.lora_A.keys():
                continue
            xi = part._cast_input_dtype(x, part.lora_A[name].weight.dtype)
            if name in part.lora_variant:
                pieces[i] = part.lora_variant[name].forward(part, active_adapter=name, x=xi, result=pieces[i])
            else:
                term = part.lora_B[name](part.lora_A[name](part.lora_dropout[name](xi))) * part.scaling[name]
                pieces[i] = pieces[i] + term.to(pieces[i].dtype)
    return torch.cat(pieces, dim=-1)


def _per_part_forward(x: torch.Tensor, parts: tuple[nn.Module, ...]) -> torch.Tensor:
    """``cat(q(x), k(x), v(x))`` when the parts cannot share one GEMM (e.g. 4-bit layers for QLoRA).

    Parts with only plain LoRA adapters run their base layer, and their adapter products are accumulated
    into the concatenated output in place (as :func:`_fused_forward` does) instead of peft's out-of-place
    sum per part (for 4-bit layers peft also clones the base output). Anything else calls the part.
    """
    from peft.tuners.lora import LoraLayer  # heavy: see the module docstring

    from visiontune.methods.lean_lora import lean_terms  # heavy: see the module docstring

    flat = x.reshape(-1, x.shape[-1])
    lean = [lean_terms(p, flat, any_base=True) if isinstance(p, LoraLayer) else None for p in parts]
    terms = [item[0] if item is not None and item[1] is None else None for item in lean]  # plain LoRA only
    outs = [p.get_base_layer()(x) if t is not None else p(x) for p, t in zip(parts, terms)]
    if any(o.dtype != x.dtype for o, t in zip(outs, terms) if t is not None):  # a base that casts: peft's path
        return torch.cat([p(x) for p in parts], dim=-1)
    out = torch.cat(outs, dim=-1)
    _accumulate_parts(out.view(-1, out.shape[-1]), [o.shape[-1] for o in outs], terms, flat)
    return out


def _accumulate_parts(out: torch.Tensor, sizes: list[int], terms: list, x: torch.Tensor) -> None:
    """Add each part's plain-LoRA terms into its column block of the 2-d output ``out``, in place."""
    from visiontune.methods.lean_lora import accumulate  # heavy: see the module docstring

    start = 0
    for size, t in zip(sizes, terms):
        if t:
            accumulate(out.narrow(1, start, size), t, x)
        start += size


def _base(module: nn.Module) -> nn.Module:
    """The plain layer under a peft adapter wrapper (or the module itself)."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def _attention_classes() -> dict[type, str]:
    """timm attention classes whose forward calls ``self.qkv(x)`` and reads ``[q | k | v]``, by class."""
    found: dict[type, str] = {}
    try:
        from timm.layers.attention import Attention

        found[Attention] = "vit"
    except ImportError:  # pragma: no cover - very old timm
        pass
    try:
        from timm.layers.attention import AttentionRope

        found[AttentionRope] = "rope"
    except ImportError:  # pragma: no cover - timm without AttentionRope
        pass
    try:
        from timm.models.eva import EvaAttention

        found[EvaAttention] = "eva"
    except ImportError:  # pragma: no cover
        pass
    try:
        from timm.models.swin_transformer import WindowAttention

        found[WindowAttention] = "swin"
    except ImportError:  # pragma: no cover
        pass
    return found


def qkv_split_blocker(attn: nn.Module) -> str | None:
    """Why the fused ``attn.qkv`` of this attention module cannot be split, or None when it can.

    Args:
        attn: the module owning a ``qkv`` attribute (e.g. ``model.blocks[0].attn``).
    """
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, SplitQKV):
        return None
    if type(qkv) is not nn.Linear:
        return f"{type(attn).__name__}.qkv is {type(qkv).__name__}, not a plain nn.Linear"
    kind = _attention_classes().get(type(attn))
    if kind is None:
        return (
            f"{type(attn).__module__}.{type(attn).__name__} is not a known timm attention that calls self.qkv(x) "
            "(its forward may read qkv.weight directly, which would bypass an adapter)"
        )
    if qkv.out_features % 3:
        return f"{type(attn).__name__}.qkv has {qkv.out_features} outputs, not 3 equal parts"
    # EVA with q_bias/v_bias calls F.linear(x, qkv.weight, bias): split_qkv folds those biases into the
    # parts and clears them, which sends EVA down its `self.qkv(x)` path, so it is splittable too.
    return None


def _split_one(attn: nn.Module) -> None:
    fused: nn.Linear = attn.qkv
    w = fused.weight.detach()
    d = fused.out_features // 3
    bias = None if fused.bias is None else fused.bias.detach()
    # EVA keeps q/v biases outside the Linear (q_bias, k_bias, v_bias) and calls F.linear(x, qkv.weight, bias)
    # when they exist. Folding them into the split Linears and clearing them makes EVA take its
    # `self.qkv(x)` path, with identical outputs.
    separate = getattr(attn, "q_bias", None) is not None
    if separate:
        extra = torch.cat((attn.q_bias.detach(), attn.k_bias.detach(), attn.v_bias.detach()))
        bias = extra if bias is None else bias + extra
    parts = []
    w = w.contiguous()
    for i in range(3):
        lin = nn.Linear(fused.in_features, d, bias=bias is not None, device="meta", dtype=w.dtype)
        # The parts' weights are views of the fused weight (no copy): the fused GEMM of
        # :func:`_fused_forward` can then use that one tensor as long as nothing has replaced them.
        lin.weight = nn.Parameter(w[i * d : (i + 1) * d], requires_grad=fused.weight.requires_grad)
        if bias is not None:
            lin.bias = nn.Parameter(bias[i * d : (i + 1) * d].clone())
        if lin.bias is not None:
            lin.bias.requires_grad_(fused.bias.requires_grad if fused.bias is not None else attn.q_bias.requires_grad)
        parts.append(lin)
    if separate:
        for name in ("q_bias", "k_bias", "v_bias"):
            if name in attn._parameters:
                del attn._parameters[name]
            if name in attn._buffers:
                del attn._buffers[name]
            setattr(attn, name, None)
    attn.qkv = SplitQKV(*parts, fused_weight=w)


def split_qkv(model: nn.Module) -> list[str]:
    """Replace every splittable fused ``qkv`` Linear of ``model`` by a :class:`SplitQKV`, in place.

    The split is exact: each part holds a copy of its rows of the fused weight (and bias), so the
    attention output is bit-for-bit the concatenation it was (up to matmul blocking, ~1e-7). Already
    split modules are left alone, so calling it twice is harmless.

    Args:
        model: a timm model.

    Returns:
        Names of the modules that are now :class:`SplitQKV` (e.g. ``blocks.0.attn.qkv``).
    """
    done = []
    for name, module in list(model.named_modules()):
        qkv = getattr(module, "qkv", None)
        if isinstance(qkv, SplitQKV):
            done.append(f"{name}.qkv" if name else "qkv")
            continue
        if qkv is None or not isinstance(qkv, nn.Linear):
            continue
        if qkv_split_blocker(module) is None:
            _split_one(module)
            done.append(f"{name}.qkv" if name else "qkv")
    return done


def unsplittable_qkv(model: nn.Module) -> dict[str, str]:
    """Fused ``qkv`` Linears that :func:`split_qkv` leaves alone, with the reason, by module name."""
    out = {}
    for name, module in model.named_modules():
        qkv = getattr(module, "qkv", None)
        if isinstance(qkv, nn.Linear):
            reason = qkv_split_blocker(module)
            if reason is not None:
                out[f"{name}.qkv" if name else "qkv"] = reason
    return out


def _forward_reads_qkv_weight(attn: nn.Module) -> bool:
    try:
        src = inspect.getsource(type(attn).forward)
    except (OSError, TypeError):  # no source (compiled / dynamically created class): assume the worst
        return True
    return "self.qkv.weight" in src


def bypassed_qkv(model: nn.Module) -> dict[str, str]:
    """Fused ``qkv`` Linears (left unsplit) whose attention reads ``qkv.weight`` directly.

    An adapter wrapping such a layer would never run (the forward calls ``F.linear`` on the weight),
    so target resolution leaves them out. Returns ``{module name: reason}``.
    """
    return {
        name: f"{reason}; its forward reads self.qkv.weight, so an adapter there would never run"
        for name, reason in unsplittable_qkv(model).items()
        if _forward_reads_qkv_weight(model.get_submodule(name.rpartition(".")[0]) if "." in name else model)
    }


def fuse_qkv(model: nn.Module) -> int:
    """Turn every :class:`SplitQKV` whose parts are plain Linears back into one fused ``nn.Linear``.

    Parts still wrapped by adapters (unmerged LoRA) are left split. EVA attention keeps its biases in
    the fused Linear (its ``q_bias`` stays None), which computes the same thing.

    Returns:
        How many modules were fused.
    """
    count = 0
    for module in list(model.modules()):
        split = getattr(module, "qkv", None)
        if not isinstance(split, SplitQKV):
            continue
        parts = (split.q, split.k, split.v)
        if any(type(p) is not nn.Linear for p in parts):
            continue
        has_bias = any(p.bias is not None for p in parts)
        w = torch.cat([p.weight.detach() for p in parts])
        fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            fused.weight.copy_(w)
            if has_bias:
                fused.bias.copy_(
                    torch.cat([p.bias.detach() if p.bias is not None else torch.zeros_like(p.weight[:, 0]) for p in parts])
                )
        fused.requires_grad_(any(p.weight.requires_grad for p in parts))
        module.qkv = fused
        count += 1
    return count
