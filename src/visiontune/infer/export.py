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
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn

from visiontune.atomic import atomic_write, write_json_atomic
from visiontune.errors import ConfigError

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18


@dataclass
class ExportResult:
    """Where the export went and how it compares with PyTorch."""

    model_path: Path
    metadata_path: Path
    exporter: str
    merged: bool
    max_abs_diff: float | None
    """Largest |onnxruntime - PyTorch| logit difference on a random batch (None without onnxruntime)."""


def _short(v: Any) -> float:
    """A float32 constant as the decimal it was written as (0.485, not 0.48500001430511475)."""
    return float(f"{float(v):.7g}")


def _preprocessing(transform: Any, model: nn.Module, img_size: int | None) -> dict[str, Any]:
    """The eval preprocessing as data: timm's data config and the transform's resolved steps."""
    from visiontune.backbones.transforms import data_config

    cfg = data_config(model, img_size)
    steps: list[dict[str, Any]] = [{"op": "to_rgb", "note": "gray replicated, alpha composited on white, 16-bit scaled"}]
    for t in getattr(transform, "transforms", []):
        kind = type(t).__name__
        if kind == "Resize":
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
    return {
        "input_size": list(cfg["input_size"]), "interpolation": cfg["interpolation"], "mean": list(cfg["mean"]),
        "std": list(cfg["std"]), "crop_pct": cfg.get("crop_pct"), "crop_mode": cfg.get("crop_mode"), "steps": steps,
    }


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
    import warnings

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


def export_run(
    run_dir: str | Path, out: str | Path | None = None, fmt: Literal["onnx"] = "onnx", exporter: str = "auto",
    opset: int = DEFAULT_OPSET, check: bool = True,
) -> ExportResult:
    """Export a finished run's (merged) model for deployment without visiontune.

    Args:
        run_dir: a run directory written by :func:`visiontune.train`.
        out: the ``.onnx`` path (default ``<run_dir>/export/model.onnx``); ``<out>.json`` (same stem)
            gets labels and preprocessing.
        fmt: export format; only ``onnx`` for now.
        exporter: ``auto`` (torch.export-based when onnxscript is installed, falling back to the legacy
            tracer), ``dynamo`` or ``legacy``.
        opset: ONNX opset version.
        check: compare onnxruntime with PyTorch on a random batch and record the difference.

    Raises:
        ConfigError: unknown format / exporter, missing packages, or a failed conversion.
    """
    from visiontune.infer.predictor import Predictor

    if fmt != "onnx":
        raise ConfigError(f"export format {fmt!r} is not supported; use onnx")
    pred = Predictor.from_run(run_dir, device="cpu", merge=True)
    run_dir = Path(run_dir)
    path = Path(out) if out is not None else run_dir / "export" / "model.onnx"
    if path.suffix != ".onnx":
        raise ConfigError(f"--out {str(path)!r} should end in .onnx")
    input_size = pred.input_size
    kind = export_model(pred.model, input_size, path, exporter=exporter, opset=opset)
    _add_onnx_metadata(path, {"visiontune.classes": json.dumps(pred.classes), "visiontune.run_dir": str(run_dir)})
    diff = None
    if check:
        x = torch.randn((3, *input_size), generator=torch.Generator().manual_seed(0))
        diff = onnx_parity(path, pred.model, x)
    cfg = pred.info
    meta = {
        "format": "visiontune-onnx/1",
        "model": path.name,
        "classes": pred.classes,
        "input": {"name": INPUT_NAME, "shape": ["batch", *input_size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(pred.classes)], "meaning": "logits; apply softmax for scores"},
        "preprocessing": _preprocessing(pred.transform, pred.model, input_size[-1]),
        "run": {"run_dir": str(run_dir), "method": cfg["method"], "merged": pred.merged},
        "exporter": kind,
        "opset": opset,
        "parity_max_abs_diff": diff,
    }
    meta_path = path.with_suffix(".json")
    write_json_atomic(meta_path, meta)
    return ExportResult(path, meta_path, kind, pred.merged, diff)
