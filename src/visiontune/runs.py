"""Run directories: writing a finished run, and loading one back for evaluation or prediction.

A run directory holds ``config.yaml`` (resolved), ``labels.json``, ``adapter.safetensors`` (only
what was trained, plus the head, with the backbone identity in its metadata), ``metrics.json``,
``report.md``, plots and ``checkpoint/``. Every file is written atomically (:mod:`visiontune.atomic`),
``metrics.json`` last: its presence (readable) is what "finished" means (:func:`inspect_run`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from visiontune.atomic import atomic_write, write_json_atomic
from visiontune.config import Config, config_from_dict, load_config
from visiontune.errors import ConfigError, WeightsError
from visiontune.methods import Method
from visiontune.registry import METHODS
from visiontune.rundir import (
    RunDirState, RunKind, config_differences, exists_check, json_check, read_json, read_yaml_mapping, yaml_check,
)
from visiontune.backbones import backbone_identity, build_transform, create_backbone, set_band_preprocessing
from visiontune.data import ImageRecords
from visiontune.data.bands import band_statistics
from visiontune.data.splits import split_differences
from visiontune.eval import plot_confusion, plot_history, write_report
from visiontune.methods.base import classifier_of

ADAPTER_FILE = "adapter.safetensors"
FORMAT_VERSION = 1
METRICS_FILE = "metrics.json"

FINISHED_FILES = {
    METRICS_FILE: json_check(lambda m: isinstance(m, dict) and isinstance(m.get("test"), dict), "'test' metrics"),
    "config.yaml": yaml_check,
    "labels.json": json_check(lambda c: isinstance(c, list) and all(isinstance(x, str) for x in c), "list of class names"),
    ADAPTER_FILE: exists_check,
}
"""Every file of a finished run, with the check that it reads back (``metrics.json`` first: written last)."""

NEUTRAL_KEYS = (
    "run.dir", "run.progress", "run.threads", "run.resume", "run.overwrite", "run.tensorboard", "run.measure_speed",
    "run.plots",
)
"""Settings that may differ when a run is resumed or a sweep reuses a finished run: none of them changes
what is trained or its test scores (where the run folder sits, progress bars, torch CPU threads, the
resume/overwrite switches, TensorBoard logging, the post-training speed measurement, the plots)."""


RUN_KIND = "train"
"""The manifest kind of a fine-tuning run directory (:func:`visiontune.atomic.claim_folder`)."""

RUN_MAKES = (
    *FINISHED_FILES, "report.md", "confusion.png", "history.png", "checkpoint", "tensorboard",
)
"""Every top-level entry a fine-tuning run writes: what an older run without a manifest may have deleted."""


def default_run_name(cfg: Config) -> str:
    """``<dataset>-<backbone>-<method>-<time>``: the run name when ``run.name`` is unset."""
    ds = Path(cfg.data.dataset).stem if os.sep in cfg.data.dataset else cfg.data.dataset
    return f"{ds}-{cfg.backbone.name}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"


class TrainRuns(RunKind):
    """Fine-tuning run directories (the rules: :mod:`visiontune.rundir`); the data's identity is the split
    (:func:`visiontune.data.splits.split_identity`)."""

    kind = RUN_KIND
    finished_files = FINISHED_FILES
    makes = RUN_MAKES
    data_key = "split"

    def path(self, cfg: Config) -> Path:
        return Path(cfg.run.dir) / (cfg.run.name or default_run_name(cfg))

    def is_config(self, stored: dict[str, Any]) -> bool:
        config_from_dict(stored)  # raises ConfigError for anything that is not a fine-tuning run's config
        return True

    def config_changes(self, stored: dict[str, Any], cfg: Config) -> list[str]:
        return config_changes(stored, cfg)

    def data_changes(self, stored: Any, data: dict[str, Any]) -> list[str]:
        return split_differences(stored, data)

    def finished(self, run_dir: Path, cfg: Config, data: dict[str, Any]) -> tuple[list[str], Any]:
        changes = finished_run_changes(run_dir, cfg, data)
        return changes, (read_json(run_dir / METRICS_FILE)[0] if not changes else None)


TRAIN_RUNS = TrainRuns()
"""The fine-tuning kind of run directory."""


def inspect_run(run_dir: str | Path) -> RunDirState:
    """The state of a fine-tuning run directory (see :mod:`visiontune.rundir`)."""
    return TRAIN_RUNS.inspect(run_dir)


def config_changes(stored: dict[str, Any], cfg: Config) -> list[str]:
    """Differences (one line per dotted key) between a stored resolved config and ``cfg``, except NEUTRAL_KEYS.

    The stored dict is validated first, so both sides carry the same defaults and types.
    """
    try:
        stored_cfg = config_from_dict(stored).to_dict()
    except ConfigError as e:
        return [f"the stored configuration is not valid in this version of visiontune ({e})"]
    return config_differences(stored_cfg, cfg.to_dict(), NEUTRAL_KEYS)


def finished_run_changes(run_dir: str | Path, cfg: Config, split: dict[str, Any] | None = None) -> list[str]:
    """How a finished run's ``config.yaml`` (and data split, when ``split`` is given) differ from ``cfg``."""
    run_dir = Path(run_dir)
    stored, problem = read_yaml_mapping(run_dir / "config.yaml")
    if problem:
        return [problem]
    out = config_changes(stored, cfg)
    if split is not None:
        metrics, problem = read_json(run_dir / METRICS_FILE)
        out += [problem] if problem else split_differences(((metrics or {}).get("run") or {}).get("split"), split)
    return out


def save_adapter(path: Path, method: Method, model: nn.Module, identity: dict[str, Any], classes: list[str]) -> Path:
    """Write the trained parameters + head with the backbone identity and labels in the file's metadata."""
    from safetensors.torch import save_file

    # Cloned: split q/k/v weights are views of one tensor, which safetensors refuses to write as such.
    state = {k: v.detach().clone().contiguous() for k, v in method.trainable_state_dict(model).items()}
    meta = {
        "visiontune": json.dumps(
            {"format": FORMAT_VERSION, "method": method.name, "backbone_identity": identity, "classes": classes}
        )
    }
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and visiontune metadata of an adapter file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise WeightsError(f"adapter file {str(path)!r} does not exist; is this a finished visiontune run directory?")
    # A pickle renamed to .safetensors, a truncated copy or a file of another tool: safetensors parses the
    # header only (nothing is executed) and any failure is the same one clear error.
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("visiontune", "{}"))
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 -- SafetensorError, OSError, JSON and UTF-8 errors alike
        raise WeightsError(
            f"adapter file {str(path)!r} is not a readable safetensors adapter ({type(e).__name__}: "
            f"{str(e).strip()[:200]}); retrain the run (run.overwrite=true) or restore the file from a copy"
        ) from None
    if not isinstance(meta, dict):
        raise WeightsError(f"adapter file {str(path)!r} has no visiontune metadata; it was not written by visiontune")
    return tensors, meta


def run_labels(run_dir: str | Path, adapter_meta: dict[str, Any] | None = None) -> list[str]:
    """The class names of a run (``labels.json``), checked against the ones stored with its adapter.

    ``labels.json`` gives the order of the logits to anyone reading the run; the adapter file records the
    classes it was trained with. A reordered, edited or swapped ``labels.json`` would mislabel every prediction
    silently, so both must agree.

    Raises:
        ConfigError: labels.json is missing or not a list of names, or differs from the adapter's classes
            (naming both files).
    """
    run_dir = Path(run_dir)
    classes, problem = read_json(run_dir / "labels.json")
    if problem or not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise ConfigError(f"{problem or f'{run_dir}/labels.json is not a list of class names'}; "
                          "the run did not finish writing it: rerun it with run.resume=true, or run.overwrite=true")
    stored = (adapter_meta or {}).get("classes")
    if stored is not None and stored != classes:
        if len(stored) != len(classes):
            diff = f"{len(classes)} classes in labels.json, {len(stored)} in the adapter"
        else:
            i = next(i for i, (a, b) in enumerate(zip(classes, stored)) if a != b)
            diff = f"position {i}: {classes[i]!r} in labels.json, {stored[i]!r} in the adapter"
        raise ConfigError(
            f"{run_dir / 'labels.json'} does not match the classes stored in {run_dir / ADAPTER_FILE} ({diff}); "
            f"predictions would be mislabelled. Restore labels.json from the adapter's classes ({stored}) or retrain"
        )
    return classes


def check_identity(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Refuse an adapter trained on another backbone (name, weights hash or image size differ)."""
    diffs = [
        f"{k}: adapter has {saved.get(k)!r}, backbone has {current.get(k)!r}"
        for k in ("name", "sha256", "img_size")
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise WeightsError(
            f"{where} was trained on a different backbone ({'; '.join(diffs)}); "
            "load it with the backbone it was trained on (see its config.yaml)"
        )


def finish_run(
    run_dir: Path, method: Method, model: nn.Module, identity: dict[str, Any], metrics: dict[str, Any], plots: bool = True,
) -> None:
    """Write adapter, plots (unless ``plots`` is False), report.md and, last, metrics.json into ``run_dir`` (each
    atomically).

    metrics.json goes last because its presence marks a finished run: a run killed while finishing
    is then unfinished (and resumable), never "finished" with files missing.
    """
    classes = metrics["run"]["classes"]
    save_adapter(run_dir / ADAPTER_FILE, method, model, identity, classes)
    if plots:
        plot_confusion(metrics["test"]["confusion"], classes, run_dir / "confusion.png", title=f"{metrics['run']['method']} — test")
    if plots and len(metrics["train"]["history"]) > 1:
        plot_history(metrics["train"]["history"], run_dir / "history.png")
    write_report(run_dir, metrics)
    write_json_atomic(run_dir / METRICS_FILE, metrics)


def with_band_statistics(cfg: Config, train: ImageRecords) -> Config:
    """``cfg`` with ``data.band_mean`` / ``data.band_std`` computed from the training split where null (multi-band
    data only; photos and given statistics are returned unchanged). The run's config.yaml then records them, so
    evaluation, prediction, the service and the export normalise with the same numbers."""
    data = cfg.data
    if data.channels is None or (data.band_mean is not None and data.band_std is not None):
        return cfg
    mean, std = band_statistics(train.items, int(data.channels), seed=data.seed, ids=train.ids, limits=data.image_limits())
    data = dataclasses.replace(data, band_mean=data.band_mean or mean, band_std=data.band_std or std)
    return dataclasses.replace(cfg, data=data)


def build_model(cfg: Config, method: Method, num_classes: int) -> nn.Module:
    """Backbone + method applied, with the torch RNG seeded from ``run.seed`` first.

    Seeding here makes random-init parts (a scratch backbone, a frozen random backbone under a probe,
    freshly initialised adapter matrices) identical when a run is rebuilt for evaluation or serving,
    which only saves the trained parameters.
    """
    return method.apply(build_backbone(cfg, num_classes))


def build_backbone(cfg: Config, num_classes: int) -> nn.Module:
    """The run's backbone with a zeroed head, before the method is applied (torch RNG seeded from ``run.seed``)."""
    torch.manual_seed(cfg.run.seed)
    model = create_backbone(cfg.backbone, num_classes=num_classes)
    set_band_preprocessing(model, cfg.data.band_spec())  # multi-band data: its statistics travel with the model
    zero_head(model)
    return model


def zero_head(model: nn.Module) -> None:
    """Start the fresh classifier at zero, so the first logits are uniform (loss = ln K).

    PyTorch's default Linear init on large-norm pretrained features (DINOv2: logit std ~1.2) starts
    above chance loss and spends the first steps of a few-shot budget undoing it; zero init is the
    MAE / DINOv2 fine-tuning habit. A zero head still receives gradients, so the body learns from step 2.
    """
    head = classifier_of(model)
    if isinstance(head, nn.Linear):
        with torch.no_grad():
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()


@dataclass
class LoadedRun:
    """A trained run in memory: model (eval mode), its config, labels, method and eval transform."""

    model: nn.Module
    config: Config
    classes: list[str]
    method: Method
    transform: Callable[[Any], torch.Tensor]
    identity: dict[str, Any]
    run_dir: Path
    merged: bool = False
    """Whether ``model`` has the adapters folded in (False also when the method has nothing to fold)."""


def load_run(run_dir: str | Path, device: str = "cpu", merge: bool = True) -> LoadedRun:
    """Rebuild the backbone, re-apply the method and load the adapter of a finished run.

    With ``merge``, a method that can build its merged model straight from the saved tensors does so
    (:meth:`~visiontune.methods.base.Method.load_merged`: LoRA/DoRA fold ``B A`` into the weights without
    building peft's layers, so predicting with a LoRA run imports neither peft nor, for LoRA/DoRA,
    bitsandbytes); otherwise the method is applied, the adapter loaded and :meth:`~Method.merge` called.

    Args:
        run_dir: a run directory written by :func:`visiontune.train`.
        device: where to put the model.
        merge: fold adapters into the backbone for fast inference when the method allows.

    Raises:
        ConfigError: not a run directory. WeightsError: adapter/backbone mismatch.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a visiontune run directory (no config.yaml); pass runs/<name>")
    cfg = load_config(run_dir / "config.yaml")
    state, meta = read_adapter(run_dir / ADAPTER_FILE)
    classes = run_labels(run_dir, meta)
    identity = backbone_identity(cfg.backbone)
    check_identity(meta.get("backbone_identity", {}), identity, str(run_dir / ADAPTER_FILE))
    method: Method = METHODS.get(cfg.method.name)(cfg.method)
    model = method.load_merged(build_backbone(cfg, len(classes)), state) if merge else None
    merged = model is not None
    if model is not None:
        model = model.to(device).eval()
    else:
        model = build_model(cfg, method, len(classes))
        method.load_trainable_state_dict(model, state)
        model = model.to(device).eval()
        if merge:
            unmerged, model = model, method.merge(model)
            merged = model is not unmerged  # Method.merge returns the model itself when there is nothing to fold
    transform = build_transform(model, train=False)  # the model records backbone.img_size (create_backbone)
    return LoadedRun(model, cfg, classes, method, transform, identity, run_dir, merged)
