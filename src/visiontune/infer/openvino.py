"""The OpenVINO backend: ``visiontune export --format openvino [--int8]`` and ``--backend openvino``.

OpenVINO is the runtime Intel Geti ships. ``openvino.convert_model`` converts the merged PyTorch model
(traced with an example batch; the batch dimension is left dynamic) to OpenVINO IR, saved with fp32
weights (``compress_to_fp16=False``: the default halves the weights, and this export is called fp32).
INT8 is NNCF's post-training quantization (``nncf.quantize``) calibrated on the same training images,
one at a time, as the ONNX INT8 export; a graph with attention (:data:`ATTENTION_OPS`) gets NNCF's transformer preset
(``ModelType.TRANSFORMER``: SmoothQuant, and the attention products left in float). The accuracy guard
around it is :func:`visiontune.infer.export.export_run`'s, the same for every format.

The runtime compiles for the CPU with ``INFERENCE_PRECISION_HINT=f32``: on CPUs with bf16 or AMX
OpenVINO would otherwise run float layers in bf16, and the precision this backend reports, and the
accuracy the export measured, would not be what runs. Threads default to torch's, as onnxruntime's do.

An export is ``openvino_model.xml`` (the graph) + ``openvino_model.bin`` (the weights), the names
Hugging Face Optimum Intel uses, and ``openvino_model.json`` (labels, preprocessing; the same metadata as
every export); INT8 is ``openvino_model.int8.xml`` / ``.bin`` / ``.json``.

Written by hand: the glue; conversion, quantization and the runtime are OpenVINO's and NNCF's.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from visiontune.atomic import publish
from visiontune.errors import ConfigError
from visiontune.extras import install_hint
from visiontune.infer.backends import ExportBackend, TaggedModel, register_backend
from visiontune.infer.export import _quiet_stdout

FP32_FILE, INT8_FILE = "openvino_model.xml", "openvino_model.int8.xml"
ATTENTION_OPS = ("Softmax", "ScaledDotProductAttention")
"""Operations that mark a graph with attention (timm's fused attention converts to the second)."""


def _core() -> Any:
    import openvino

    return openvino.Core()


def _dims(shape: Any) -> list[Any]:
    """An OpenVINO partial shape as a list: an int per static dimension, ``"?"`` for a dynamic one."""
    return [d.get_length() if d.is_static else "?" for d in shape]


class OpenVINOModel(TaggedModel):
    """An OpenVINO IR model compiled for the CPU, as a module ``[B, 3, H, W] float -> [B, classes] logits``.

    Args:
        path: the ``.xml`` file (its ``.bin`` beside it).
        threads: inference threads (default: ``torch.get_num_threads()``).
        weights: the weights file when it is not ``path`` with ``.bin`` (a staged export).
    """

    def __init__(self, path: str | Path, threads: int | None = None, weights: str | Path | None = None):
        super().__init__()
        self.path = Path(path)
        core = _core()
        config = {"INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()), "INFERENCE_PRECISION_HINT": "f32"}
        try:
            model = core.read_model(str(self.path), str(weights or self.path.with_suffix(".bin")))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:  # noqa: BLE001 -- OpenVINO raises RuntimeError subclasses of its own for bad files
            raise ConfigError(
                f"{str(self.path)!r} is not a model OpenVINO can load ({type(e).__name__}: {str(e).strip()[:200]}); "
                "re-export it with `visiontune export RUN --format openvino`"
            ) from None
        self.request = self.compiled.create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        self.request.infer({0: arr})
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())

    @property
    def input_shape(self) -> list[Any]:
        return _dims(self.compiled.input(0).get_partial_shape())

    @property
    def output_width(self) -> int | None:
        width = _dims(self.compiled.output(0).get_partial_shape())[-1]
        return width if isinstance(width, int) else None


@register_backend
class OpenVINOBackend(ExportBackend):
    """OpenVINO on the CPU: an OpenVINO IR export (fp32, or INT8 from NNCF's post-training quantization)."""

    name = "openvino"
    format = "openvino"
    title = "OpenVINO"
    extra = "openvino"
    modules = ("openvino",)
    files = (FP32_FILE, INT8_FILE)

    def companions(self, model_path: Path) -> list[Path]:
        return [model_path.with_suffix(".bin")]

    @contextlib.contextmanager
    def staging(self, path: Path) -> Iterator[Path]:
        # OpenVINO derives the weights' name from the graph's and wants it to end in .xml, so the pair is written
        # under its final names in a hidden folder beside the target (same file system: publishing is a rename).
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".vt-openvino-", dir=path.parent) as tmp:
            yield Path(tmp) / path.name

    def publish(self, staged: Path, path: Path) -> None:
        publish(staged.with_suffix(".bin"), path.with_suffix(".bin"))  # the weights, then the graph that uses them
        publish(staged, path)

    def load(self, model_path: Path, input_name: str = "pixel_values", threads: int | None = None) -> OpenVINOModel:
        self.require()
        return OpenVINOModel(model_path, threads=threads)

    def describe(self, precision: str = "fp32") -> dict[str, Any]:
        out = super().describe(precision)
        if self.available():
            out["device"] = str(_core().get_property("CPU", "FULL_DEVICE_NAME"))
        return out

    def convert(self, model: nn.Module, input_size: tuple[int, int, int], out: Path, options: dict[str, Any]) -> dict[str, Any]:
        import openvino

        try:
            with _quiet_stdout(), warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")  # the tracer's warnings say nothing about this model (the parity check does)
                converted = openvino.convert_model(model.eval(), example_input=torch.randn(2, *input_size),
                                                   input=[(-1, *input_size)])
        except Exception as exc:  # noqa: BLE001 - reported with the cause
            raise ConfigError(f"OpenVINO conversion failed: {type(exc).__name__}: {str(exc).strip()[:400]}; "
                              "try --format onnx") from None
        openvino.save_model(converted, str(out), compress_to_fp16=False)
        return {"exporter": "openvino.convert_model", "openvino": importlib.metadata.version("openvino")}

    def quantize(self, fp32_path: Path, out: Path, images: list[np.ndarray], options: dict[str, Any]) -> dict[str, Any]:
        if importlib.util.find_spec("nncf") is None:
            raise ConfigError(f"--format openvino --int8 needs the nncf package; install it with: {install_hint('openvino')}")
        import nncf
        import openvino

        model = _core().read_model(str(fp32_path))
        transformer = any(op.get_type_name() in ATTENTION_OPS for op in model.get_ops())
        extra = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
        dataset = nncf.Dataset([img[None].astype(np.float32) for img in images])
        quiet = logging.getLogger("nncf").level
        logging.getLogger("nncf").setLevel(logging.ERROR)  # per-step progress bars and advice at INFO / WARNING
        try:
            with _quiet_stdout():
                quantized = nncf.quantize(model, dataset, subset_size=len(images), preset=nncf.QuantizationPreset.MIXED,
                                          **extra)
        finally:
            logging.getLogger("nncf").setLevel(quiet)
        openvino.save_model(quantized, str(out), compress_to_fp16=False)
        ops: dict[str, int] = {}
        for op in quantized.get_ops():
            if op.get_type_name() == "FakeQuantize":
                ops["FakeQuantize"] = ops.get("FakeQuantize", 0) + 1
        return {
            "method": "nncf.quantize (post-training)", "nncf": importlib.metadata.version("nncf"),
            "preset": "MIXED: symmetric weights, asymmetric activations",
            "model_type": "transformer (attention found: SmoothQuant, attention products kept float)" if transformer else "default",
            "fake_quantize_ops": ops.get("FakeQuantize", 0),
            "calibration": {"images": len(images), "source": "the run's training split, eval preprocessing"},
        }
