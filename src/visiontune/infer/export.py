"""Export of a finished run: the merged model in an export backend's format (ONNX, OpenVINO IR ...), plus its
labels and preprocessing beside it, and optionally an INT8 copy behind an accuracy guard.

The conversion and the quantization are the format's (:class:`visiontune.infer.backends.ExportBackend`:
``convert``, ``quantize``; ONNX in :mod:`visiontune.infer.onnxruntime`, OpenVINO in
:mod:`visiontune.infer.openvino`); what is here is the same for every format: staging the files so a failed
export changes nothing, the metadata JSON, the calibration images, and the INT8 accuracy guard (accuracy and
weighted F1 of PyTorch, the fp32 and the INT8 model on the run's test split; INT8 is refused past ``max_drop``).

A model file carries no preprocessing, and a consumer that resizes or normalises differently gets
silently wrong answers. So the export writes ``<name>.json`` beside the model with the class names,
the input/output tensor names, and the exact eval preprocessing (timm's data config and the resolved
steps: resize, centre crop, scale to [0, 1], normalise), and copies the labels into the ONNX file's
own metadata where the format has a place for it. With the format's runtime installed, the export is
checked against PyTorch on a random batch.

Written by hand: the metadata file is visiontune's run format turned inside out; the conversion is torch's.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from visiontune.atomic import (
    check_writable, clean_stale_temps, write_json_atomic,
)
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.runtime import make_loader
from visiontune.backbones import backbone_identity
from visiontune.backbones.transforms import data_config
from visiontune.config import load_config
from visiontune.data import load_records, make_splits
from visiontune.data.bands import decode_for, records_dataset
from visiontune.eval import compute_metrics
from visiontune.infer.backends import ExportBackend, all_backends, default_export_backend, export_backend, file_sha256
from visiontune.infer.predictor import Predictor
from visiontune.infer.quantize import DEFAULT_CALIBRATION
from visiontune.runs import ADAPTER_FILE

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"


DEFAULT_MAX_DROP = 1.0
"""Most accuracy / weighted-F1 points INT8 may lose against PyTorch on the test split before the export refuses it."""


@dataclass
class ExportResult:
    """Where the export went and how it compares with PyTorch."""

    model_path: Path
    metadata_path: Path
    exporter: str
    merged: bool
    max_abs_diff: float | None
    """Largest |onnxruntime - PyTorch| logit difference on a random batch (None without onnxruntime)."""
    int8_path: Path | None = None
    int8_metadata_path: Path | None = None
    accuracy: dict[str, Any] | None = None
    """The test-split comparison (see :func:`compare_on_test`), or None when it was skipped."""
    int8_accepted: bool | None = None
    warning: str | None = None


def _short(v: Any) -> float:
    """A float32 constant as the decimal it was written as (0.485, not 0.48500001430511475)."""
    return float(f"{float(v):.7g}")


def _preprocessing(transform: Any, model: nn.Module, img_size: int | None) -> dict[str, Any]:
    """The eval preprocessing as data: timm's data config and the transform's resolved steps."""
    cfg = data_config(model, img_size)
    bands = cfg.get("bands")
    steps: list[dict[str, Any]] = [
        {"op": "read_bands", "channels": bands["channels"], "note": ".npy/.tif, HxWxC or CxHxW, values as stored, float32"}
        if bands else {"op": "to_rgb", "note": "gray replicated, alpha composited on white, 16-bit scaled"}]
    for t in getattr(transform, "transforms", []):
        kind = type(t).__name__
        if kind == "SelectBands":
            steps.append({"op": "select_bands", "bands": t.bands})
        elif kind == "Resize":
            steps.append({"op": "resize_shorter_side", "size": t.size if isinstance(t.size, int) else list(t.size),
                          "interpolation": str(t.interpolation.value), "antialias": bool(t.antialias)})
        elif kind == "CenterCrop":
            steps.append({"op": "center_crop", "size": list(t.size)})
        elif kind in ("ToTensor", "MaybeToTensor"):
            steps.append({"op": "to_float_chw", "scale": "divide by 255 -> [0, 1]", "layout": "CHW, RGB"})
        elif kind == "Normalize":
            steps.append({"op": "normalize", "mean": [_short(v) for v in torch.as_tensor(t.mean)],
                          "std": [_short(v) for v in torch.as_tensor(t.std)]})
        elif kind != "ToRGB":
            steps.append({"op": kind, "repr": repr(t)})
    out = {
        "input_size": list(cfg["input_size"]), "interpolation": cfg["interpolation"], "mean": list(cfg["mean"]),
        "std": list(cfg["std"]), "crop_pct": cfg.get("crop_pct"), "crop_mode": cfg.get("crop_mode"), "steps": steps,
    }
    if bands:  # multi-band: the file band count, the bands fed and the per-band statistics of the training split
        out["bands"] = bands
    return out


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence stdout, including what C++ code writes to file descriptor 1 (the legacy exporter dumps
    its whole TorchScript graph there when it fails)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _splits(cfg: Any, classes: list[str], why: str) -> dict[str, Any]:
    """The run's own train / test split (the same records, seed and counts as training used)."""
    try:
        records = load_records(cfg.data.dataset, root=cfg.data.root, limits=cfg.data.image_limits(), channels=cfg.data.channels)
    except (VisiontuneError, OSError) as exc:
        raise ConfigError(f"{why} needs the run's dataset {cfg.data.dataset!r}, which cannot be loaded here ({exc}); "
                          "export on a machine that has it") from None
    if list(records.classes) != classes:
        raise ConfigError(f"the run's dataset {cfg.data.dataset!r} now has classes {records.classes}, not the run's "
                          f"{classes}; {why} needs the data the run was trained on")
    return make_splits(records, cfg.data)


def calibration_images(
    train: Any, transform: Any, count: int, seed: int = 0, limits: Any = None,
) -> list[np.ndarray]:
    """Up to ``count`` preprocessed training images, classes taken in turn (each class shuffled by ``seed``),
    so a small calibration set still covers every class; decoded under ``limits`` (the run's size guard)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(train.labels)
    queues = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    order: list[int] = []
    while len(order) < count and any(queues):
        for q in queues:
            if q and len(order) < count:
                order.append(int(q.pop(0)))
    return [transform(decode_for(transform, train.items[i], train.ids[i], limits)).numpy() for i in order]


def compare_on_test(
    test: Any, transform: Any, models: dict[str, Any], classes: list[str], batch_size: int = 64, limits: Any = None,
) -> dict[str, Any]:
    """Accuracy and weighted F1 of each model on the same preprocessed test images, and how far each
    strays from the first (the PyTorch reference): top-1 agreement and mean / max |logit difference|."""
    loader = make_loader(records_dataset(test, transform, limits), batch_size, False, 0, 0)
    logits: dict[str, list[torch.Tensor]] = {k: [] for k in models}
    labels = []
    with torch.inference_mode():
        for x, y in loader:
            for name, model in models.items():
                logits[name].append(model(x).float())
            labels.append(y)
    y_true = torch.cat(labels).numpy()
    out: dict[str, Any] = {"split": "test", "images": int(len(y_true))}
    ref_name = next(iter(models))
    ref = torch.cat(logits[ref_name])
    for name, parts in logits.items():
        lg = torch.cat(parts)
        m = compute_metrics(y_true, lg.argmax(1).numpy(), classes)
        out[name] = {"accuracy": m["accuracy"], "f1_weighted": m["f1_weighted"]}
        if name != ref_name:
            out[name].update(top1_agreement=float((lg.argmax(1) == ref.argmax(1)).float().mean()),
                             logit_mean_abs_diff=float((lg - ref).abs().mean()), logit_max_abs_diff=float((lg - ref).abs().max()))
    return out


def _drop_message(acc: dict[str, Any], max_drop: float) -> tuple[float, float, str]:
    ref, q = acc["pytorch"], next(v for k, v in acc.items() if k.endswith("_int8"))
    d_acc, d_f1 = 100 * (ref["accuracy"] - q["accuracy"]), 100 * (ref["f1_weighted"] - q["f1_weighted"])
    text = (f"INT8 vs PyTorch on the run's {acc['images']} test images: accuracy {100 * ref['accuracy']:.2f}% -> "
            f"{100 * q['accuracy']:.2f}% ({-d_acc:+.2f} points), weighted F1 {100 * ref['f1_weighted']:.2f} -> "
            f"{100 * q['f1_weighted']:.2f} ({-d_f1:+.2f} points), top-1 agreement {100 * q['top1_agreement']:.1f}%")
    return d_acc, d_f1, text


def export_run(
    run_dir: str | Path, out: str | Path | None = None, fmt: str | None = None, exporter: str | None = None,
    opset: int | None = None, check: bool = True, int8: bool = False, calibration: int | None = None,
    max_drop: float = DEFAULT_MAX_DROP, warn_only: bool = False, keep_fp32: Sequence[str] = (),
    smoothing: float | None = None,
) -> ExportResult:
    """Export a finished run's (merged) model for deployment without visiontune, optionally with an INT8 copy.

    Args:
        run_dir: a run directory written by :func:`visiontune.train`.
        out: the model path (default ``<run_dir>/export/<the format's file name>``, e.g. ``model.onnx`` or
            ``openvino_model.xml``); the JSON beside it (same stem) gets labels and preprocessing; the INT8 model
            is ``<stem>.int8<suffix>`` with its own JSON.
        fmt: an export backend's format (``onnx``, the default, or ``openvino``; see
            :data:`visiontune.registry.INFERENCE_PLUGINS`).
        exporter: ONNX: ``auto`` (torch.export-based when onnxscript is installed, falling back to the legacy
            tracer), ``dynamo`` or ``legacy``.
        opset: ONNX opset version (default :data:`DEFAULT_OPSET`).
        check: compare the export with PyTorch on a random batch, and measure accuracy and weighted F1
            of PyTorch, the fp32 export and the INT8 export on the run's test split (recorded in the JSON).
        int8: also write an INT8 model by post-training static quantization (the format's own toolkit:
            :mod:`visiontune.infer.quantize` for ONNX, NNCF for OpenVINO), calibrated on the run's training images.
        calibration: calibration images (default :data:`~visiontune.infer.quantize.DEFAULT_CALIBRATION`,
            capped by the training split).
        max_drop: most accuracy or weighted-F1 points INT8 may lose against PyTorch on the test split.
        warn_only: keep an INT8 model that loses more, with a warning, instead of refusing it.
        keep_fp32: ONNX: module-path patterns whose layers stay fp32 in the INT8 model (e.g. ``*.mlp.fc2``).
        smoothing: ONNX: SmoothQuant strength for INT8 (None: try several, keep the best on the calibration images).

    Raises:
        ConfigError: unknown format / exporter, an option the format does not take, missing packages, a failed
            conversion, a dataset that cannot be loaded for calibration, or an INT8 model that loses more than
            ``max_drop`` (with the numbers; the fp32 export is kept).
    """
    backend = export_backend(fmt) if fmt is not None else default_export_backend()
    options = {"exporter": exporter, "opset": opset, "keep_fp32": list(keep_fp32), "smoothing": smoothing}
    backend.check_export_options(options)
    calibration = DEFAULT_CALIBRATION if calibration is None else calibration
    if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 1:
        raise ConfigError(f"calibration={calibration!r} is invalid; use a number of training images >= 1 "
                          f"(default {DEFAULT_CALIBRATION})")
    if not (math.isfinite(max_drop) and max_drop >= 0):
        raise ConfigError(f"max_drop={max_drop!r} is invalid; use points of accuracy >= 0 (default {DEFAULT_MAX_DROP})")
    if (keep_fp32 or smoothing is not None) and not int8:
        raise ConfigError("--keep-fp32 and --smoothing shape the INT8 model; add --int8 (or drop them)")
    backend.check_options(options)  # before the fp32 export, not after it
    backend.require_convert()
    if int8:
        backend.require(f"--int8 (--format {backend.format})")
    run_dir = Path(run_dir)
    path = Path(out) if out is not None else run_dir / "export" / backend.files[0]
    if not backend.owns(path):
        raise ConfigError(f"--out {str(path)!r} should end in {backend.suffix()} (--format {backend.format})")
    int8_path = path.with_name(f"{path.stem}.int8{path.suffix}")
    check_export_targets(path, int8_path if int8 else None, backend)  # before any work: nothing of the user's is replaced
    pred = Predictor.from_run(run_dir, device="cpu", merge=True)
    # Written under temporary names and moved into place at the end: a failed or refused export leaves the
    # previous one (and its JSON) exactly as they were.
    with backend.staging(path) as staged, backend.staging(int8_path) as staged_int8:
        return _export_staged(backend, pred, run_dir, path, int8_path, staged, staged_int8, options, check, int8,
                              calibration, max_drop, warn_only)


def check_export_targets(path: Path, int8_path: Path | None = None, backend: ExportBackend | None = None) -> None:
    """Refuse an export that would replace a file no visiontune export made (``--out RUN/metrics.onnx`` would
    replace the run's metrics.json); a previous export of the same name is replaced.

    Raises:
        ConfigError: naming the file and the fix.
    """
    backend = backend or default_export_backend()
    pairs = [(path, path.with_suffix(".json"))]
    if int8_path is not None:
        pairs.append((int8_path, int8_path.with_suffix(".json")))
    for model, meta in pairs:
        ours = _is_export_json(meta, model.name)
        for target in (model, meta, *backend.companions(model)):
            if target.is_dir() or (target.exists() and not ours):
                raise ConfigError(
                    f"export --out {str(path)!r} would replace {str(target)!r}, which is not a visiontune export of "
                    f"{model.name} (its JSON {meta.name} does not name it); choose another --out path (nothing was changed)"
                )
        check_writable(model, "the export")
    clean_stale_temps(path.parent)  # what an export killed mid-write left (its staged models are full-size)


def _is_export_json(meta: Path, model_name: str) -> bool:
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    tags = {b.meta_format() for b in all_backends() if b.exports}
    return isinstance(data, dict) and data.get("format") in tags and data.get("model") == model_name


def export_metadata(pred: Predictor, cfg: Any, run_dir: Path, path: Path, backend: ExportBackend) -> dict[str, Any]:
    """The export JSON's fields shared by every format and precision: labels, tensors, preprocessing, the run."""
    input_size = pred.input_size
    adapter = run_dir / ADAPTER_FILE
    limits = cfg.data.image_limits()
    return {
        "format": backend.meta_format(),
        "model": path.name,
        "backend": backend.name,
        "precision": "fp32",
        "classes": pred.classes,
        "input": {"name": INPUT_NAME, "shape": ["batch", *input_size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(pred.classes)], "meaning": "logits; apply softmax for scores"},
        "preprocessing": _preprocessing(pred.transform, pred.model, input_size[-1]),
        "image_limits": {"max_pixels": limits.max_pixels, "max_aspect": limits.max_aspect},
        "backbone": backbone_identity(cfg.backbone),
        "run": {"run_dir": str(run_dir), "method": cfg.method.name, "merged": pred.merged,
                "adapter_sha256": file_sha256(adapter) if adapter.is_file() else None},
    }


def _export_staged(
    backend: ExportBackend, pred: Predictor, run_dir: Path, path: Path, int8_path: Path, staged: Path, staged_int8: Path,
    options: dict[str, Any], check: bool, int8: bool, calibration: int, max_drop: float, warn_only: bool,
) -> ExportResult:
    input_size = pred.input_size
    cfg = load_config(run_dir / "config.yaml")
    limits = cfg.data.image_limits()
    splits = None
    if int8:
        splits = _splits(cfg, pred.classes, "INT8 calibration (the run's training images)")
    converted = backend.convert(pred.model, input_size, staged, options)
    labels = {"visiontune.classes": json.dumps(pred.classes), "visiontune.run_dir": str(run_dir)}
    backend.label(staged, labels)
    runs = backend.available()
    diff = None
    if check and runs:
        x = torch.randn((3, *input_size), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            diff = float((backend.load(staged)(x).float() - pred.model.eval()(x).float()).abs().max())
    warning = None
    report = None
    if int8:
        assert splits is not None
        images = calibration_images(splits["train"], pred.transform, calibration, seed=cfg.data.seed, limits=limits)
        report = backend.quantize(staged, staged_int8, images, options)
        backend.label(staged_int8, labels)
    accuracy = None
    fmt = backend.format
    if check and runs:
        try:
            splits = splits or _splits(cfg, pred.classes, "the accuracy check")
        except ConfigError as exc:
            if int8:
                raise
            warning = f"accuracy check skipped: {exc}"
        if splits is not None:
            models: dict[str, Any] = {"pytorch": pred.model, f"{fmt}_fp32": backend.load(staged)}
            if int8:
                models[f"{fmt}_int8"] = backend.load(staged_int8)
            accuracy = compare_on_test(splits["test"], pred.transform, models, pred.classes, cfg.optim.eval_batch_size,
                                       limits=limits)
            del models
    meta = {
        **export_metadata(pred, cfg, run_dir, path, backend), **converted,
        "parity_max_abs_diff": diff,
        "accuracy": None if accuracy is None else {k: v for k, v in accuracy.items() if k != f"{fmt}_int8"},
        "machine": backend.describe()["hardware"] | {f"{k}": v for k, v in backend.versions().items()},
    }
    meta_path = path.with_suffix(".json")
    backend.publish(staged, path)  # the model first, then the JSON that names it
    write_json_atomic(meta_path, meta)
    result = ExportResult(path, meta_path, converted.get("exporter", backend.name), pred.merged, diff, accuracy=accuracy,
                          warning=warning)
    if not int8:
        return result
    assert report is not None
    accepted = None
    if accuracy is not None:
        d_acc, d_f1, text = _drop_message(accuracy, max_drop)
        accepted = d_acc <= max_drop and d_f1 <= max_drop
        if not accepted:
            warning = (f"{text}: more than the allowed {max_drop:g} points (--max-drop)")
            if not warn_only:  # the staged INT8 model is dropped; an INT8 export kept earlier stays as it was
                raise ConfigError(
                    f"refusing the INT8 model: {warning}. The fp32 export is kept at {path}. To keep INT8 anyway: "
                    "--max-drop with a larger number, or --warn-only; to lose less: more --calibration images"
                    + (", or --keep-fp32 with the sensitive layers (e.g. '*.mlp.fc2')" if "keep_fp32" in backend.export_options else "")
                )
    else:
        warning = "INT8 accuracy was not measured (--no-check): nothing guards it against the PyTorch model"
    int8_meta = {
        **meta, "model": int8_path.name, "precision": "int8",
        "quantization": report,
        "accuracy": None if accuracy is None else {**accuracy, "max_drop_points": max_drop, "accepted": accepted},
        "parity_max_abs_diff": None,
    }
    int8_meta_path = int8_path.with_suffix(".json")
    backend.publish(staged_int8, int8_path)
    write_json_atomic(int8_meta_path, int8_meta)
    if warning:
        warnings.warn(f"visiontune export: {warning}", stacklevel=2)
    result.int8_path, result.int8_metadata_path, result.int8_accepted, result.warning = int8_path, int8_meta_path, accepted, warning
    return result
