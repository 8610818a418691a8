"""The ``suggest`` pipeline: list the pool, stream its features, pick with a strategy, write the files (the
package docstring of :mod:`visiontune.suggest` says what each rule does)."""

from __future__ import annotations

import json

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from visiontune.backbones import build_transform, create_backbone
from visiontune.backbones.factory import backbone_identity
from visiontune.config import load_config
from visiontune.data.images import ImageLimits
from visiontune.data.sources import _list_images, load_records
from visiontune.errors import ConfigError, DataError
from visiontune.suggest import output
from visiontune.suggest.features import open_store
from visiontune.suggest.strategies import STRATEGIES, Pick, check_strategy, select

DEFAULT_CACHE = Path(os.environ.get("VISIONTUNE_CACHE", Path.home() / ".cache" / "visiontune")) / "features"
"""Where pool features are kept between calls (``--cache`` changes it)."""
PROB_CHUNK = 8192
"""Pool rows scored by the probe / run classifier at a time (bounded memory on big pools)."""


@dataclass
class SuggestResult:
    """What a call wrote and picked."""

    csv: Path
    sheet: Path
    picks: list[dict[str, Any]]
    strategy: str
    rule: str
    pool: int
    classes: list[str]


def list_pool(folder: str | Path) -> list[str]:
    """Absolute paths of the images under ``folder`` (recursive, sorted, hidden skipped).

    Raises:
        DataError: not a folder, or no image in it.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"UNLABELED_DIR {str(folder)!r} is not a folder; pass the folder of images to choose from")
    found, ignored = _list_images(str(folder))
    if not found:
        raise DataError(f"UNLABELED_DIR {str(folder)!r} holds no image ({ignored} other file(s)); image files end in "
                        ".jpg, .png, .bmp, .tif or .webp")
    return [str((folder / f).resolve()) for f in found]


def _model(run: str | Path | None, overrides: Sequence[str], pool_dir: str) -> tuple[Any, Any, dict[str, Any], list[str], str]:
    """(model, eval transform, identity of its features, the run's classes or [], description)."""
    if run is not None:
        from visiontune.infer.backends import file_sha256
        from visiontune.runs import load_run

        try:
            loaded = load_run(run)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"--run {str(run)!r} cannot be read as a finished run ({exc}); pass a run directory "
                              "written by `visiontune train`") from None
        adapter = Path(run) / "adapter.safetensors"
        ident = {**loaded.identity, "run": str(Path(run).resolve()), "adapter": file_sha256(adapter)}
        return loaded.model, loaded.transform, ident, list(loaded.classes), f"run {run}"
    cfg = load_config(None, overrides=[f"data.dataset={pool_dir}", *overrides])
    model = create_backbone(cfg.backbone, 0).eval()
    return model, build_transform(model, cfg.backbone.img_size, train=False), backbone_identity(cfg.backbone), [], \
        f"backbone {cfg.backbone.name} ({cfg.backbone.weights})"


def _run_labeled(run: str | Path) -> int:
    """The labeled images a finished run learned from (its training and validation splits, by its metrics.json):
    what ``auto``'s switch point counts when the model comes from ``--run``."""
    from visiontune.runs import METRICS_FILE

    split = json.loads((Path(run) / METRICS_FILE).read_text()).get("run", {})
    return int(split.get("train_size") or 0) + int(split.get("val_size") or 0)


def _pooled(model: Any) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)
    return forward


def _probs_in_chunks(head: torch.nn.Module, feats: np.ndarray) -> np.ndarray:
    out = np.empty((len(feats), head.out_features), np.float32)
    with torch.no_grad():
        for i in range(0, len(feats), PROB_CHUNK):
            x = torch.from_numpy(np.array(feats[i:i + PROB_CHUNK], np.float32))
            out[i:i + PROB_CHUNK] = torch.softmax(head(x).float(), 1).numpy()
    return out


def suggest(
    unlabeled: str | Path,
    budget: int,
    out: str | Path = "picks.csv",
    strategy: str = "auto",
    run: str | Path | None = None,
    labeled: str | None = None,
    overrides: Sequence[str] = (),
    seed: int = 0,
    cache: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> SuggestResult:
    """Pick ``budget`` images of ``unlabeled`` to label next; write the picks CSV, its ``.json`` and a contact sheet.

    Args:
        unlabeled: folder of images to choose from (recursive).
        budget: how many to pick (1 .. number of unlabeled images).
        out: the picks CSV (``.json`` and ``.png`` are written beside it); replaced only if suggest wrote it.
        strategy: one of :data:`~visiontune.suggest.strategies.STRATEGIES`.
        run: a trained run directory: its features and classifier score the pool.
        labeled: labeled images (folder with one sub-folder per class, or a CSV manifest); their features are the
            labeled set of coverage rules and train the probe of uncertainty rules. Pool images listed there are
            left out of the pool.
        overrides: ``backbone.*`` settings (``backbone.weights=offline`` ...) when no run is given.
        seed: every random choice (k-means, the random draw) follows it.
        cache: the feature store's folder (default :data:`DEFAULT_CACHE`).
        batch_size: images per forward pass.
        progress: show progress bars.

    Raises:
        ConfigError: bad budget, strategy, option combination, --out, or an unreadable run.
        DataError: empty or missing folder, undecodable image, bad labeled data.
    """
    check_strategy(strategy)
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise ConfigError(f"--budget {budget!r} must be a whole number of images >= 1")
    if run is not None and labeled is not None:
        raise ConfigError("--run and --labeled both given; pass one: a trained run, or labeled data to fit a probe on")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")
    out_path = output.check_out(out)
    paths = list_pool(unlabeled)
    records = None
    if labeled is not None:
        if not (os.path.isdir(labeled) or str(labeled).lower().endswith(".csv")):
            raise ConfigError(f"--labeled {labeled!r} must be an image folder (one sub-folder per class) or a CSV manifest")
        records = load_records(str(labeled))
        known = {os.path.realpath(str(p)) for p in records.items}
        paths = [p for p in paths if os.path.realpath(p) not in known]
        if not paths:
            raise DataError(f"every image of {str(unlabeled)!r} is already labeled in {labeled!r}; nothing to suggest")
    if budget > len(paths):
        raise ConfigError(f"--budget {budget} is larger than the {len(paths)} unlabeled image(s) in {str(unlabeled)!r}; "
                          f"ask for at most {len(paths)}")
    model, transform, ident, classes, what = _model(run, overrides, str(unlabeled))
    with torch.inference_mode():
        dim = int(_pooled(model)(torch.zeros(1, *transform(_probe_image()).shape)).shape[1])
    root = Path(cache) if cache is not None else DEFAULT_CACHE
    limits = ImageLimits()
    feats = open_store(root, paths, ident, dim).compute(_pooled(model), transform, batch_size, limits, progress,
                                                        f"features of {len(paths)} images")
    lab_x = lab_y = None
    if records is not None:
        lab_paths = [str(p) for p in records.items]
        lab_x = np.array(open_store(root, lab_paths, ident, dim).compute(
            _pooled(model), transform, batch_size, limits, progress, "features of the labeled images"))
        lab_y = records.labels
        classes = list(records.classes)

    probs = None
    if run is not None:
        head = model.get_classifier()

        def probs() -> tuple[np.ndarray, list[str]]:
            return _probs_in_chunks(head, feats), classes
    elif lab_x is not None and len(set(lab_y.tolist())) >= 2:
        from visiontune.methods.baselines import fit_probe_head

        def probs() -> tuple[np.ndarray, list[str]]:
            head = torch.nn.Linear(dim, len(classes))
            fit_probe_head(head, (torch.from_numpy(lab_x), torch.from_numpy(lab_y), np.arange(len(lab_y))), None)
            return _probs_in_chunks(head, feats), classes

    n_lab = _run_labeled(run) if run is not None else 0 if lab_x is None else len(lab_x)
    from visiontune.suggest.strategies import auto_choice

    rule = auto_choice(n_lab, len(classes), budget, probs is not None) if strategy == "auto" else strategy
    picks: list[Pick] = select(rule, feats, budget, seed, labeled=lab_x, probs=probs, n_classes=len(classes) or None)
    rows = [{"path": paths[p.index], "reason": p.reason, "score": p.score} for p in picks]
    meta = {"strategy": strategy, "rule": rule, "classes": classes, "budget": budget, "seed": seed, "pool": len(paths),
            "features": what, "labeled": str(labeled) if labeled else None, "run": str(run) if run else None,
            "unlabeled": str(Path(unlabeled).resolve())}
    output.write_picks(out_path, rows, meta)
    sheet = output.sheet_path(out_path)
    output.contact_sheet(sheet, [r["path"] for r in rows], [r["reason"] for r in rows])
    return SuggestResult(out_path, sheet, rows, strategy, rule, len(paths), classes)


def _probe_image() -> Any:
    from PIL import Image

    return Image.new("RGB", (32, 32))


__all__ = ["STRATEGIES", "SuggestResult", "list_pool", "suggest"]
