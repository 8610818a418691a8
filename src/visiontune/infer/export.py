"""ONNX export of a finished run: the merged model, plus its labels and preprocessing beside it.

``torch.onnx.export`` does the conversion. Two exporters exist in torch 2.x: the torch.export-based
one (``dynamo=True``, the default since torch 2.9, needs the ``onnxscript`` package) and the legacy
TorchScript tracer (``dynamo=False``, deprecated but dependency-free; it cannot export Mona with a
dynamic batch). ``exporter="auto"`` tries the first when onnxscript is installed and falls back to
the second; both give the input and output a dynamic batch dimension.

An ONNX file carries no preprocessing, and a consumer that resizes or normalises differently gets
silently wrong answers. So the export writes ``<name>.json`` beside the model with the class names,
the input/output tensor names, and the exact eval preprocessing (timm's data config and the resolved
steps: resize, centre crop, scale to [0, 1], normalise), and copies the labels into the ONNX file's
own metadata. With onnxruntime installed, the export is checked against PyTorch on a random batch.

Written by hand: the metadata file is visiontune's run format turned inside out; the conversion is torch's.
"""

from __future__ import annotations

import contextlib
import importlib.util
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
    atomic_write, check_writable, clean_stale_temps, publish, staging_path, write_json_atomic,
)
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.runtime import make_loader
from visiontune.backbones import backbone_identity
from visiontune.backbones.transforms import data_config
from visiontune.config import load_config
from visiontune.data import load_records, make_splits
from visiontune.data.bands import decode_for, records_dataset
from visiontune.eval import compute_metrics
from visiontune.infer.backends import EXPORT_FORMAT, OnnxRuntimeModel, cpu_info, file_sha256, openvino_unsupported
from visiontune.infer.predictor import Predictor
from visiontune.infer.quantize import (
    DEFAULT_CALIBRATION, batches_of, check_keep_patterns, check_smoothing, quantize_int8,
)
from visiontune.runs import ADAPTER_FILE

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18
MIN_OPSET = 7
"""The oldest ONNX opset torch exports to (below it, --opset 0 exported opset 18 with a logged traceback)."""


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


def _exporters(exporter: str) -> list[str]:
    """The exporters to try, in order, for ``exporter`` (auto / dynamo / legacy)."""
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ConfigError(f"exporter={exporter!r} is invalid; use auto, dynamo or legacy")
    has_onnxscript = importlib.util.find_spec("onnxscript") is not None
    if exporter == "dynamo" and not has_onnxscript:
        raise ConfigError("exporter='dynamo' needs the onnxscript package (pip install onnxscript); or use exporter='legacy'")
    if exporter == "auto":
        # The legacy tracer cannot export some graphs with a dynamic batch (Mona's depth-wise convolutions
        # over a reshaped token grid), so it is the fallback, not the first choice.
        return ["dynamo", "legacy"] if has_onnxscript else ["legacy"]
    return [exporter]


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


def _export_with(kind: str, model: nn.Module, example: tuple[torch.Tensor], out: Path, opset: int) -> None:
    # Both exporters print progress and emit deprecation / tracer warnings that say nothing about this
    # model's correctness (the parity check does).
    with _quiet_stdout(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dynamo":
            torch.onnx.export(
                model, example, str(out), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                external_data=False, verbose=False,
            )
        else:
            torch.onnx.export(
                model, example, str(out), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )


def export_model(
    model: nn.Module, input_size: tuple[int, int, int], out: Path, exporter: str = "auto", opset: int = DEFAULT_OPSET,
) -> str:
    """Write ``model`` (``[B, C, H, W] -> [B, classes]``) to ONNX with a dynamic batch dimension.

    Returns:
        The exporter used (``dynamo`` or ``legacy``).

    Raises:
        ConfigError: onnx missing, a bad ``exporter``, or every exporter tried failed (each reason listed).
    """
    if importlib.util.find_spec("onnx") is None:
        raise ConfigError("ONNX export needs the onnx package; install it with: pip install 'visiontune[onnx]'")
    kinds = _exporters(exporter)
    model = model.eval()
    example = (torch.randn(2, *input_size),)
    out.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for kind in kinds:
        try:
            _export_with(kind, model, example, out, opset)
            return kind
        except Exception as exc:  # noqa: BLE001 - collected and reported together below
            failures.append(f"{kind} exporter: {type(exc).__name__}: {str(exc).strip()[:400]}")
    hint = ("" if importlib.util.find_spec("onnxscript") else
            " Installing onnxscript enables torch's torch.export-based exporter (pip install onnxscript).")
    raise ConfigError("ONNX export failed:\n  - " + "\n  - ".join(failures) + (f"\n{hint.strip()}" if hint else ""))


def _add_onnx_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    atomic_write(path, lambda tmp: onnx.save(proto, str(tmp)))


def onnx_parity(path: Path, model: nn.Module, x: torch.Tensor) -> float | None:
    """Largest |onnxruntime - PyTorch| output difference on ``x`` (None when onnxruntime is absent)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    with torch.inference_mode():
        ref = model.eval()(x).float().numpy()
    return float(abs(got - ref).max())


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
    ref, q = acc["pytorch"], acc["onnx_int8"]
    d_acc, d_f1 = 100 * (ref["accuracy"] - q["accuracy"]), 100 * (ref["f1_weighted"] - q["f1_weighted"])
    text = (f"INT8 vs PyTorch on the run's {acc['images']} test images: accuracy {100 * ref['accuracy']:.2f}% -> "
            f"{100 * q['accuracy']:.2f}% ({-d_acc:+.2f} points), weighted F1 {100 * ref['f1_weighted']:.2f} -> "
            f"{100 * q['f1_weighted']:.2f} ({-d_f1:+.2f} points), top-1 agreement {100 * q['top1_agreement']:.1f}%")
    return d_acc, d_f1, text


def export_run(
    run_dir: str | Path, out: str | Path | None = None, fmt: str = "onnx", exporter: str = "auto",
    opset: int = DEFAULT_OPSET, check: bool = True, int8: bool = False, calibration: int | None = None,
    max_drop: float = DEFAULT_MAX_DROP, warn_only: bool = False, keep_fp32: Sequence[str] = (),
    smoothing: float | None = None,
) -> ExportResult:
    """Export a finished run's (merged) model for deployment without visiontune, optionally with an INT8 copy.

    Args:
        run_dir: a run directory written by :func:`visiontune.train`.
        out: the ``.onnx`` path (default ``<run_dir>/export/model.onnx``); ``<out>.json`` (same stem)
            gets labels and preprocessing; the INT8 model is ``<stem>.int8.onnx`` with its own JSON.
        fmt: export format; ``onnx`` (``openvino`` is named only to say it is not supported in this build).
        exporter: ``auto`` (torch.export-based when onnxscript is installed, falling back to the legacy
            tracer), ``dynamo`` or ``legacy``.
        opset: ONNX opset version.
        check: compare onnxruntime with PyTorch on a random batch, and measure accuracy and weighted F1
            of PyTorch, the fp32 export and the INT8 export on the run's test split (recorded in the JSON).
        int8: also write an INT8 model by post-training static quantization (see
            :mod:`visiontune.infer.quantize`), calibrated on the run's training images.
        calibration: calibration images (default :data:`~visiontune.infer.quantize.DEFAULT_CALIBRATION`,
            capped by the training split).
        max_drop: most accuracy or weighted-F1 points INT8 may lose against PyTorch on the test split.
        warn_only: keep an INT8 model that loses more, with a warning, instead of refusing it.
        keep_fp32: module-path patterns whose layers stay fp32 in the INT8 model (e.g. ``*.mlp.fc2``).
        smoothing: SmoothQuant strength for INT8 (None: try several, keep the best on the calibration images).

    Raises:
        ConfigError: unknown format / exporter, missing packages, a failed conversion, a dataset that
            cannot be loaded for calibration, or an INT8 model that loses more than ``max_drop``
            (with the numbers; the fp32 export is kept).
    """
    if fmt == "openvino":
        raise openvino_unsupported("--format")
    if fmt != "onnx":
        raise ConfigError(f"export format {fmt!r} is not supported; use onnx")
    calibration = DEFAULT_CALIBRATION if calibration is None else calibration
    if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 1:
        raise ConfigError(f"calibration={calibration!r} is invalid; use a number of training images >= 1 "
                          f"(default {DEFAULT_CALIBRATION})")
    check_smoothing(smoothing)  # before the fp32 export, not after it
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ConfigError(f"--opset {opset!r} is invalid; use an ONNX opset >= {MIN_OPSET} (default {DEFAULT_OPSET})")
    if not (math.isfinite(max_drop) and max_drop >= 0):
        raise ConfigError(f"max_drop={max_drop!r} is invalid; use points of accuracy >= 0 (default {DEFAULT_MAX_DROP})")
    keep = check_keep_patterns(keep_fp32)
    if (keep or smoothing is not None) and not int8:
        raise ConfigError("--keep-fp32 and --smoothing shape the INT8 model; add --int8 (or drop them)")
    if int8 and importlib.util.find_spec("onnxruntime") is None:
        raise ConfigError("--int8 needs the onnxruntime package (its quantization toolkit); install it with: "
                          "pip install 'visiontune[onnx]'")
    run_dir = Path(run_dir)
    path = Path(out) if out is not None else run_dir / "export" / "model.onnx"
    if path.suffix != ".onnx":
        raise ConfigError(f"--out {str(path)!r} should end in .onnx")
    int8_path = path.with_name(f"{path.stem}.int8.onnx")
    check_export_targets(path, int8_path if int8 else None)  # before any work: nothing of the user's is replaced
    pred = Predictor.from_run(run_dir, device="cpu", merge=True)
    # Written under temporary names and renamed into place at the end: a failed or refused export leaves the
    # previous one (and its JSON) exactly as they were.
    staged, staged_int8 = staging_path(path), staging_path(int8_path)
    try:
        return _export_staged(pred, run_dir, path, int8_path, staged, staged_int8, exporter, opset, check, int8,
                              calibration, max_drop, warn_only, keep, smoothing)
    finally:
        staged.unlink(missing_ok=True)
        staged_int8.unlink(missing_ok=True)


def check_export_targets(path: Path, int8_path: Path | None = None) -> None:
    """Refuse an export that would replace a file no visiontune export made (``--out RUN/metrics.onnx`` would
    replace the run's metrics.json); a previous export of the same name is replaced.

    Raises:
        ConfigError: naming the file and the fix.
    """
    pairs = [(path, path.with_suffix(".json"))]
    if int8_path is not None:
        pairs.append((int8_path, int8_path.with_suffix(".json")))
    for model, meta in pairs:
        ours = _is_export_json(meta, model.name)
        for target in (model, meta):
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
    return isinstance(data, dict) and data.get("format") == EXPORT_FORMAT and data.get("model") == model_name


def _export_staged(
    pred: Predictor, run_dir: Path, path: Path, int8_path: Path, staged: Path, staged_int8: Path, exporter: str,
    opset: int, check: bool, int8: bool, calibration: int, max_drop: float, warn_only: bool, keep: list[str],
    smoothing: float | None,
) -> ExportResult:
    input_size = pred.input_size
    cfg = load_config(run_dir / "config.yaml")
    limits = cfg.data.image_limits()
    splits = None
    if int8:
        splits = _splits(cfg, pred.classes, "INT8 calibration (the run's training images)")
    kind = export_model(pred.model, input_size, staged, exporter=exporter, opset=opset)
    _add_onnx_metadata(staged, {"visiontune.classes": json.dumps(pred.classes), "visiontune.run_dir": str(run_dir)})
    diff = None
    if check:
        x = torch.randn((3, *input_size), generator=torch.Generator().manual_seed(0))
        diff = onnx_parity(staged, pred.model, x)
    warning = None
    report = None
    if int8:
        assert splits is not None
        images = calibration_images(splits["train"], pred.transform, calibration, seed=cfg.data.seed, limits=limits)
        report = quantize_int8(staged, staged_int8, batches_of(images, 16), INPUT_NAME, keep_fp32=keep, smoothing=smoothing)
        _add_onnx_metadata(staged_int8, {"visiontune.classes": json.dumps(pred.classes), "visiontune.run_dir": str(run_dir)})
    accuracy = None
    if check and importlib.util.find_spec("onnxruntime") is not None:
        try:
            splits = splits or _splits(cfg, pred.classes, "the accuracy check")
        except ConfigError as exc:
            if int8:
                raise
            warning = f"accuracy check skipped: {exc}"
        if splits is not None:
            models: dict[str, Any] = {"pytorch": pred.model, "onnx_fp32": OnnxRuntimeModel(staged)}
            if int8:
                models["onnx_int8"] = OnnxRuntimeModel(staged_int8)
            accuracy = compare_on_test(splits["test"], pred.transform, models, pred.classes, cfg.optim.eval_batch_size,
                                       limits=limits)
            del models
    adapter = run_dir / ADAPTER_FILE
    meta = {
        "format": EXPORT_FORMAT,
        "model": path.name,
        "backend": "onnxruntime",
        "precision": "fp32",
        "classes": pred.classes,
        "input": {"name": INPUT_NAME, "shape": ["batch", *input_size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(pred.classes)], "meaning": "logits; apply softmax for scores"},
        "preprocessing": _preprocessing(pred.transform, pred.model, input_size[-1]),
        "image_limits": {"max_pixels": limits.max_pixels, "max_aspect": limits.max_aspect},
        "backbone": backbone_identity(cfg.backbone),
        "run": {"run_dir": str(run_dir), "method": cfg.method.name, "merged": pred.merged,
                "adapter_sha256": file_sha256(adapter) if adapter.is_file() else None},
        "exporter": kind,
        "opset": opset,
        "parity_max_abs_diff": diff,
        "accuracy": None if accuracy is None else {k: v for k, v in accuracy.items() if k != "onnx_int8"},
        "machine": cpu_info(),
    }
    meta_path = path.with_suffix(".json")
    publish(staged, path)  # the model first, then the JSON that names it
    write_json_atomic(meta_path, meta)
    result = ExportResult(path, meta_path, kind, pred.merged, diff, accuracy=accuracy, warning=warning)
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
                    "--max-drop with a larger number, or --warn-only; to lose less: --keep-fp32 with the sensitive "
                    "layers (e.g. '*.mlp.fc2'), or more --calibration images"
                )
    else:
        warning = "INT8 accuracy was not measured (--no-check): nothing guards it against the PyTorch model"
    int8_meta = {
        **meta, "model": int8_path.name, "precision": "int8",
        "quantization": report.as_dict(keep),
        "accuracy": None if accuracy is None else {**accuracy, "max_drop_points": max_drop, "accepted": accepted},
        "parity_max_abs_diff": None,
    }
    int8_meta_path = int8_path.with_suffix(".json")
    publish(staged_int8, int8_path)
    write_json_atomic(int8_meta_path, int8_meta)
    if warning:
        warnings.warn(f"visiontune export: {warning}", stacklevel=2)
    result.int8_path, result.int8_metadata_path, result.int8_accepted, result.warning = int8_path, int8_meta_path, accepted, warning
    return result
