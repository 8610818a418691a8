"""Run configuration: nested dataclasses, YAML load/dump, dotted ``key=value`` overrides, validation.

One vocabulary everywhere (CLI overrides, YAML, Python): ``backbone.name``, ``method.rank``,
``data.train_per_class``, ``optim.lr``, ``run.dir`` ... Validation collects *every* problem (unknown
keys with suggestions, wrong types, invalid choices, cross-field conflicts) and raises one
:class:`~visiontune.errors.ConfigError` listing them all.

The method section is polymorphic: ``method.name`` picks the registered method, whose own ``Config``
dataclass (a :class:`MethodConfig` subclass) holds its options (e.g. ``rank`` for LoRA). This module
imports no method: methods register themselves when :mod:`visiontune.methods` is imported, which
``import visiontune`` (the root package, run before any of its submodules) does, and validation looks
the name up in :data:`~visiontune.registry.METHODS` when it runs.

Why this module is longer than ~500 lines: the sections' dataclasses (their help texts are the reference
documentation) and the code that reads them (dotted overrides, type coercion that reports every problem at once,
YAML load/dump) change together -- a field's annotation is valid only if :func:`_coerce` handles its type --, the
checks the sections share with pretraining's config (:func:`run_section_problems`, :func:`optim_section_problems`)
belong to the same vocabulary, and nearly every module imports it; a method's options already live with the method
(:class:`MethodConfig` subclasses), the data splits' checks with the data.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from visiontune.data.bands import BandSpec, band_config_problems
from visiontune.data.images import ImageLimits
from visiontune.data.splits import split_problems
from visiontune.atomic import write_text_atomic
from visiontune.errors import ConfigError
from visiontune.registry import METHODS


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


def run_name_problems(name: str | None, key: str = "run.name") -> list[str]:
    """Problems of a run name: it must be one plain folder name, so the run stays inside ``run.dir``.

    ``run.name=../../x`` would otherwise write (and with ``run.overwrite=true`` delete) a folder
    anywhere the user can write to; an empty name or ``.`` would be ``run.dir`` itself.
    """
    if name is None:
        return []
    text = str(name)
    bad = (
        text.strip() == "" or text in (".", "..") or "/" in text or "\\" in text or "\0" in text
        or Path(text).is_absolute() or bool(Path(text).drive) or (os.altsep is not None and os.altsep in text)
    )
    if not bad:
        return []
    suggestion = "_".join(p for p in text.replace("\\", "/").split("/") if p not in ("", ".", "..")) or "my-run"
    return [f"{key}={text!r} must be a plain folder name inside run.dir (no '/', '\\', '.' or '..'); "
            f"e.g. {key}={suggestion}, with run.dir naming the parent folder"]


def run_section_problems(run: Any) -> list[str]:
    """The checks every ``run`` section shares (training and pretraining): device, threads, resume vs overwrite,
    the run name."""
    out = []
    if run.device != "auto" and not (run.device in ("cpu", "mps") or run.device.startswith("cuda")):
        out.append(f"run.device={run.device!r} is invalid; use auto, cpu, cuda, cuda:N or mps")
    if run.threads is not None and run.threads < 1:
        out.append(f"run.threads={run.threads} must be >= 1 (or null for torch's default)")
    if run.resume and run.overwrite:
        out.append("run.resume=true and run.overwrite=true contradict each other (resume continues the run in "
                   "run.name, overwrite deletes it); keep one")
    out.extend(run_name_problems(run.name))
    return out


def optim_section_problems(optim: Any, counts: tuple[str, ...], lr_default: str) -> list[str]:
    """The checks every ``optim`` section shares (training and pretraining): counts, learning rates, weight decay,
    the final learning-rate ratio and gradient clipping.

    Args:
        optim: the section (``lr``, ``head_lr``, ``weight_decay``, ``min_lr_ratio``, ``clip_grad`` and ``counts``).
        counts: the settings that count something (epochs, steps, batch sizes): each must be >= 1.
        lr_default: what ``lr`` / ``head_lr`` = null means, for the message.
    """
    out = [f"optim.{key}={getattr(optim, key)} must be >= 1" for key in counts if getattr(optim, key) < 1]
    for key in ("lr", "head_lr"):
        v = getattr(optim, key)
        if v is not None and v <= 0:
            out.append(f"optim.{key}={v} must be > 0 (or null for {lr_default})")
    if optim.weight_decay < 0:
        out.append(f"optim.weight_decay={optim.weight_decay} must be >= 0")
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        out.append(f"optim.min_lr_ratio={optim.min_lr_ratio} must be in [0, 1]")
    if optim.clip_grad is not None and optim.clip_grad <= 0:
        out.append(f"optim.clip_grad={optim.clip_grad} must be > 0 (or null to disable)")
    return out


@dataclass
class RunConfig:
    """Where and how a run executes."""

    dir: str = _help("parent folder of run directories", default="runs")
    name: str | None = _help("run directory name; default: <dataset>-<backbone>-<method>-<time>", default=None)
    seed: int = _help("seed for model init, augmentation and data order", default=0)
    device: str = _help("'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1' ...", default="auto")
    deterministic: bool = _help("use deterministic algorithms (slower on GPU)", default=True)
    threads: int | None = _help("torch CPU threads; default: torch's choice", default=None)
    progress: bool = _help("show progress bars", default=True)
    tensorboard: bool = _help("write per-epoch scalars to <run dir>/tensorboard (needs the tensorboard extra)", default=False)
    resume: bool = _help(
        "continue the run in run_dir from its checkpoint (refused if its config or data split differ; a finished run is "
        "returned as it is)", default=False,
    )
    measure_speed: bool = _help("measure inference latency/throughput after training", default=True)
    plots: bool = _help(
        "draw confusion.png and history.png into the run directory (visiontune auto's cross-validation folds skip "
        "them: seconds of matplotlib per fold that nobody looks at)", default=True,
    )
    overwrite: bool = _help(
        "delete an existing run directory (once the new run's config and data are checked) and start in an empty one",
        default=False,
    )
    prefix_cache: Literal["auto", "views", "none"] = _help(
        "cache the tokens entering the first trained ViT block: auto = only when exact (no training augmentation; "
        "validation always), views = also with augmentation, run.prefix_views crops per image (changes results), none",
        default="auto",
    )
    prefix_views: int = _help("augmented views per image cached by run.prefix_cache=views", default=4)
    compile: bool = _help("torch.compile the training forward (compile time counts: slower on small CPU runs)", default=False)
    parallel: Literal["ddp", "fsdp"] = _help(
        "under torchrun: ddp = every process holds the whole model (torch DDP), fsdp = parameters, gradients and "
        "optimizer state sharded over the processes per block (torch FSDP2); ignored in one process",
        default="ddp",
    )

    def problems(self) -> list[str]:
        out = run_section_problems(self)
        if self.prefix_views < 1:
            out.append(f"run.prefix_views={self.prefix_views} must be >= 1")
        if self.parallel == "fsdp" and self.prefix_cache == "views":
            out.append("run.prefix_cache=views with run.parallel=fsdp: the cached frozen prefix runs outside the sharded "
                       "model; use run.prefix_cache=none (or auto, which fsdp turns off) or run.parallel=ddp")
        if self.parallel == "fsdp" and self.compile:
            out.append("run.compile=true with run.parallel=fsdp is not supported (never tested together); use "
                       "run.compile=false or run.parallel=ddp")
        return out


@dataclass
class DataConfig:
    """Which images, and how they are split into the limited-data regime."""

    dataset: str = _help("built-in name (see `visiontune list datasets`), an image folder, or a CSV manifest", default="")
    root: str | None = _help("folder holding a built-in dataset's files, if not the default", default=None)
    train_per_class: int | None = _help("labeled training images per class (few-shot regime)", default=None)
    train_fraction: float | None = _help("fraction of each class used for training", default=None)
    val_per_class: int | None = _help("validation images per class (for best-epoch selection)", default=None)
    val_fraction: float | None = _help("fraction of each class used for validation", default=None)
    test_per_class: int | None = _help("cap on test images per class; null = everything else", default=None)
    seed: int = _help("seed of the split (independent of run.seed)", default=0)
    augment: bool = _help("random resized crop + flip on training images", default=True)
    crop_scale: float = _help("smallest image-area fraction a random training crop keeps (ImageNet recipes: 0.08)", default=0.5)
    num_workers: int = _help("DataLoader worker processes", default=0)
    cache: bool = _help("decode train/val images once and keep them in memory (up to 2 GB per split; same pixels)", default=True)
    max_pixels: int = _help(
        "largest image decoded (width x height; larger JPEGs are decoded at 1/2..1/8 scale, other files are refused)",
        default=40_000_000,
    )
    max_aspect: float = _help("largest longer-side / shorter-side ratio of an image (resizing a thin strip costs memory)", default=20.0)
    channels: int | None = _help(
        "null = photos (decoded to RGB); N = multi-band arrays of N bands (.npy, .tif, multi-page .tif; HxWxN or NxHxW) "
        "in the folder or manifest, e.g. 13 for Sentinel-2", default=None,
    )
    bands: list[int] | None = _help(
        "0-based bands fed to the model, in order (e.g. [3,2,1]: Sentinel-2 red, green, blue for an RGB backbone); "
        "null = all data.channels bands", default=None,
    )
    band_mean: list[float] | None = _help(
        "per-band mean (one per file band) for multi-band data; null = computed from the training split and written "
        "into the run's config.yaml, so every later command normalises the same way", default=None,
    )
    band_std: list[float] | None = _help("per-band std for multi-band data; null = computed with data.band_mean", default=None)

    def band_spec(self) -> BandSpec | None:
        """The multi-band input description (None for photos); needs the statistics resolved."""
        if self.channels is None:
            return None
        if self.band_mean is None or self.band_std is None:
            raise ConfigError("data.band_mean / data.band_std are not resolved yet: a run computes them from its "
                              "training split (visiontune.train); give both to use the data outside a run")
        return BandSpec(int(self.channels), tuple(self.bands) if self.bands is not None else None,
                        tuple(self.band_mean), tuple(self.band_std))

    def input_bands(self) -> int:
        """Bands the model sees: 3 for photos, else data.bands' length or data.channels."""
        if self.channels is None:
            return 3
        return len(self.bands) if self.bands is not None else int(self.channels)

    def image_limits(self) -> ImageLimits:
        """The :class:`~visiontune.data.images.ImageLimits` these settings describe (errors name data.max_*)."""
        return ImageLimits(int(self.max_pixels), float(self.max_aspect), "data.max_pixels", "data.max_aspect")

    def problems(self) -> list[str]:
        out = []
        if not self.dataset:
            out.append("data.dataset is empty; set it to a built-in name, an image folder or a CSV manifest")
        out.extend(split_problems(self))
        if not 0.0 < self.crop_scale <= 1.0:
            out.append(f"data.crop_scale={self.crop_scale} must be in (0, 1]")
        if self.num_workers < 0:
            out.append(f"data.num_workers={self.num_workers} must be >= 0")
        if self.max_pixels < 1:
            out.append(f"data.max_pixels={self.max_pixels} must be >= 1 (default 40000000)")
        if not self.max_aspect >= 1:
            out.append(f"data.max_aspect={self.max_aspect} must be >= 1 (default 20)")
        out.extend(band_config_problems(self.channels, self.band_mean, self.band_std, self.bands))
        return out


@dataclass
class BackboneConfig:
    """The pretrained model being adapted."""

    name: str = _help("timm model name or a registered test backbone", default="vit_small_patch14_dinov2")
    weights: str = _help(
        "'hub' (timm/HF hub), 'none' (random), 'offline' or 'offline:<source>' (pip-shipped weights), or a file path",
        default="hub",
    )
    img_size: int | None = _help("input resolution; null = the pretrained default", default=None)
    drop_path: float = _help("stochastic depth rate", default=0.0)
    grad_checkpointing: bool = _help("recompute activations in backward to save memory", default=False)
    in_chans: int | None = _help(
        "input bands of the model; null = 3 (photos), filled in from data.channels / data.bands for multi-band data",
        default=None,
    )
    rgb_bands: list[int] | None = _help(
        "RGB-pretrained weights on N != 3 input bands: which input bands (0-based, after data.bands) are red, green, "
        "blue. The first layer (patch embedding or first conv) is widened: the pretrained filter of each colour is "
        "copied to its band, every other band gets the mean of the three, and all are scaled by 3/N so a flat input "
        "gives the same activation. null = every band gets the mean (scaled by 3/N). Not used when the weights "
        "already have N bands (a `visiontune pretrain data.channels=N` backbone)", default=None,
    )

    def problems(self) -> list[str]:
        out = []
        if self.in_chans is not None and self.in_chans < 1:
            out.append(f"backbone.in_chans={self.in_chans} must be >= 1 (or null)")
        if self.rgb_bands is not None and (len(self.rgb_bands) != 3 or len(set(self.rgb_bands)) != 3):
            out.append(f"backbone.rgb_bands={list(self.rgb_bands)} must be three distinct input-band indices (red, green, "
                       "blue), e.g. [3,2,1] for Sentinel-2's 13 bands")
        if not self.name:
            out.append("backbone.name is empty; see `visiontune list backbones`")
        if self.img_size is not None and self.img_size < 8:
            out.append(f"backbone.img_size={self.img_size} is too small (>= 8, or null for the default)")
        if not 0.0 <= self.drop_path < 1.0:
            out.append(f"backbone.drop_path={self.drop_path} must be in [0, 1)")
        return out


@dataclass
class OptimConfig:
    """Optimisation: AdamW, linear warmup then cosine decay."""

    epochs: int = _help("training epochs", default=10)
    lr: float | None = _help("peak learning rate of the trained backbone/adapter parameters; null = method default", default=None)
    head_lr: float | None = _help("peak learning rate of the classification head; null = method default", default=None)
    weight_decay: float = _help("AdamW weight decay (not applied to biases, norms, embeddings tokens)", default=0.05)
    batch_size: int = _help("images per optimizer micro-step", default=32)
    grad_accum: int = _help("micro-steps per optimizer step (effective batch = batch_size * grad_accum)", default=1)
    warmup_epochs: float = _help("linear warmup length in epochs (fractions allowed)", default=1.0)
    min_lr_ratio: float = _help("final learning rate as a fraction of the peak", default=0.01)
    clip_grad: float | None = _help("max gradient norm; null disables clipping", default=1.0)
    label_smoothing: float = _help("cross-entropy label smoothing", default=0.1)
    class_weights: Literal["none", "balanced"] = _help(
        "balanced: weight the loss by n / (classes x n_class) of the training split, for imbalanced data", default="none"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _help(
        "autocast dtype; auto = bf16 on CUDA, fp32 on CPU (bf16 is emulated and slow on most CPUs)", default="auto"
    )
    eval_batch_size: int = _help("batch size for evaluation and feature extraction", default=64)
    head_init: Literal["probe", "zero"] = _help(
        "gradient methods on pretrained weights: 'probe' fits the head as a linear probe on the initial features "
        "first (LP-FT, Kumar et al. ICLR'22), 'zero' starts it at zero; random-init (scratch) runs always use zero",
        default="probe",
    )
    head_init_views: int = _help(
        "head_init=probe: views per training image the probe is fitted on; 1 = the clean eval view only, "
        ">1 adds augmented views (data.augment) so the head starts calibrated to what fine-tuning sees; measured "
        "to help or hurt by dataset (benchmarks/results/head-init-views), hence 1",
        default=1,
    )

    def problems(self) -> list[str]:
        out = optim_section_problems(self, ("epochs", "batch_size", "grad_accum", "eval_batch_size", "head_init_views"),
                                     "the method default")
        if self.warmup_epochs < 0:
            out.append(f"optim.warmup_epochs={self.warmup_epochs} must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            out.append(f"optim.label_smoothing={self.label_smoothing} must be in [0, 1)")
        return out


@dataclass
class MethodConfig:
    """Base of every method's options; subclasses add their own fields (see ``visiontune.methods``)."""

    name: str = _help("fine-tuning method (see `visiontune list methods`)", default="linear")

    size_only_fields: typing.ClassVar[tuple[str, ...]] = ()
    """Options that change tensor sizes or values but never whether a model can be built (LoRA's rank):
    ``sweep --dry-run`` checks runs that differ only in these once (:func:`visiontune.check.check_key`)."""

    def problems(self) -> list[str]:
        return []


class YamlConfig:
    """``to_dict`` / ``dump`` for a top-level config dataclass (fine-tuning runs and extended pretraining)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what ``config.yaml`` holds)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def dump(self, path: str | Path) -> Path:
        """Write the config as YAML to ``path``."""
        return write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclass
class Config(YamlConfig):
    """A whole run: ``run``, ``data``, ``backbone``, ``method``, ``optim``."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


_SECTIONS = {"run": RunConfig, "data": DataConfig, "backbone": BackboneConfig, "optim": OptimConfig}


# ----------------------------------------------------------------------------- dotted overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b=value"`` into (["a", "b"], value), the value parsed as YAML ("8" -> 8, "[q,v]" -> list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} has no '='; write it as section.key=value, e.g. method.name=lora")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; write it as section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; users mean a number.
        try:
            value = float(value) if any(ch.isdigit() for ch in value) and value.strip().lower() not in ("inf", "nan") else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested dict in place (and return it)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {k!r} is a value, not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``extra`` into a deep copy of ``base`` (extra wins); neither input is shared with the result,
    so later in-place overrides cannot leak back into a caller's dicts."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ----------------------------------------------------------------------------- typed construction

_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Convert ``value`` to type ``tp`` (from a dataclass annotation), recording a problem on failure."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        non_none = [a for a in args if a is not type(None)]
        sub: list[str] = []
        for a in non_none:
            sub = []
            out = _coerce(value, a, where, sub)
            if not sub:
                return out
        problems.extend(sub)
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            problems.append(f"{where}={value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, tuple):
        (inner,) = get_args(tp)[:1] or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}={value!r} should be a list")
            return value
        return [_coerce(v, inner, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).lower() in _BOOL_WORDS:
            return _BOOL_WORDS[str(value).lower()]
        problems.append(f"{where}={value!r} should be true or false")
        return value
    if tp is int:
        if isinstance(value, bool):
            problems.append(f"{where}={value!r} should be an integer")
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        problems.append(f"{where}={value!r} should be an integer")
        return value
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            problems.append(f"{where}={value!r} should be a number")
            return value
        if not math.isfinite(number):
            # NaN passes every `<`/`>` range check, and inf (also what 1e400 reads as) means "no limit" by accident.
            problems.append(f"{where}={value!r} should be a finite number")
            return value
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{where}={value!r} should be a string")
        return value
    return value


def build_dataclass(cls: type, data: dict[str, Any] | None, prefix: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from a dict, coercing types; unknown keys and bad values go to ``problems``."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" Did you mean {prefix}.{close[0]}?" if close else ""
            problems.append(f"unknown key {prefix}.{key}.{hint} Valid keys: {', '.join(fields)}")
            continue
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}", problems)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:  # a bad value that slipped through coercion
        problems.append(f"{prefix}: {e}")
        return cls()
    if hasattr(obj, "problems"):
        try:
            problems.extend(obj.problems())
        except TypeError as e:  # a field with a wrong type makes a check crash: already reported above
            if not problems:
                problems.append(f"{prefix}: {e}")
    return obj


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested dict; raises ConfigError listing all problems."""
    problems: list[str] = []
    data = dict(data or {})
    unknown = [k for k in data if k not in (*_SECTIONS, "method")]
    for k in unknown:
        close = difflib.get_close_matches(k, [*_SECTIONS, "method"], n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        problems.append(f"unknown section {k!r}.{hint} Valid sections: run, data, backbone, method, optim")
    sections = {}
    for name, cls in _SECTIONS.items():
        raw = data.get(name) or {}
        if not isinstance(raw, dict):
            problems.append(f"section {name!r} should be a mapping of keys, got {raw!r}")
            raw = {}
        sections[name] = build_dataclass(cls, raw, name, problems)
    raw_method = data.get("method") or {}
    if isinstance(raw_method, str):
        raw_method = {"name": raw_method}
    method_name = str(raw_method.get("name", MethodConfig.name))
    if method_name in METHODS:
        method_cls = METHODS.get(method_name).config_cls
        method_cfg = build_dataclass(method_cls, raw_method, "method", problems)
        problems.extend(METHODS.get(method_name).check_config(method_cfg, sections))
    else:
        problems.append(METHODS.unknown_message(method_name))
        method_cfg = MethodConfig(name=method_name)
    problems.extend(_input_band_problems(sections))
    if problems:
        raise ConfigError(problems)
    return Config(method=method_cfg, **sections)


def _input_band_problems(sections: dict[str, Any]) -> list[str]:
    """``backbone.in_chans`` filled in from the data's band count (in place), or why the two disagree."""
    data, backbone = sections["data"], sections["backbone"]
    if not isinstance(data, DataConfig) or not isinstance(backbone, BackboneConfig) or band_config_problems(
            data.channels, data.band_mean, data.band_std, data.bands):
        return []
    n = data.input_bands()
    if backbone.in_chans is None and data.channels is not None:
        backbone.in_chans = n
    if (backbone.in_chans or 3) != n:
        what = f"data.channels={data.channels}" + (f" with data.bands={data.bands}" if data.bands is not None else "")
        return [f"backbone.in_chans={backbone.in_chans} but the data gives {n} bands ({what if data.channels else 'photos'});"
                " leave backbone.in_chans=null (it follows the data)"]
    if backbone.rgb_bands is not None and any(not 0 <= b < n for b in backbone.rgb_bands):
        return [f"backbone.rgb_bands={list(backbone.rgb_bands)} must index the model's {n} input bands (0-based, after "
                "data.bands)"]
    return []


def read_config_file(path: str | Path, where: str) -> dict[str, Any]:
    """A YAML config file as a dict of sections; ConfigError (naming the file and the fix) otherwise.

    Args:
        path: the file.
        where: folder of example configs named in the "does not exist" message.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML file (see {where})")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(p)!r} should hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Load a YAML config (optional), apply dotted overrides, validate.

    Args:
        path: YAML file; may be None to start from defaults.
        overrides: ``["method.name=lora", "method.rank=8", ...]``.
        base: a dict merged under the file (used by sweeps).

    Raises:
        ConfigError: listing every problem found.
    """
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_config_file(path, "configs/"))
    if overrides:
        data = apply_overrides(data, list(overrides))
    return config_from_dict(data)
