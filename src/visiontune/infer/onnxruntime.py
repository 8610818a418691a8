"""The onnxruntime backend: ``visiontune export --format onnx`` (the default) and ``--backend onnxruntime``.

``torch.onnx.export`` does the conversion. Two exporters exist in torch 2.x: the torch.export-based
one (``dynamo=True``, the default since torch 2.9, needs the ``onnxscript`` package) and the legacy
TorchScript tracer (``dynamo=False``, deprecated but dependency-free; it cannot export Mona with a
dynamic batch). ``exporter="auto"`` tries the first when onnxscript is installed and falls back to
the second; both give the input and output a dynamic batch dimension. INT8 is onnxruntime's own
post-training static quantization (:mod:`visiontune.infer.quantize`); onnxruntime runs both
(:class:`~visiontune.infer.backends.OnnxRuntimeModel`).

Written by hand: the glue; the conversion is torch's, the quantization and the runtime onnxruntime's.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visiontune.atomic import atomic_write
from visiontune.errors import ConfigError
from visiontune.infer.backends import (
    FP32_NAME, INT8_NAME, ExportBackend, OnnxRuntimeModel, register_backend,
)
from visiontune.infer.export import INPUT_NAME, OUTPUT_NAME, _quiet_stdout
from visiontune.infer.quantize import batches_of, check_keep_patterns, check_smoothing, quantize_int8

DEFAULT_OPSET = 18
MIN_OPSET = 7
"""The oldest ONNX opset torch exports to (below it, --opset 0 exported opset 18 with a logged traceback)."""



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


@register_backend
class OnnxRuntimeBackend(ExportBackend):
    """ONNX Runtime on the CPU: an ONNX export (fp32, or INT8 QDQ from onnxruntime's static quantization)."""

    name = "onnxruntime"
    format = "onnx"
    title = "ONNX"
    extra = "onnx"
    modules = ("onnxruntime",)
    convert_modules = ("onnx",)
    files = (FP32_NAME, INT8_NAME)
    export_options = frozenset({"exporter", "opset", "keep_fp32", "smoothing"})

    def load(self, model_path: Path, input_name: str = INPUT_NAME, threads: int | None = None) -> OnnxRuntimeModel:
        return OnnxRuntimeModel(model_path, input_name, threads=threads)

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse a bad exporter, opset, keep-fp32 pattern or smoothing strength, before any work."""
        _exporters(options.get("exporter") or "auto")
        opset = DEFAULT_OPSET if options.get("opset") is None else options["opset"]
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
            raise ConfigError(f"--opset {opset!r} is invalid; use an ONNX opset >= {MIN_OPSET} (default {DEFAULT_OPSET})")
        check_smoothing(options.get("smoothing"))
        check_keep_patterns(options.get("keep_fp32") or ())

    def convert(self, model: nn.Module, input_size: tuple[int, int, int], out: Path, options: dict[str, Any]) -> dict[str, Any]:
        opset = DEFAULT_OPSET if options.get("opset") is None else int(options["opset"])
        kind = export_model(model, input_size, out, exporter=options.get("exporter") or "auto", opset=opset)
        return {"exporter": kind, "opset": opset}

    def label(self, path: Path, meta: dict[str, str]) -> None:
        _add_onnx_metadata(path, meta)

    def quantize(self, fp32_path: Path, out: Path, images: list[np.ndarray], options: dict[str, Any]) -> dict[str, Any]:
        keep = check_keep_patterns(options.get("keep_fp32") or ())
        report = quantize_int8(fp32_path, out, batches_of(images, 16), INPUT_NAME, keep_fp32=keep,
                               smoothing=options.get("smoothing"))
        return report.as_dict(keep)
