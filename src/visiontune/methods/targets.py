r"""Where adapters go: target presets and block ranges that mean the same on every timm backbone.

Shared by every method that places modules in a backbone (LoRA/DoRA/QLoRA, and any adapter that
needs "which blocks"). A model is read as a list of **blocks** in depth order:

================  =========================================  ============================================
family            blocks                                     what a block holds
================  =========================================  ============================================
ViT / DINOv2/v3   ``blocks.N``                               ``attn`` (``qkv`` split into q/k/v, ``proj``), ``mlp``
Swin              ``layers.S.blocks.N`` (all stages, flat)   ``attn`` (window attention), ``mlp``
ConvNeXt          ``stages.S.blocks.N``                      ``conv_dw`` (depthwise), ``mlp`` (Linear or 1x1 conv)
ResNet            ``layer1 .. layer4`` children              ``conv1 .. conv3``, ``downsample``
================  =========================================  ============================================

Presets (``method.targets``), applied inside the selected blocks:

* ``q``, ``v``, ``qv``, ``qkv``: the query / value / query+value / query+key+value projections
  (timm's fused ``qkv`` is split by :mod:`visiontune.backbones.qkv` so these exist separately);
* ``attn``: q, k, v and the attention output projection;
* ``mlp``: every Linear (or 1x1 conv) of the block's MLP;
* ``all-linear``: every ``nn.Linear`` inside the blocks (the study's ``all-linear``), except a fused
  ``qkv`` that its attention reads as ``qkv.weight`` (Swin-V2, BEiT): an adapter there would never run.
  The 1x1 convs of an MLP count as Linears: timm builds some ConvNeXts (``convnext_atto``,
  ``convnext_nano_ols``, ``conv_mlp=True``) with a 1x1-conv MLP that computes what the Linear MLP of
  ``convnext_tiny`` computes, so ``all-linear`` must not depend on that implementation choice. A
  ResNet's 1x1 convs are not an MLP but part of its conv blocks (and ResNet-18 has none outside its
  shortcuts), so on a ResNet ``all-linear`` is refused with a pointer to ``conv``;
* ``conv``: every ungrouped ``nn.Conv2d`` inside the blocks (CNNs: a ResNet's 3x3 and 1x1 convs and
  shortcut projections, a ConvNeXt's 1x1-conv MLP); depthwise convs are skipped because peft cannot
  merge grouped convs.

Anything else in ``targets`` is a regular expression matched against a module's full name or any
dot-separated suffix of it (``mlp.fc1`` matches ``blocks.3.mlp.fc1``). ``method.blocks`` restricts
presets and patterns alike to the selected blocks; modules outside every block (e.g. an attention
pooling head) are reachable by patterns only. The classifier is never a target: it is trained in full.

Block syntax (``method.blocks``): ``all``; ``last:N``; ``first:N``; or a comma list of indices and
inclusive ranges, ``0-3,10,11``. Indices count blocks in depth order across stages.

On the command line ``method.targets=q,mlp`` is split at commas; a pattern that itself contains a
comma goes in a YAML list: ``method.targets="['blocks\.\d{1,2}\.mlp\.fc1']"``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn

from visiontune.errors import ConfigError

PRESETS: dict[str, str] = {
    "q": "query projections",
    "v": "value projections",
    "qv": "query and value projections",
    "qkv": "query, key and value projections",
    "attn": "query, key, value and attention output projections",
    "mlp": "every Linear / 1x1 conv of the MLPs",
    "all-linear": "every Linear (and 1x1-conv MLP layer) inside the blocks",
    "conv": "every ungrouped Conv2d inside the blocks",
}

_ROLES_OF_PRESET: dict[str, set[str]] = {
    "q": {"q"},
    "v": {"v"},
    "qv": {"q", "v"},
    "qkv": {"q", "k", "v"},
    "attn": {"q", "k", "v", "proj"},
    "mlp": {"mlp"},
}
_Q = {"q", "q_proj", "query"}
_K = {"k", "k_proj", "key"}
_V = {"v", "v_proj", "value"}
_PROJ = {"proj", "out_proj", "o_proj"}
_REGEX_CHARS = set("\\^$.|?*+()[]{}")


def is_preset(target: str) -> bool:
    """Whether ``target`` names a preset (else it is a module-name pattern)."""
    return target in PRESETS


def adaptable(module: nn.Module) -> bool:
    """Layer types an adapter can wrap: Linear (incl. bitsandbytes 4-bit) and ungrouped Conv2d."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


# ----------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class BlockLayout:
    """The blocks of a model in depth order, and the family they were recognised as."""

    family: str
    names: list[str]


def find_blocks(model: nn.Module) -> BlockLayout | None:
    """Recognise the block structure of a timm model, or None when it is not one visiontune knows."""
    for attr in ("blocks", "layers", "stages"):
        container = getattr(model, attr, None)
        if not isinstance(container, (nn.Sequential, nn.ModuleList)) or len(container) == 0:
            continue
        children = list(container.named_children())
        if all(isinstance(getattr(c, "blocks", None), (nn.Sequential, nn.ModuleList)) for _, c in children):
            names = [f"{attr}.{i}.blocks.{j}" for i, c in children for j, _ in c.blocks.named_children()]
            family = "swin" if attr == "layers" else "convnext" if attr == "stages" else "hierarchical"
            return BlockLayout(family, names)
        if attr == "blocks":
            family = "vit" if hasattr(children[0][1], "attn") else "blocks"
            return BlockLayout(family, [f"blocks.{i}" for i, _ in children])
    stages = [f"layer{i}" for i in range(1, 5) if isinstance(getattr(model, f"layer{i}", None), nn.Sequential)]
    if stages:
        return BlockLayout("resnet", [f"{s}.{j}" for s in stages for j, _ in getattr(model, s).named_children()])
    return None


_BLOCK_ITEM = re.compile(r"^(?:(?P<one>\d+)|(?P<lo>\d+)-(?P<hi>\d+)|(?P<kind>last|first):(?P<n>\d+)|(?P<all>all))$")


def block_spec_problems(spec: str) -> list[str]:
    """Syntax problems of a ``method.blocks`` value (checked at config time, before a model exists)."""
    items = [s.strip() for s in str(spec).split(",")]
    bad = [s for s in items if not _BLOCK_ITEM.match(s)]
    if bad or not items:
        return [
            f"method.blocks={spec!r} is not a block selection; write all, last:N, first:N, or indices and "
            "inclusive ranges such as 0-3,10,11"
        ]
    out = []
    for s in items:
        m = _BLOCK_ITEM.match(s)
        if m["lo"] is not None and int(m["lo"]) > int(m["hi"]):
            out.append(f"method.blocks range {s!r} is empty; write low-high with low <= high")
        if m["n"] is not None and int(m["n"]) < 1:
            out.append(f"method.blocks={s!r} selects no block; N must be >= 1")
    return out


def parse_blocks(spec: str, num_blocks: int) -> list[int]:
    """Block indices selected by ``spec`` on a model with ``num_blocks`` blocks, sorted.

    Raises:
        ConfigError: bad syntax, or an index or ``last:N`` / ``first:N`` beyond the model's depth
            (the message names the block count).
    """
    problems = block_spec_problems(spec)
    if problems:
        raise ConfigError(problems)
    chosen: set[int] = set()
    for s in (t.strip() for t in str(spec).split(",")):
        m = _BLOCK_ITEM.match(s)
        if m["all"]:
            chosen.update(range(num_blocks))
        elif m["kind"]:
            n = int(m["n"])
            if n > num_blocks:
                # Clamping would silently train fewer blocks than asked (last:9 on a 2-block model is "all").
                raise ConfigError(
                    f"method.blocks={spec!r} asks for {m['kind']} {n} blocks, but this backbone has {num_blocks} "
                    f"blocks; use {m['kind']}:N with N from 1 to {num_blocks}, or all"
                )
            chosen.update(range(num_blocks - n, num_blocks) if m["kind"] == "last" else range(n))
        else:
            lo = int(m["one"] if m["one"] is not None else m["lo"])
            hi = int(m["one"] if m["one"] is not None else m["hi"])
            if hi >= num_blocks:
                raise ConfigError(
                    f"method.blocks={spec!r} names block {hi}, but this backbone has {num_blocks} blocks; "
                    f"use indices 0-{num_blocks - 1}"
                )
            chosen.update(range(lo, hi + 1))
    return sorted(chosen)


# ----------------------------------------------------------------------------- roles


def roles(rel_name: str, module: nn.Module) -> set[str]:
    """Preset roles of a module, from its name relative to its block (``attn.qkv.q`` -> {"q"})."""
    out: set[str] = set()
    parts = rel_name.split(".")
    if parts[0] == "attn" and isinstance(module, nn.Linear):
        last = parts[-1]
        if last in _Q:
            out.add("q")
        elif last in _K:
            out.add("k")
        elif last in _V:
            out.add("v")
        elif last in _PROJ and len(parts) == 2:
            out.add("proj")
    if parts[0] == "mlp" and (isinstance(module, nn.Linear) or _is_pointwise_conv(module)):
        out.add("mlp")
    return out


def _is_pointwise_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == 1 and tuple(module.kernel_size) == (1, 1)


def _preset_match(preset: str, rel: str, module: nn.Module) -> bool:
    if preset == "all-linear":
        return isinstance(module, nn.Linear) or (_is_pointwise_conv(module) and "mlp" in roles(rel, module))
    if preset == "conv":
        return isinstance(module, nn.Conv2d) and module.groups == 1
    return bool(_ROLES_OF_PRESET[preset] & roles(rel, module))


def _pattern_match(pattern: re.Pattern, name: str) -> bool:
    parts = name.split(".")
    return any(pattern.fullmatch(".".join(parts[i:])) for i in range(len(parts)))


# ----------------------------------------------------------------------------- resolution


def target_problems(targets: list[str]) -> list[str]:
    """Config-time problems of ``method.targets``: empty, invalid regex, or a likely misspelled preset."""
    if not targets:
        return [f"method.targets is empty; use presets ({', '.join(PRESETS)}) or module-name patterns"]
    out = []
    for t in targets:
        if is_preset(t):
            continue
        try:
            re.compile(t)
        except re.error as e:
            out.append(f"method.targets entry {t!r} is neither a preset ({', '.join(PRESETS)}) nor a valid regex: {e}")
            continue
        # A bare word close to a preset is a typo, not a module pattern ("all_linear", "atn").
        close = difflib.get_close_matches(t, list(PRESETS), n=1, cutoff=0.75)
        if close and not (_REGEX_CHARS & set(t)):
            out.append(f"method.targets entry {t!r} is not a preset; did you mean {close[0]!r}? Presets: {', '.join(PRESETS)}")
    return out


def _classifier_ids(model: nn.Module) -> set[int]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()


def resolve_targets(model: nn.Module, targets: list[str], blocks: str = "all", model_name: str | None = None) -> list[str]:
    """Exact names of the modules that ``targets`` and ``blocks`` select in ``model``.

    Call it after :func:`visiontune.backbones.qkv.split_qkv` so that q, k and v exist separately.

    Args:
        model: a timm model (classifier included; it is never selected).
        targets: presets and/or module-name regexes.
        blocks: block selection (see the module docstring).
        model_name: used in error messages (e.g. ``vit_small_patch14_dinov2``).

    Returns:
        Module names in model order, each an adaptable layer (Linear or ungrouped Conv2d).

    Raises:
        ConfigError: a preset that the backbone cannot honour (naming the presets it supports), a
            pattern that matches nothing adaptable, or a block selection beyond the model's depth.
    """
    problems = target_problems(list(targets)) + block_spec_problems(blocks)
    if problems:
        raise ConfigError(problems)
    label = model_name or type(model).__name__
    layout = find_blocks(model)
    head_ids = _classifier_ids(model)
    modules = [(n, m) for n, m in model.named_modules() if n and id(m) not in head_ids]
    presets = [t for t in targets if is_preset(t)]
    patterns = [t for t in targets if not is_preset(t)]

    if layout is None:
        if presets:
            raise ConfigError(
                f"method.targets={list(targets)}: visiontune does not know the block layout of {label} "
                f"({type(model).__name__}), so presets cannot be placed; use module-name patterns instead, "
                f"e.g. {_example_names(modules)}"
            )
        selected_prefixes: list[str] = []
        block_of = {}
    else:
        chosen = parse_blocks(blocks, len(layout.names))
        selected_prefixes = [layout.names[i] for i in chosen]
        block_of = {}
        for b in layout.names:
            for n, _ in model.get_submodule(b).named_modules():
                block_of[f"{b}.{n}" if n else b] = b
    selected_blocks = set(selected_prefixes)
    from visiontune.backbones.qkv import bypassed_qkv

    bypassed = bypassed_qkv(model)

    def in_selection(name: str) -> bool:
        b = block_of.get(name)
        return b is None or b in selected_blocks

    chosen_names: set[str] = set()
    for preset in presets:
        found = []
        for b in selected_prefixes:
            for rel, m in model.get_submodule(b).named_modules():
                if rel and adaptable(m) and _preset_match(preset, rel, m) and f"{b}.{rel}" not in bypassed:
                    found.append(f"{b}.{rel}")
        if not found:
            raise ConfigError(_unsupported_preset_message(model, layout, preset, label, modules))
        chosen_names.update(found)
    for pat in patterns:
        rx = re.compile(pat)
        hits = [n for n, m in modules if _pattern_match(rx, n)]
        usable = [n for n in hits if adaptable(model.get_submodule(n)) and in_selection(n) and n not in bypassed]
        if not usable:
            skipped = [n for n in hits if n in bypassed]
            if skipped:
                why = f"{skipped[0]} cannot carry an adapter: {bypassed[skipped[0]]}"
            elif hits:
                why = f"it matches only {', '.join(sorted(hits)[:4])} (not Linear/Conv2d layers, or outside method.blocks={blocks!r})"
            else:
                why = "it matches no module"
            close = difflib.get_close_matches(pat, list(PRESETS), n=1, cutoff=0.6)
            hint = f" Did you mean the preset {close[0]!r}?" if close else ""
            raise ConfigError(
                f"method.targets pattern {pat!r} selects nothing on {label}: {why}.{hint} Presets: {', '.join(PRESETS)}; "
                f"module names look like {_example_names(modules)}"
            )
        chosen_names.update(usable)
    order = {n: i for i, (n, _) in enumerate(modules)}
    return sorted(chosen_names, key=order.__getitem__)


def supported_presets(model: nn.Module) -> list[str]:
    """Presets that select at least one module of ``model`` (all blocks)."""
    layout = find_blocks(model)
    if layout is None:
        return []
    from visiontune.backbones.qkv import bypassed_qkv

    bypassed = bypassed_qkv(model)
    out = []
    for preset in PRESETS:
        for b in layout.names:
            if any(
                rel and adaptable(m) and _preset_match(preset, rel, m) and f"{b}.{rel}" not in bypassed
                for rel, m in model.get_submodule(b).named_modules()
            ):
                out.append(preset)
                break
    return out


def _example_names(modules: list[tuple[str, nn.Module]]) -> str:
    names = [n for n, m in modules if adaptable(m)]
    if not names:
        return "(this model has no Linear or Conv2d layer outside its classifier)"
    pick = names[:: max(1, len(names) // 4)][:4]
    return ", ".join(repr(n) for n in pick)


_FAMILY_NAMES = {"vit": "ViT", "swin": "Swin", "convnext": "ConvNeXt", "resnet": "ResNet"}
_CNN_FAMILIES = {"resnet", "convnext"}
_ATTENTION_PRESETS = ("q", "v", "qv", "qkv", "attn")


def _depthwise_convs(model: nn.Module, layout: BlockLayout) -> list[str]:
    """Grouped convs inside the blocks: convs that exist but that no preset may target."""
    return [
        f"{b}.{rel}" for b in layout.names for rel, m in model.get_submodule(b).named_modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1
    ]


def _unsupported_preset_message(
    model: nn.Module, layout: BlockLayout, preset: str, label: str, modules: list[tuple[str, nn.Module]]
) -> str:
    """Why ``preset`` selects nothing on this family, and what to write instead (the presets that do apply).

    CNNs get their own wording: the common mistake there is carrying a ViT recipe (``qv``, ``attn``,
    ``all-linear``) over to a ResNet, and the fix is a different preset or a method without targets.
    """
    from visiontune.backbones.qkv import unsplittable_qkv

    ok = supported_presets(model)
    family = _FAMILY_NAMES.get(layout.family, layout.family)
    cnn = layout.family in _CNN_FAMILIES
    why = ""
    fused = unsplittable_qkv(model)
    if preset in _ATTENTION_PRESETS and fused:
        name, reason = next(iter(fused.items()))
        why = f" Its fused {name} cannot be split into q/k/v: {reason}."
    elif preset in _ATTENTION_PRESETS and cnn:
        why = f" This {family} has no attention: it is a CNN, so its blocks have no query/key/value projections."
    elif preset in _ATTENTION_PRESETS:
        why = f" {layout.family} blocks of {label} have no attention projections."
    elif preset in ("all-linear", "mlp") and layout.family == "resnet":
        why = (
            " This ResNet has no Linear layer and no MLP in its blocks, only convolutions (1x1 convs included), "
            "which the 'conv' preset adapts."
        )
    elif preset in ("all-linear", "mlp"):
        why = f" {layout.family} blocks of {label} have no Linear layers" + (" in an MLP." if preset == "mlp" else ".")
    elif preset == "conv" and _depthwise_convs(model, layout):
        why = (
            f" The only convolutions in its blocks are depthwise (groups > 1, e.g. {_depthwise_convs(model, layout)[0]}), "
            "and peft cannot merge an adapter into a grouped conv."
        )
    elif preset == "conv":
        why = f" {layout.family} blocks of {label} have no ungrouped Conv2d."
    other_methods = ", or method.name=linear / full (no targets needed)" if cnn else ""
    examples = f"module-name patterns, e.g. {_example_names(modules)}"
    if ok:
        alternatives = f" (or {', '.join(ok[1:])})" if len(ok) > 1 else ""
        fix = f"use method.targets={ok[0]}{alternatives}{other_methods}, or {examples}"
    else:
        fix = f"use {examples}{other_methods}"
    return (
        f"method.targets preset {preset!r} selects nothing on {label}.{why} Presets this backbone supports: "
        f"{', '.join(ok) if ok else 'none'}; {fix}"
    )
