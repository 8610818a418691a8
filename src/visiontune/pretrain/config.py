"""Configuration of extended self-supervised pretraining (ExPLoRA): dataclasses, the paper's recipe notation.

Sections: ``run``, ``data``, ``backbone`` (the same :class:`~visiontune.config.BackboneConfig` as
fine-tuning), ``explora`` (what trains: unfrozen blocks, LoRA rank/targets, norms), ``ssl`` (the
DINOv2 objective: heads, temperatures, centering, iBOT masking, KoLeo, teacher EMA), ``crops``
(multi-crop sizes and scales) and ``optim`` (steps, batch, learning rates). Loading reuses the run
config's YAML merge, dotted overrides and typed validation, so every problem is reported at once.

The paper names its variants ``D-ExPLoRA-[L]-r64``: objective (D = DINOv2, M = MAE), the 1-based
unfrozen blocks (L = the last one) and the LoRA rank. ``explora.recipe`` accepts that spelling and
fills ``ssl.objective``, ``explora.unfrozen`` and ``explora.rank`` from it; an explicit value that
contradicts the recipe is reported as a problem rather than silently winning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


from visiontune.config import (
    BackboneConfig, YamlConfig, _help, apply_overrides, build_dataclass, deep_merge, optim_section_problems,
    read_config_file, run_section_problems,
)
from visiontune.data.bands import band_config_problems
from visiontune.errors import ConfigError
from visiontune.methods.targets import target_problems

_RECIPE = re.compile(r"^(?:(?P<obj>[A-Za-z])-)?explora-\[(?P<blocks>[^\]]+)\]-r(?P<rank>\d+)$", re.IGNORECASE)
_OBJECTIVES = {"d": "dino", "m": "mae"}
_BLOCK_TOKEN = re.compile(r"^(?:(?P<num>\d+)|L(?:-(?P<back>\d+))?)$")


@dataclass(frozen=True)
class Recipe:
    """A parsed ``D-ExPLoRA-[1,L]-r64``: objective, unfrozen blocks (paper notation) and LoRA rank."""

    objective: str
    unfrozen: str
    rank: int

    @property
    def name(self) -> str:
        letter = {v: k for k, v in _OBJECTIVES.items()}[self.objective].upper()
        return f"{letter}-ExPLoRA-[{self.unfrozen}]-r{self.rank}"


def parse_recipe(text: str) -> Recipe:
    """Parse the paper's notation, e.g. ``D-ExPLoRA-[L]-r64`` or ``D-ExPLoRA-[1,L]-r32``.

    Raises:
        ConfigError: the text does not follow the notation, or names an unknown objective letter.
    """
    m = _RECIPE.match(str(text).strip())
    if not m:
        raise ConfigError(
            f"explora.recipe={text!r} is not in the paper's notation; write e.g. D-ExPLoRA-[L]-r64 or "
            "D-ExPLoRA-[1,L]-r64 (objective letter D=DINOv2 or M=MAE, 1-based unfrozen blocks with L = last, LoRA rank)"
        )
    letter = (m["obj"] or "D").lower()
    if letter not in _OBJECTIVES:
        raise ConfigError(f"explora.recipe={text!r}: objective letter {letter.upper()!r} is not D (DINOv2) or M (MAE)")
    problems = unfrozen_problems(m["blocks"])
    if problems:
        raise ConfigError(problems)
    return Recipe(_OBJECTIVES[letter], normalise_unfrozen(m["blocks"]), int(m["rank"]))


def normalise_unfrozen(spec: str) -> str:
    """``"[1, L]"`` -> ``"1,L"`` (no brackets or spaces)."""
    return ",".join(t.strip() for t in str(spec).strip().strip("[]").split(",") if t.strip())


def unfrozen_problems(spec: str) -> list[str]:
    """Syntax problems of ``explora.unfrozen`` (1-based block numbers, ``L`` = last, ``L-1`` = second to last)."""
    tokens = [t.strip() for t in str(spec).strip().strip("[]").split(",")]
    if str(spec).strip().strip("[]").strip().lower() == "none":
        return []
    bad = [t for t in tokens if not _BLOCK_TOKEN.match(t) or t == "0"]
    if bad or not tokens:
        return [
            f"explora.unfrozen={spec!r} is not a block list; use the paper's 1-based notation: L (last block), "
            "1,L (first and last), L-1,L, or none (LoRA everywhere)"
        ]
    return []


def resolve_unfrozen(spec: str, num_blocks: int) -> list[int]:
    """0-based indices of the blocks ``spec`` (paper notation, 1-based, ``L`` = last) names, sorted.

    Raises:
        ConfigError: bad syntax, or a block number beyond the model's depth.
    """
    problems = unfrozen_problems(spec)
    if problems:
        raise ConfigError(problems)
    text = normalise_unfrozen(spec)
    if text.lower() == "none":
        return []
    out: set[int] = set()
    for t in text.split(","):
        m = _BLOCK_TOKEN.match(t)
        idx = int(m["num"]) - 1 if m["num"] is not None else num_blocks - 1 - int(m["back"] or 0)
        if not 0 <= idx < num_blocks:
            raise ConfigError(
                f"explora.unfrozen={spec!r} names block {t}, but this backbone has {num_blocks} blocks (1..L={num_blocks})"
            )
        out.add(idx)
    return sorted(out)


# ----------------------------------------------------------------------------- sections


@dataclass
class PretrainRunConfig:
    """Where and how the pretraining run executes."""

    dir: str = _help("parent folder of pretraining run directories", default="runs/pretrain")
    name: str | None = _help("run directory name; default: <dataset>-<backbone>-<recipe>", default=None)
    seed: int = _help("seed of heads, LoRA init, crops, masks and data order", default=0)
    device: str = _help("'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1' ...", default="auto")
    threads: int | None = _help("torch CPU threads; default: torch's choice", default=None)
    progress: bool = _help("show a progress bar", default=True)
    resume: bool = _help(
        "continue from run_dir/checkpoint/last.safetensors (refused if the config or the images differ)", default=False
    )
    overwrite: bool = _help("delete an existing run directory and start in an empty one", default=False)
    checkpoint_every: int = _help("save a resumable checkpoint every N steps (and at the end, and on Ctrl-C)", default=50)
    plot: bool = _help("write loss.png (loss curves and collapse diagnostics) at the end", default=True)
    save: Literal["teacher", "student"] = _help(
        "which network becomes the new backbone: the EMA teacher (DINOv2 evaluates the teacher) or the student",
        default="teacher",
    )

    def problems(self) -> list[str]:
        out = run_section_problems(self)
        if self.checkpoint_every < 1:
            out.append(f"run.checkpoint_every={self.checkpoint_every} must be >= 1")
        return out


@dataclass
class PretrainDataConfig:
    """Unlabeled target-domain images (labels, where the source has them, are never read)."""

    dataset: str = _help(
        "built-in dataset name (labels ignored), a folder of images (flat or nested) or of .npy/.tif arrays, "
        "or a CSV manifest", default=""
    )
    root: str | None = _help("folder holding a built-in dataset's files, if not the default", default=None)
    exclude_eval_of: str | None = _help(
        "a run config (YAML) whose val and test images are left out of pretraining, so evaluating on them "
        "later stays clean", default=None,
    )
    max_images: int | None = _help("use at most this many images (a seeded random subset)", default=None)
    channels: int | None = _help(
        "null = RGB images; C = multi-band arrays (.npy, or .tif with tifffile) with C bands, read as HxWxC or "
        "CxHxW, with a new C-channel patch embedding trained from scratch", default=None,
    )
    band_mean: list[float] | None = _help("per-band mean for multi-band data; null = measured on the data", default=None)
    band_std: list[float] | None = _help("per-band std for multi-band data; null = measured on the data", default=None)
    num_workers: int = _help("DataLoader worker processes", default=0)

    def problems(self) -> list[str]:
        out = []
        if not self.dataset:
            out.append("data.dataset is empty; set it to a built-in name, an image/array folder or a CSV manifest")
        if self.max_images is not None and self.max_images < 2:
            out.append(f"data.max_images={self.max_images} must be >= 2 (KoLeo and centering need a batch)")
        out.extend(band_config_problems(self.channels, self.band_mean, self.band_std))
        if self.num_workers < 0:
            out.append(f"data.num_workers={self.num_workers} must be >= 0")
        return out


@dataclass
class ExploraConfig:
    """What trains during extended pretraining (everything else stays frozen)."""

    recipe: str | None = _help(
        "the paper's notation, e.g. D-ExPLoRA-[L]-r64 or D-ExPLoRA-[1,L]-r64; fills ssl.objective, "
        "explora.unfrozen and explora.rank", default=None,
    )
    unfrozen: str = _help("blocks trained in full, 1-based as in the paper: L (last), 1,L, L-1,L, or none", default="L")
    rank: int = _help("LoRA rank on the other blocks", default=64)
    alpha: float | None = _help("LoRA alpha; null = 2*sqrt(8*rank), the LoRA method's default", default=None)
    targets: list[str] = field(
        default_factory=lambda: ["qv"],
        metadata={"help": "LoRA targets in the other blocks (presets of method.targets); the paper: q and v"},
    )
    dropout: float = _help("LoRA dropout", default=0.0)
    norms: bool = _help("unfreeze every normalisation layer (the paper: yes)", default=True)

    def problems(self) -> list[str]:
        out = []
        if self.recipe is not None:
            try:
                parse_recipe(self.recipe)
            except ConfigError as e:
                out.extend(e.problems if hasattr(e, "problems") else [str(e)])
        out.extend(unfrozen_problems(self.unfrozen))
        if self.rank < 1:
            out.append(f"explora.rank={self.rank} must be >= 1")
        if self.alpha is not None and self.alpha <= 0:
            out.append(f"explora.alpha={self.alpha} must be > 0 (or null)")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"explora.dropout={self.dropout} must be in [0, 1)")
        out.extend(p.replace("method.targets", "explora.targets") for p in target_problems(list(self.targets or [])))
        return out


@dataclass
class SSLConfig:
    """The self-supervised objective: DINOv2's self-distillation (DINO + iBOT + KoLeo) with an EMA teacher."""

    objective: Literal["dino", "mae"] = _help(
        "dino = DINOv2 self-distillation; mae is not available (timm ships no MAE decoder weights)", default="dino"
    )
    prototypes: int = _help("output size K of the DINO/iBOT head (DINOv2: 65536)", default=65536)
    head_hidden_dim: int = _help("hidden width of the head MLP", default=2048)
    head_bottleneck_dim: int = _help("bottleneck before the L2-normalised prototype layer", default=256)
    head_layers: int = _help("linear layers of the head MLP before the bottleneck output", default=3)
    student_temp: float = _help("student softmax temperature", default=0.1)
    teacher_temp: float = _help("teacher temperature after warmup (sharpening)", default=0.07)
    warmup_teacher_temp: float = _help("teacher temperature at step 0", default=0.04)
    teacher_temp_warmup: float = _help("fraction of the steps over which the teacher temperature warms up", default=0.3)
    centering: Literal["center", "sinkhorn"] = _help(
        "teacher centering: EMA center subtraction (DINO) or Sinkhorn-Knopp (DINOv2 large models)", default="center"
    )
    center_momentum: float = _help("EMA momentum of the teacher centers", default=0.9)
    dino_weight: float = _help("weight of the image-level DINO loss", default=1.0)
    ibot_weight: float = _help("weight of the masked-patch iBOT loss (0 disables masking)", default=1.0)
    koleo_weight: float = _help("weight of the KoLeo regulariser on student class tokens", default=0.1)
    mask_probability: float = _help("fraction of global crops that get a patch mask", default=0.5)
    mask_ratio: list[float] = field(
        default_factory=lambda: [0.1, 0.5], metadata={"help": "[min, max] fraction of patches masked in a masked crop"}
    )
    teacher_momentum: float = _help("EMA momentum of the teacher at step 0 (cosine to final_teacher_momentum)", default=0.992)
    final_teacher_momentum: float = _help("EMA momentum at the last step", default=1.0)
    freeze_last_layer: float = _help("fraction of the steps during which the head's prototype layer is frozen", default=0.01)
    head_warmup_steps: int = _help(
        "first steps train the fresh heads only (backbone frozen), so random heads do not push noise into "
        "pretrained features; 0 = the paper's recipe", default=0,
    )

    def problems(self) -> list[str]:
        out = []
        for key in ("prototypes", "head_hidden_dim", "head_bottleneck_dim"):
            if getattr(self, key) < 1:
                out.append(f"ssl.{key}={getattr(self, key)} must be >= 1")
        if self.head_layers < 1:
            out.append(f"ssl.head_layers={self.head_layers} must be >= 1")
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(self, key) <= 0:
                out.append(f"ssl.{key}={getattr(self, key)} must be > 0")
        for key in ("teacher_temp_warmup", "center_momentum", "mask_probability", "freeze_last_layer"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                out.append(f"ssl.{key}={getattr(self, key)} must be in [0, 1]")
        for key in ("dino_weight", "ibot_weight", "koleo_weight"):
            if getattr(self, key) < 0:
                out.append(f"ssl.{key}={getattr(self, key)} must be >= 0")
        if self.dino_weight == 0 and self.ibot_weight == 0:
            out.append("ssl.dino_weight and ssl.ibot_weight are both 0: nothing would be learned")
        if len(self.mask_ratio) != 2 or not 0.0 <= self.mask_ratio[0] <= self.mask_ratio[1] <= 1.0:
            out.append(f"ssl.mask_ratio={self.mask_ratio} must be [min, max] with 0 <= min <= max <= 1")
        if not 0.0 <= self.teacher_momentum <= self.final_teacher_momentum <= 1.0:
            out.append(
                f"ssl.teacher_momentum={self.teacher_momentum} and ssl.final_teacher_momentum={self.final_teacher_momentum} "
                "must satisfy 0 <= start <= final <= 1"
            )
        if self.head_warmup_steps < 0:
            out.append(f"ssl.head_warmup_steps={self.head_warmup_steps} must be >= 0")
        return out


@dataclass
class CropsConfig:
    """DINOv2 multi-crop: two global crops (teacher and student) and several small local crops (student only)."""

    global_size: int | None = _help("global crop size; null = backbone.img_size (or the model's default)", default=None)
    global_scale: list[float] = field(
        default_factory=lambda: [0.32, 1.0], metadata={"help": "area range of a global crop (DINOv2: 0.32-1)"}
    )
    local_number: int = _help("local crops per image (DINOv2: 8; 0 = global crops only)", default=8)
    local_size: int | None = _help("local crop size; null = 7/16 of the global size, rounded to whole patches", default=None)
    local_scale: list[float] = field(
        default_factory=lambda: [0.05, 0.32], metadata={"help": "area range of a local crop (DINOv2: 0.05-0.32)"}
    )
    photometric: bool = _help("colour jitter, grayscale, blur and solarisation (RGB only), as DINOv2", default=True)

    def problems(self) -> list[str]:
        out = []
        for key in ("global_size", "local_size"):
            v = getattr(self, key)
            if v is not None and v < 8:
                out.append(f"crops.{key}={v} is too small (>= 8, or null)")
        if self.local_number < 0:
            out.append(f"crops.local_number={self.local_number} must be >= 0")
        for key in ("global_scale", "local_scale"):
            v = getattr(self, key)
            if len(v) != 2 or not 0.0 < v[0] <= v[1] <= 1.0:
                out.append(f"crops.{key}={v} must be [min, max] with 0 < min <= max <= 1")
        return out


@dataclass
class PretrainOptimConfig:
    """AdamW, linear warmup then cosine decay, counted in optimizer steps."""

    steps: int = _help("optimizer steps (each sees optim.batch_size images)", default=1000)
    batch_size: int = _help("images per step (each gives 2 global + crops.local_number local crops)", default=32)
    lr: float | None = _help("peak lr of the trained backbone parameters; null = DINOv2's 0.004*sqrt(batch/1024)", default=None)
    head_lr: float | None = _help("peak lr of the fresh SSL heads; null = optim.lr", default=None)
    weight_decay: float = _help("AdamW weight decay (not on biases, norms, tokens)", default=0.04)
    warmup: float = _help("fraction of the steps spent in linear lr warmup", default=0.1)
    min_lr_ratio: float = _help("final lr as a fraction of the peak", default=0.01)
    clip_grad: float | None = _help("max gradient norm (DINOv2: 3.0); null disables", default=3.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _help("autocast dtype; auto = bf16 on CUDA, fp32 on CPU", default="auto")

    def problems(self) -> list[str]:
        out = optim_section_problems(self, ("steps", "batch_size"), "the default")
        if self.batch_size == 1:
            out.append("optim.batch_size=1 leaves KoLeo without a neighbour; use >= 2")
        if not 0.0 <= self.warmup < 1.0:
            out.append(f"optim.warmup={self.warmup} must be in [0, 1)")
        return out

    def resolved_lr(self) -> float:
        """``lr``, or DINOv2's square-root scaling of its base lr 0.004 at batch 1024."""
        return float(self.lr) if self.lr is not None else 0.004 * (self.batch_size / 1024) ** 0.5


@dataclass
class PretrainConfig(YamlConfig):
    """A whole extended-pretraining run."""

    run: PretrainRunConfig = field(default_factory=PretrainRunConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    explora: ExploraConfig = field(default_factory=ExploraConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    optim: PretrainOptimConfig = field(default_factory=PretrainOptimConfig)

    def recipe_name(self) -> str:
        """The paper's name of this configuration, e.g. ``D-ExPLoRA-[L]-r64``."""
        return Recipe(self.ssl.objective, normalise_unfrozen(self.explora.unfrozen), self.explora.rank).name


SECTIONS: dict[str, type] = {
    "run": PretrainRunConfig, "data": PretrainDataConfig, "backbone": BackboneConfig, "explora": ExploraConfig,
    "ssl": SSLConfig, "crops": CropsConfig, "optim": PretrainOptimConfig,
}


def _apply_recipe(data: dict[str, Any], problems: list[str]) -> None:
    """Fill objective / unfrozen / rank from ``explora.recipe``; explicit contradictions become problems."""
    explora = data.get("explora")
    if not isinstance(explora, dict) or not explora.get("recipe"):
        return
    try:
        recipe = parse_recipe(str(explora["recipe"]))
    except ConfigError:
        return  # reported by ExploraConfig.problems
    ssl = data.setdefault("ssl", {}) if isinstance(data.get("ssl", {}), dict) else {}
    pairs = [(explora, "unfrozen", recipe.unfrozen, "explora"), (explora, "rank", recipe.rank, "explora"),
             (ssl, "objective", recipe.objective, "ssl")]
    for section, key, value, prefix in pairs:
        if key in section and section[key] is not None:
            given = normalise_unfrozen(section[key]) if key == "unfrozen" else section[key]
            if str(given) != str(value):
                problems.append(
                    f"{prefix}.{key}={section[key]!r} contradicts explora.recipe={explora['recipe']!r} "
                    f"(which means {key}={value!r}); drop one of them, e.g. add explora.recipe=null"
                )
                continue
        section[key] = value


def pretrain_config_from_dict(data: dict[str, Any]) -> PretrainConfig:
    """Build and validate a :class:`PretrainConfig` from a nested dict; raises ConfigError listing all problems."""
    import difflib

    problems: list[str] = []
    data = deep_merge({}, dict(data or {}))
    for k in data:
        if k not in SECTIONS:
            close = difflib.get_close_matches(k, list(SECTIONS), n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            problems.append(f"unknown section {k!r}.{hint} Valid sections: {', '.join(SECTIONS)}")
    _apply_recipe(data, problems)
    sections = {}
    for name, cls in SECTIONS.items():
        raw = data.get(name) or {}
        if not isinstance(raw, dict):
            problems.append(f"section {name!r} should be a mapping of keys, got {raw!r}")
            raw = {}
        sections[name] = build_dataclass(cls, raw, name, problems)
    if not problems:
        if sections["ssl"].objective == "mae":
            problems.append(
                "ssl.objective=mae (M-ExPLoRA) is not available: it needs a pretrained MAE decoder, which timm does "
                "not ship; use ssl.objective=dino (D-ExPLoRA)"
            )
        if sections["crops"].photometric and sections["data"].channels is not None:
            problems.append("crops.photometric=true applies to RGB images only; set crops.photometric=false for multi-band data")
    if problems:
        raise ConfigError(problems)
    return PretrainConfig(**sections)


def load_pretrain_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Load a pretraining YAML config (optional), apply dotted overrides, validate.

    Args:
        path: YAML file (``configs/pretrain/*.yaml``); None starts from defaults.
        overrides: ``["optim.steps=300", "explora.recipe=D-ExPLoRA-[1,L]-r32", ...]``.

    Raises:
        ConfigError: listing every problem found.
    """
    data: dict[str, Any] = read_config_file(path, "configs/pretrain/") if path is not None else {}
    if overrides:
        data = apply_overrides(data, list(overrides))
    return pretrain_config_from_dict(data)
