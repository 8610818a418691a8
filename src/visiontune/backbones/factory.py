"""Build a timm backbone from ``backbone.*`` config: name, weights, input size, regularisation.

The model returned is a plain timm model (``forward_features``, ``forward_head(pre_logits=True)``,
``get_classifier``, ``reset_classifier``, ``pretrained_cfg``) with a freshly initialised classifier of
the requested size. Weight files are loaded through timm's own pretrained path
(``pretrained_cfg_overlay``), so each family's checkpoint filter runs: ViT position embeddings are
resampled to the requested ``img_size`` as timm does for its hub weights (an offline source may ask for
the interpolation its weights were fine-tuned with instead, see ``pos_embed_antialias``).

Why one module over 500 lines: it is one path, name -> architecture -> weights -> built model, and each failure on
it (unknown name, hub unreachable, file of another architecture, shape mismatch) must say which step failed and the
fix, which needs the earlier steps' facts at hand. Weight sources (:mod:`~visiontune.backbones.weights`,
:mod:`~visiontune.backbones.offline`, :mod:`~visiontune.backbones.hub`), transforms and the tiny test models are
already modules of their own.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable, Protocol

import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from visiontune.backbones.bands import describe_init, set_input_channels, widen_rgb
from visiontune.backbones.hub import hub_access, offline_mode
from visiontune.backbones.weights import FILE_SUFFIXES, WeightSpec, describe_key_problems, file_sha256, parse_weights
from visiontune.errors import ConfigError, WeightsError
from visiontune.registry import BACKBONES, WEIGHT_SOURCES

ANY_TIMM_NOTE = "any timm model name also works (timm.list_models(), e.g. vit_small_patch16_224, resnet50)"
"""Shown next to :func:`list_backbones` output: the list is not exhaustive."""

_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


class BackboneSpec(Protocol):
    """What :func:`create_backbone` reads from its config (``visiontune.config.BackboneConfig``)."""

    name: str
    weights: str
    img_size: int | None
    drop_path: float
    grad_checkpointing: bool
    # in_chans (None = 3) and rgb_bands (see BackboneConfig) are read with getattr: older specs lack them.


@dataclass(frozen=True)
class _Arch:
    """A resolved ``backbone.name``: how to build it and what timm knows about it."""

    name: str
    arch: str  # the architecture without a pretrained tag, used to match offline sources
    build: Callable[..., nn.Module]
    registered: bool

    def default_cfg(self) -> dict[str, Any]:
        """Pretrained cfg as a dict without building the model ({} when timm has none)."""
        if self.registered:
            return dict(getattr(self.build, "pretrained_cfg", {}) or {})
        if self.name.startswith(_HUB_PREFIXES):
            return {}
        cfg = timm.models.get_pretrained_cfg(self.name, allow_unregistered=True)
        return cfg.to_dict() if cfg is not None else {}


@dataclass(frozen=True)
class _Weights:
    """A resolved ``backbone.weights``."""

    spec: WeightSpec
    canonical: str  # the spelling stored in the backbone identity ("offline" -> "offline:<source>")
    path: Path | None = None
    source: Any = None


def _resolve_name(name: str) -> _Arch:
    """Map ``backbone.name`` to a builder: a registered test backbone, else a timm model.

    Raises:
        ConfigError: unknown name, with the closest registered or timm names.
    """
    name = str(name).strip()
    if name in BACKBONES:
        return _Arch(name, name, BACKBONES.get(name), True)
    if name.startswith(_HUB_PREFIXES):
        return _Arch(name, name, functools.partial(timm.create_model, name), False)
    if timm.is_model(name):
        arch = timm.models.split_model_name_tag(name)[0]
        return _Arch(name, arch, functools.partial(timm.create_model, name), False)
    candidates = list(dict.fromkeys(BACKBONES.names() + timm.list_models()))
    close = difflib.get_close_matches(name, candidates, n=4, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(
        f"backbone.name={name!r} is neither a visiontune backbone ({', '.join(BACKBONES.names())}) nor a timm "
        f"model.{hint} Search timm's names with timm.list_models('*pattern*'); see `visiontune list backbones`."
    )


def _offline_sources_for(arch: str) -> list[Any]:
    return [WEIGHT_SOURCES.get(n) for n in WEIGHT_SOURCES.names() if WEIGHT_SOURCES.get(n).arch == arch]


def _resolve_weights(value: str, arch: _Arch, locate: bool = True) -> _Weights:
    """Resolve ``backbone.weights`` for ``arch`` to a file (converting offline sources) or hub/none.

    ``locate=False`` checks the same things without converting an offline source (its ``path`` is None).

    Raises:
        WeightsError: no such file, no offline source for the architecture, source not installed or
            made for another architecture.
        ConfigError: unknown ``offline:<source>`` name.
    """
    spec = parse_weights(value)
    if spec.kind in ("hub", "none"):
        return _Weights(spec, spec.kind)
    if spec.kind == "file":
        return _Weights(spec, str(value), path=spec.path)
    if spec.source is None:
        sources = _offline_sources_for(arch.arch)
        if not sources:
            having = sorted({WEIGHT_SOURCES.get(n).arch for n in WEIGHT_SOURCES.names()})
            raise WeightsError(
                f"backbone.weights=offline: no offline weights exist for backbone.name={arch.name!r}. "
                f"Architectures with offline weights: {', '.join(having)} "
                f"(sources: {', '.join(WEIGHT_SOURCES.names())}). Use backbone.weights=hub (internet), "
                f"a local {'/'.join(FILE_SUFFIXES)} file, or none (random init)."
            )
        source = sources[0]
    else:
        source = WEIGHT_SOURCES.get(spec.source)
        if source.arch != arch.arch:
            raise WeightsError(
                f"backbone.weights=offline:{source.name} holds {source.arch} weights but backbone.name="
                f"{arch.name!r}; set backbone.name={source.arch}"
            )
    if not locate:
        source.require_package()
        return _Weights(spec, f"offline:{source.name}", source=source)
    return _Weights(spec, f"offline:{source.name}", path=source.path(), source=source)


def _build(arch: _Arch, **kwargs: Any) -> nn.Module:
    """Call the builder; CNNs reject ``img_size`` (their input size only matters to preprocessing)."""
    try:
        return arch.build(**kwargs)
    except TypeError as e:
        if "img_size" not in kwargs or "img_size" not in str(e):
            raise
        kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
        return arch.build(**kwargs)


def _is_hub_failure(e: BaseException) -> bool:
    mod = type(e).__module__ or ""
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) or mod.startswith(
        ("huggingface_hub", "httpx", "httpcore", "requests", "urllib3", "urllib")
    )


def _offline_hint(arch: _Arch) -> str:
    """The tail of a hub error: the offline source for ``arch``, or the architectures that have one."""
    sources = _offline_sources_for(arch.arch)
    if sources:
        return f" (offline source {sources[0].name} has {arch.arch} weights)"
    having = sorted({WEIGHT_SOURCES.get(n).arch for n in WEIGHT_SOURCES.names()})
    return f" with backbone.name set to one of {', '.join(having)} (the architectures with offline weights)"


def _require_hub_weights(arch: _Arch, offline_hint: str) -> dict[str, Any]:
    """timm's pretrained cfg of ``arch``; raises when timm knows no hub weights for it (no network used)."""
    cfg = arch.default_cfg()
    if not arch.name.startswith(_HUB_PREFIXES) and not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        raise WeightsError(
            f"backbone.weights=hub: timm has no pretrained weights for backbone.name={arch.name!r}; use "
            f"backbone.weights=none (random init), a local {'/'.join(FILE_SUFFIXES)} file, or "
            f"backbone.weights=offline{offline_hint}"
        )
    return cfg


def _load_from_hub(arch: _Arch, num_classes: int, kwargs: dict[str, Any], offline_hint: str) -> nn.Module:
    cfg = _require_hub_weights(arch, offline_hint)
    access = hub_access(cfg)
    try:
        with contextlib.nullcontext() if access.online else offline_mode():
            model = _build(arch, pretrained=True, num_classes=num_classes, **kwargs)
    except Exception as e:
        if not _is_hub_failure(e):
            raise
        where = cfg.get("hf_hub_id") or cfg.get("url") or arch.name
        why = (
            f"{access.reason} and the weights are not in the local Hugging Face cache" if not access.online
            else f"the download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        )
        raise WeightsError(
            f"backbone.weights=hub: cannot load {arch.name!r} weights ({where}): {why}. "
            f"Use backbone.weights=offline{offline_hint} or the path of a local {'/'.join(FILE_SUFFIXES)} file "
            f"(backbone.weights=/path/to/weights.safetensors); with weights already downloaded, HF_HUB_OFFLINE=1 "
            f"reads them from the cache without asking the network."
        ) from e
    # timm keeps the pretrained classifier when the class counts happen to agree; visiontune always
    # starts from a fresh head so that results do not depend on that coincidence.
    model.reset_classifier(num_classes)
    return model


_TORCH_MISSING = re.compile(r"Missing key\(s\) in state_dict: (.*?)\.\s*$", re.M)
_TORCH_UNEXPECTED = re.compile(r"Unexpected key\(s\) in state_dict: (.*?)\.\s*$", re.M)
_TORCH_SHAPE = re.compile(
    r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[.*?\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((\[.*?\])\)"
)


def _mismatch_error(e: Exception, path: Path, arch: _Arch) -> WeightsError:
    """Turn torch's strict-load RuntimeError into a message listing a few keys of each kind."""
    text = str(e)

    def keys(rx: re.Pattern[str]) -> list[str]:
        m = rx.search(text)
        return re.findall(r'"([^"]+)"', m.group(1)) if m else []

    shapes = [f"{k}: file {a} vs model {b}" for k, a, b in _TORCH_SHAPE.findall(text)]
    detail = describe_key_problems(keys(_TORCH_MISSING), keys(_TORCH_UNEXPECTED), shapes) or text.splitlines()[0]
    return WeightsError(
        f"backbone.weights={str(path)!r} does not fit backbone.name={arch.name!r}: {detail}. Use the "
        f"architecture these weights were saved from (a timm model's state_dict() loads into the same "
        f"timm name), or backbone.weights=hub/none."
    )


def _resample_pos_embed_like_source(model: nn.Module, pos_embed: torch.Tensor | None) -> None:
    """Redo timm's position-embedding resampling without anti-aliasing.

    timm anti-aliases when it shrinks a position grid; models exported from Hugging Face DINOv2 (and
    fine-tuned there at 224 px) interpolate without it. At 224 px the two differ by up to ~0.4 in the
    DINOv2-S output features, so for such sources the grid is resampled the way the weights were used.
    """
    target = getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if pos_embed is None or not isinstance(target, nn.Parameter) or grid is None or pos_embed.shape == target.shape:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    resampled = resample_abs_pos_embed(pos_embed, new_size=list(grid), num_prefix_tokens=prefix, antialias=False)
    with torch.no_grad():
        target.copy_(resampled.to(target.dtype))


def _load_from_file(
    arch: _Arch,
    path: Path,
    num_classes: int,
    kwargs: dict[str, Any],
    cfg_overlay: dict[str, Any],
    antialias: bool | None = None,
) -> nn.Module:
    """Strictly load a state-dict file (classifier excepted) through timm's pretrained path.

    Args:
        antialias: False re-resamples a ViT position grid without anti-aliasing (see
            :func:`_resample_pos_embed_like_source`); None keeps timm's resampling.
    """
    try:
        state_dict = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"backbone.weights={str(path)!r} cannot be read as a state dict ({type(e).__name__}: {e}); "
            f"save it with safetensors.torch.save_file(model.state_dict(), ...) or torch.save(model.state_dict(), ...)"
        ) from e
    # The checkpoint's classifier is dropped here (rather than by timm) so that the rest can be loaded
    # strictly: timm turns strict loading off whenever it drops a classifier itself.
    classifier = arch.default_cfg().get("classifier") or ()
    for name in (classifier,) if isinstance(classifier, str) else classifier:
        state_dict.pop(f"{name}.weight", None)
        state_dict.pop(f"{name}.bias", None)
    overlay = dict(cfg_overlay, state_dict=state_dict, file=str(path), num_classes=0, hf_hub_id=None, url=None)
    if kwargs.get("in_chans", 3) != 3:
        # The file already has N-band filters (a multispectral `visiontune pretrain` backbone): load them as they
        # are; timm would otherwise "adapt" (drop) a first layer that is not RGB.
        overlay["first_conv"] = None
    try:
        model = _build(arch, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, **kwargs)
    except RuntimeError as e:
        if "state_dict" not in str(e):
            raise
        raise _mismatch_error(e, path, arch) from e
    except KeyError as e:
        # A family's checkpoint filter indexes keys it expects (e.g. a ViT's pos_embed).
        raise WeightsError(
            f"backbone.weights={str(path)!r} lacks key {e} that timm's {arch.arch} loader needs; "
            f"is it a checkpoint of backbone.name={arch.name!r}?"
        ) from e
    # The state dict was only a vehicle for loading; keeping it would pin a second copy of the weights.
    model.pretrained_cfg.pop("state_dict", None)
    if antialias is False:
        _resample_pos_embed_like_source(model, state_dict.get("pos_embed"))
    model.reset_classifier(num_classes)
    return model


def create_backbone(cfg: BackboneSpec, num_classes: int) -> nn.Module:
    """Build the backbone ``cfg`` describes, with a fresh ``num_classes``-way classifier.

    Args:
        cfg: ``name`` (registered test backbone or any timm name), ``weights`` (hub / none / offline /
            offline:<source> / file path), ``img_size`` (None = pretrained default), ``drop_path``
            (stochastic depth rate), ``grad_checkpointing``.
        num_classes: classifier size (0 = no classifier, pooled features out).

    Returns:
        A timm model. Its ``pretrained_cfg["input_size"]`` reflects ``img_size``, so
        :func:`~visiontune.backbones.build_transform` and timm's ``resolve_data_config`` agree with it.

    Raises:
        ConfigError: unknown backbone name or invalid sizes (an ``img_size`` that is not a multiple of
            a patch model's patch size names the nearest valid sizes).
        WeightsError: weights missing, unreachable, or not matching the architecture.
    """
    if int(num_classes) < 0:
        raise ConfigError(f"num_classes={num_classes} must be >= 0")
    if _SHARED is None:
        return _create_backbone(cfg, num_classes)
    # The torch RNG state is part of the key and restored after a copy: the caller's next random draws (adapter
    # init) are then those a fresh build would have left, so sharing changes no result.
    key = (repr(cfg), int(num_classes), hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).hexdigest())
    if key not in _SHARED:
        model = _create_backbone(cfg, num_classes)
        _SHARED[key] = (copy.deepcopy(model), torch.random.get_rng_state())
        return model
    pristine, rng = _SHARED[key]
    torch.random.set_rng_state(rng)
    return copy.deepcopy(pristine)


_SHARED: dict[tuple[str, int, str], tuple[nn.Module, torch.Tensor]] | None = None
"""Pristine backbones while :func:`shared_backbones` is active (None: every call builds)."""


@contextlib.contextmanager
def shared_backbones() -> Iterator[None]:
    """Inside this block, :func:`create_backbone` builds each distinct backbone once and hands out copies.

    ``visiontune auto`` trains and scores many folds of the same backbone in one process; each build ran timm's
    random init and then read and converted the weight file again (3-4 s of a DINOv2-S fold on a busy 2-core CPU,
    twice for a first rung: training, then scoring its checkpoint). A copy of the built model costs a fraction of
    that. One copy per distinct backbone is kept until the block ends; nesting keeps the outer block's.
    """
    global _SHARED
    if _SHARED is not None:
        yield
        return
    _SHARED = {}
    try:
        yield
    finally:
        _SHARED = None


def _create_backbone(cfg: BackboneSpec, num_classes: int) -> nn.Module:
    """:func:`create_backbone` without sharing."""
    arch = _resolve_name(cfg.name)
    weights = _resolve_weights(cfg.weights, arch)
    kwargs: dict[str, Any] = {"drop_path_rate": float(cfg.drop_path)}
    if cfg.img_size:
        kwargs["img_size"] = int(cfg.img_size)
    in_chans = int(getattr(cfg, "in_chans", None) or 3)
    init = _input_init(cfg, arch, weights)

    if weights.spec.kind == "none":
        model = _build(arch, pretrained=False, num_classes=num_classes, **kwargs, **_chans(in_chans))
    elif weights.spec.kind == "hub":
        model = _load_from_hub(arch, num_classes, kwargs, _offline_hint(arch))
    else:
        overlay = dict(getattr(weights.source, "pretrained_cfg", None) or {})
        antialias = getattr(weights.source, "pos_embed_antialias", None)
        native = init == NATIVE_INIT
        model = _load_from_file(arch, weights.path, num_classes, dict(kwargs, **_chans(in_chans if native else 3)),
                                overlay, antialias)
    if in_chans != 3 and init.startswith("widened"):
        widen_rgb(model, in_chans, getattr(cfg, "rgb_bands", None))
    if in_chans != 3:
        set_input_channels(model, in_chans)
        model.pretrained_cfg["input_init"] = init
    return _finish(model, cfg)


NATIVE_INIT = "the weights' own first layer (already multi-band)"
"""The ``input_init`` of a weight file whose first layer already has the run's band count."""


def _chans(in_chans: int) -> dict[str, int]:
    return {} if in_chans == 3 else {"in_chans": in_chans}


def _file_input_bands(path: Path, key: str) -> int | None:
    """Input channels of the first-layer weight ``key`` in a weight file (None when it has no such key)."""
    try:
        if path.name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                shape = f.get_slice(key).get_shape() if key in f.keys() else None
        else:
            state = timm.models.load_state_dict(str(path), weights_only=True)
            shape = list(state[key].shape) if key in state else None
    except Exception:  # noqa: BLE001 - an unreadable file is reported, with its fix, by the load itself
        return None
    return int(shape[1]) if shape is not None and len(shape) == 4 else None


def _input_init(cfg: BackboneSpec, arch: _Arch, weights: _Weights) -> str:
    """How the first layer of a ``backbone.in_chans`` != 3 model starts (recorded in the run; "" for RGB).

    Raises:
        WeightsError: a weight file whose first layer has neither 3 nor ``in_chans`` input bands.
    """
    in_chans = int(getattr(cfg, "in_chans", None) or 3)
    if in_chans == 3 and not (weights.path is not None and weights.path.name.endswith(".safetensors")):
        return ""  # an RGB model; other files are checked by the load itself (reading them here costs a full load)
    if weights.spec.kind == "none":
        return "random (backbone.weights=none)"
    if weights.spec.kind == "file" and weights.path is not None:
        first = arch.default_cfg().get("first_conv")
        first = first[0] if isinstance(first, (list, tuple)) and first else first
        bands = _file_input_bands(weights.path, f"{first}.weight") if first else None
        if bands == in_chans:
            return NATIVE_INIT if in_chans != 3 else ""
        if bands not in (None, 3):
            raise WeightsError(
                f"backbone.weights={str(weights.path)!r} has a {bands}-band first layer ({first}) but the data gives "
                f"{in_chans} bands; set data.channels={bands} (without data.bands) for the {bands}-band arrays these "
                "weights were pretrained on"
            )
    return describe_init(in_chans, getattr(cfg, "rgb_bands", None)) if in_chans != 3 else ""


def _finish(model: nn.Module, cfg: BackboneSpec) -> nn.Module:
    """Settings applied after construction, the same for real and meta models."""
    if cfg.img_size:
        check_patch_grid(model, int(cfg.img_size), cfg.name)
        # Keep the model's preprocessing metadata truthful: timm leaves the pretrained size here.
        size = int(cfg.img_size)
        model.pretrained_cfg["input_size"] = (model.pretrained_cfg.get("input_size", (3,))[0], size, size)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def create_meta_backbone(cfg: BackboneSpec, num_classes: int) -> nn.Module:
    """The backbone :func:`create_backbone` would build, on the meta device: structure and shapes, no values.

    For validating a configuration before a run (``visiontune sweep --dry-run``): a 7B ViT costs a fraction
    of a second and no memory. ``backbone.name`` and ``backbone.weights`` are resolved exactly as for a run
    (unknown names, missing weight files, an architecture with no hub weights, an offline source whose
    package is not installed all raise the same errors), but nothing is downloaded, converted or loaded:
    whether the hub is reachable, and whether a weight file's keys fit, show only when the run starts. The
    exception is an ``hf-hub:`` name: timm reads that architecture from the hub's config.json, as a run does.

    Raises:
        ConfigError: unknown backbone name or invalid sizes.
        WeightsError: weights missing, or no hub weights for this architecture.
    """
    if int(num_classes) < 0:
        raise ConfigError(f"num_classes={num_classes} must be >= 0")
    arch = _resolve_name(cfg.name)
    weights = _resolve_weights(cfg.weights, arch, locate=False)
    if weights.spec.kind == "hub":
        _require_hub_weights(arch, _offline_hint(arch))
    kwargs: dict[str, Any] = {"drop_path_rate": float(cfg.drop_path)}
    if cfg.img_size:
        kwargs["img_size"] = int(cfg.img_size)
    with torch.device("meta"):
        model = _build(arch, pretrained=False, num_classes=num_classes, **kwargs,
                       **_chans(int(getattr(cfg, "in_chans", None) or 3)))
    return _finish(model, cfg)


def check_patch_grid(model: nn.Module, img_size: int, name: str) -> None:
    """Refuse an ``img_size`` that the model's patch grid does not cover.

    A patch-embedding convolution of stride ``p`` over ``s`` pixels sees ``s // p`` patches and drops
    the last ``s % p`` rows and columns without a word (36 % of the image at ``img_size=30`` with
    8-pixel patches). Resizing to a covered size instead would silently change what the user asked
    for, so it is an error naming the nearest multiples of the patch size. Models that pad the input
    to the grid themselves (timm's ``dynamic_img_pad``) and CNNs (no ``patch_embed``) pass.

    Raises:
        ConfigError: naming the size, the patch size, the share of pixels lost and the valid sizes.
    """
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if patch is None or getattr(embed, "dynamic_img_pad", False):
        return
    patches = (patch, patch) if isinstance(patch, int) else tuple(int(p) for p in patch)
    if all(img_size % p == 0 for p in patches):
        return
    p = math.lcm(*patches)
    lower, upper = img_size - img_size % p, img_size - img_size % p + p
    kept = (img_size // patches[0] * patches[0]) * (img_size // patches[-1] * patches[-1])
    lost = 1 - kept / img_size**2
    valid = f"{lower} or {upper}" if lower >= p else f"{upper}"
    raise ConfigError(
        f"backbone.img_size={img_size} is not a multiple of the patch size {p} of backbone.name={name!r}: the "
        f"patch grid would ignore the last {img_size % p} pixel rows and columns ({lost:.0%} of every image). "
        f"Use a multiple of {p}: backbone.img_size={valid} (or null for the pretrained default)"
    )


def _default_img_size(arch: _Arch) -> int | None:
    size = arch.default_cfg().get("input_size")
    return int(size[-1]) if size else None


def default_img_size(name: str) -> int | None:
    """The pretrained input size of ``backbone.name`` (what ``backbone.img_size=null`` means), None if unknown.

    Raises:
        ConfigError: unknown backbone name.
    """
    return _default_img_size(_resolve_name(name))


def backbone_identity(cfg: BackboneSpec) -> dict[str, Any]:
    """What an adapter was trained on, to refuse loading it onto another backbone.

    Returns:
        ``{"name", "weights", "sha256", "img_size"}``: ``weights`` is the canonical spelling
        (``offline`` becomes ``offline:<source>``); ``sha256`` hashes the weight file actually loaded
        (for ``hub`` it is the hub id/tag string, for random init None); ``img_size`` is the resolved
        input size (the pretrained default when ``cfg.img_size`` is None).
    """
    arch = _resolve_name(cfg.name)
    weights = _resolve_weights(cfg.weights, arch)
    if weights.path is not None:
        digest: str | None = file_sha256(weights.path)
    elif weights.spec.kind == "hub":
        dcfg = arch.default_cfg()
        digest = arch.name if arch.name.startswith(_HUB_PREFIXES) else (
            f"hf-hub:{dcfg['hf_hub_id']}" if dcfg.get("hf_hub_id") else dcfg.get("url") or f"timm:{arch.name}"
        )
    else:
        digest = None
    identity = {
        "name": cfg.name,
        "weights": weights.canonical,
        "sha256": digest,
        "img_size": int(cfg.img_size) if cfg.img_size else _default_img_size(arch),
    }
    in_chans = int(getattr(cfg, "in_chans", None) or 3)
    if in_chans != 3:  # RGB runs keep the identity they always had
        identity["in_chans"] = in_chans
        identity["input_init"] = _input_init(cfg, arch, weights)
    return identity


def list_backbones() -> list[str]:
    """Registered test backbones, then architectures that have offline weights.

    Not exhaustive: :data:`ANY_TIMM_NOTE` — any timm model name works with ``backbone.weights=hub``
    (needs internet), ``none``, or a local weight file.
    """
    names = BACKBONES.names()
    for source_name in WEIGHT_SOURCES.names():
        arch = WEIGHT_SOURCES.get(source_name).arch
        if arch not in names:
            names.append(arch)
    return names


def describe_backbones() -> str:
    """``visiontune list backbones``: the test backbones, then every offline weight source with its provenance.

    For each offline source: the architecture and ``backbone.weights`` spelling, whether the weights are the
    authors' original release or a derivative, what they were trained on, the package and file they come
    from with its pinned SHA-256, the licence, what the conversion's fidelity test compares against, and
    whether the package is installed here (with the pip command when not).
    """
    lines = ["Registered test backbones (random weights, for tests and smoke runs):"]
    lines += [f"  {name:24s} {BACKBONES.help(name)}".rstrip() for name in BACKBONES.names()]
    lines.append("")
    lines.append("Offline pretrained weights (backbone.name=ARCH backbone.weights=offline or offline:SOURCE):")
    for source_name in WEIGHT_SOURCES.names():
        info = WEIGHT_SOURCES.get(source_name).provenance()
        installed = "installed" if info["installed"] else f"not installed: {WEIGHT_SOURCES.get(source_name).install_hint()}"
        lines += [
            f"  {info['arch']}  ({info['source']}, {info['origin']})",
            f"      {info['description']}",
            f"      trained on: {info['trained_on']}",
            f"      file:       {info['package']} / {info['file']}",
            f"      sha256:     {info['sha256'] or 'not pinned'}",
            f"      licence:    {info['license']}",
            f"      fidelity:   checked against {info['fidelity_reference']}",
            f"      status:     {installed}",
        ]
    lines += ["", f"Not exhaustive: {ANY_TIMM_NOTE}, with backbone.weights=hub (internet), none or a local file."]
    return "\n".join(lines)
