"""A pretraining run's directory: its files, the rules for reusing it, and reading its backbone back.

A finished run holds ``backbone.safetensors`` (LoRA merged: a plain timm state dict that ``backbone.weights=<path>``
loads for any fine-tuning method), ``backbone.json`` (lineage: base weights, data, steps, recipe; written last),
``history.json``, ``loss.png``, ``config.yaml`` and ``checkpoint/``. The directory follows the rules of
:mod:`visiontune.rundir`, as a fine-tuning run's does (:data:`PRETRAIN_RUNS`); the data's identity is the
fingerprint of the unlabeled image pool (:func:`pool_identity`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from visiontune.atomic import atomic_write
from visiontune.backbones import create_backbone
from visiontune.backbones.factory import _resolve_name
from visiontune.config import BackboneConfig
from visiontune.errors import ConfigError
from visiontune.pretrain.config import PretrainConfig, pretrain_config_from_dict
from visiontune.pretrain.crops import UnlabeledImages
from visiontune.rundir import RunDirState, RunKind, config_differences, exists_check, json_check, read_json, yaml_check

BACKBONE_FILE = "backbone.safetensors"
LINEAGE_FILE = "backbone.json"
LINEAGE_FORMAT = 1

FINISHED_FILES = {
    LINEAGE_FILE: json_check(lambda m: isinstance(m, dict) and isinstance(m.get("backbone"), dict), "'backbone' section"),
    BACKBONE_FILE: exists_check,
    "config.yaml": yaml_check,
    "history.json": json_check(lambda h: isinstance(h, list), "list of steps"),
}
"""Every file of a finished pretraining run (``backbone.json`` first: it is written last)."""

PRETRAIN_KIND = "pretrain"
"""The manifest kind of a pretraining run directory (:func:`visiontune.atomic.claim_folder`)."""
PRETRAIN_MAKES = (*FINISHED_FILES, "loss.png", "checkpoint", "tensorboard")
"""Every top-level entry a pretraining run writes (its exported backbones aside, which a user keeps)."""

NEUTRAL_KEYS = (
    "run.dir", "run.progress", "run.threads", "run.resume", "run.overwrite", "run.checkpoint_every", "run.plot",
)
"""Settings a resumed pretraining run may change: none changes the trained backbone."""


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns.

    Attributes:
        run_dir: the run directory.
        backbone: the new backbone file (use it as ``backbone.weights``).
        lineage: the contents of ``backbone.json``.
        history: one row of losses and schedules per step.
    """

    run_dir: Path
    backbone: Path
    lineage: dict[str, Any]
    history: list[dict[str, Any]]

    def overrides(self) -> list[str]:
        """The fine-tuning overrides that select this backbone."""
        chans = int(self.lineage["backbone"].get("in_chans", 3))
        return [f"backbone.name={self.lineage['backbone']['name']}", f"backbone.weights={self.backbone}",
                f"backbone.img_size={self.lineage['backbone']['img_size']}", *([f"data.channels={chans}"] if chans != 3 else [])]


def pool_identity(pool: UnlabeledImages) -> dict[str, Any]:
    """A fingerprint of the pretraining images (their ids, in order), checked when a run is resumed."""
    h = hashlib.sha256()
    for i in pool.ids:
        h.update(f"{i}\n".encode())
    return {"sha256": h.hexdigest(), "images": len(pool)}


class PretrainRuns(RunKind):
    """Pretraining run directories (the rules: :mod:`visiontune.rundir`)."""

    kind = PRETRAIN_KIND
    unit = "pretraining run"
    finished_files = FINISHED_FILES
    makes = PRETRAIN_MAKES
    data_key = "pool"

    def path(self, cfg: PretrainConfig) -> Path:
        name = cfg.run.name
        if not name:
            ds = Path(cfg.data.dataset).name or "data"
            recipe = re.sub(r"[\[\]]", "", cfg.recipe_name()).replace(",", "+")
            name = f"{ds}-{cfg.backbone.name}-{recipe}"
        return Path(cfg.run.dir) / name

    def is_config(self, stored: dict[str, Any]) -> bool:
        pretrain_config_from_dict(stored)  # raises for anything that is not a pretraining run's config
        return True

    def config_changes(self, stored: dict[str, Any] | None, cfg: PretrainConfig) -> list[str]:
        """How a stored pretraining config differs from ``cfg`` (except NEUTRAL_KEYS)."""
        try:
            stored_dict = pretrain_config_from_dict(stored or {}).to_dict()
        except ConfigError as e:
            return [f"the stored configuration is not valid in this version of visiontune ({e})"]
        return config_differences(stored_dict, cfg.to_dict(), NEUTRAL_KEYS)

    def data_changes(self, stored: Any, pool_id: dict[str, Any]) -> list[str]:
        if not isinstance(stored, dict) or stored.get("sha256") == pool_id["sha256"]:
            return []
        return [(f"pretraining images: {stored.get('images')} (sha256 {str(stored.get('sha256'))[:12]}) in the stored run, "
                 f"{pool_id['images']} (sha256 {pool_id['sha256'][:12]}) now: the dataset's files changed")]

    def finished(self, run_dir: Path, cfg: PretrainConfig, pool_id: dict[str, Any]) -> tuple[list[str], Any]:
        lineage, _ = read_json(run_dir / LINEAGE_FILE)
        history, _ = read_json(run_dir / "history.json")
        changes = self.config_changes(lineage.get("config"), cfg) + self.data_changes(lineage.get("data", {}).get("pool"), pool_id)
        return changes, PretrainResult(run_dir, run_dir / BACKBONE_FILE, lineage, history)


PRETRAIN_RUNS = PretrainRuns()
"""The pretraining kind of run directory."""


def inspect_pretrain_run(run_dir: Path) -> RunDirState:
    """The state of a pretraining run directory (see :mod:`visiontune.rundir`)."""
    return PRETRAIN_RUNS.inspect(run_dir)


def plot_history(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss curves (total, DINO, iBOT, KoLeo; raw and smoothed) and the teacher feature spread per step.

    Returns:
        The written PNG path.
    """
    from matplotlib.figure import Figure

    steps = np.array([r["step"] for r in history])
    fig = Figure(figsize=(11, 4))
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    window = max(1, len(history) // 25)
    for key, color in (("loss", "black"), ("dino", "tab:blue"), ("ibot", "tab:orange"), ("koleo", "tab:green")):
        y = np.array([r.get(key, np.nan) for r in history], dtype=float)
        if np.all(np.isnan(y)):
            continue
        ax.plot(steps, y, color=color, alpha=0.25, linewidth=0.8)
        smooth = np.convolve(y, np.ones(window) / window, mode="valid") if len(y) >= window else y
        ax.plot(steps[window - 1 :] if len(y) >= window else steps, smooth, color=color, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "pretraining losses")
    ax.legend()
    ax.grid(alpha=0.3)
    spread = np.array([r.get("teacher_feat_std", np.nan) for r in history], dtype=float)
    ax2.plot(steps, spread, color="tab:purple", label="teacher class-token spread (1 = isotropic, 0 = collapsed)")
    ent = np.array([r.get("teacher_entropy", np.nan) for r in history], dtype=float)
    if not np.all(np.isnan(ent)):
        ax3 = ax2.twinx()
        ax3.plot(steps, ent, color="tab:red", alpha=0.7, label="entropy of the batch-mean teacher probs (nats)")
        per = np.array([r.get("teacher_sample_entropy", np.nan) for r in history], dtype=float)
        if not np.all(np.isnan(per)):
            # High batch-mean entropy with low per-sample entropy = prototypes used evenly and confidently;
            # both at log K = the teacher says nothing yet (uniform), a collapse DINO's centering can hide.
            ax3.plot(steps, per, color="tab:red", linestyle="--", alpha=0.7, label="mean per-image teacher entropy")
        ax3.set_ylabel("entropy (nats)")
        ax3.legend(loc="lower right", fontsize=8)
    ax2.set_xlabel("step")
    ax2.set_ylabel("spread")
    ax2.legend(loc="upper right", fontsize=8)
    ax2.grid(alpha=0.3)
    ax2.set_title("collapse diagnostics")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def load_backbone(path: str | Path, num_classes: int = 0) -> nn.Module:
    """Build the backbone a pretraining run wrote, from its file and the ``backbone.json`` beside it.

    RGB backbones load through the normal weight mechanism (:func:`visiontune.backbones.create_backbone`
    with ``backbone.weights=<path>``); multi-band ones are built with the recorded ``in_chans``
    (the ``visiontune train`` pipeline itself reads RGB images only).

    Args:
        path: ``backbone.safetensors`` of a pretraining run (or its run directory).
        num_classes: size of a fresh classifier (0 = pooled features out).
    """
    path = Path(path)
    if path.is_dir():
        path = path / BACKBONE_FILE
    meta_path = path.with_name(LINEAGE_FILE)
    if not meta_path.is_file():
        raise ConfigError(f"{str(path)!r} has no {LINEAGE_FILE} beside it; is it the output of `visiontune pretrain`?")
    meta = json.loads(meta_path.read_text())["backbone"]
    if int(meta.get("in_chans", 3)) == 3:
        return create_backbone(BackboneConfig(name=meta["name"], weights=str(path), img_size=meta["img_size"]), num_classes)
    from safetensors.torch import load_file

    model = _resolve_name(meta["name"]).build(pretrained=False, in_chans=int(meta["in_chans"]), img_size=int(meta["img_size"]),
                                              num_classes=num_classes)
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    head = {n for n, _ in model.get_classifier().named_parameters(prefix="head")} if num_classes else set()
    if unexpected or set(missing) - head:
        raise ConfigError(f"{path} does not fit {meta['name']} with in_chans={meta['in_chans']}: "
                          f"missing {sorted(set(missing) - head)[:4]}, unexpected {unexpected[:4]}")
    return model
