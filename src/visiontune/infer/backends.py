"""Inference backends: PyTorch (the run itself) or ONNX Runtime (an export written by ``visiontune export``).

``predict``, ``eval``, ``serve`` and ``bench-infer`` take ``--backend torch|onnxruntime`` and a path
that is either a run directory or an export (an export folder, its ``model.onnx`` /
``model.int8.onnx``, or the JSON beside one). ``auto`` (the default) picks torch for a run directory
and onnxruntime for an export. A run directory with ``--backend onnxruntime`` uses the run's own
export (``<run>/export/model.onnx``, or ``model.int8.onnx`` with ``--int8``) and refuses an export
older than the run's adapter file, which would silently answer with the old weights.

The ONNX model is wrapped as a parameter-free :class:`torch.nn.Module` (:class:`OnnxRuntimeModel`)
mapping a float tensor to logits, so the predictor, the evaluation loop and the service's batcher
run it unchanged: the same batching, the same errors, the same outputs. Preprocessing comes from the
timm data config the export's JSON recorded, through
:func:`visiontune.backbones.transforms.eval_transform`, the function that builds the run's own eval
transform, so both backends see the same pixels.

OpenVINO is named in the choices so that asking for it gives a clear answer: it is not supported in
this build (it would need the ``openvino`` package, and NNCF for its INT8 path).

Written by hand: onnxruntime runs the model; what is here is finding the right file, checking it
belongs to the run, and the glue.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from visiontune.errors import ConfigError
from visiontune.backbones.transforms import eval_transform
from visiontune.config import load_config
from visiontune.data.images import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, ImageLimits
from visiontune.data.bands import input_channels
from visiontune.multi import TaskHost
from visiontune.runs import ADAPTER_FILE
from visiontune.runtime import cpu_info  # noqa: F401  (recorded with exports; benchmarks import it from here)

BACKENDS = ("torch", "onnxruntime", "openvino")
"""What ``--backend`` accepts (``auto`` is the default: torch for a run, onnxruntime for an export)."""

EXPORT_FORMAT = "visiontune-onnx/1"
FP32_NAME, INT8_NAME = "model.onnx", "model.int8.onnx"

Precision = Literal["fp32", "int8"]


def require_onnxruntime(what: str = "the onnxruntime backend") -> Any:
    """Import onnxruntime, or say how to install it."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise ConfigError(f"{what} needs the onnxruntime package; install it with: pip install 'visiontune[onnx]'")
    import onnxruntime

    return onnxruntime


def openvino_unsupported(flag: str) -> ConfigError:
    """The error for ``--format openvino`` / ``--backend openvino``."""
    return ConfigError(
        f"{flag} openvino is not supported in this build of visiontune: it would need the openvino package "
        "(pip install openvino) and NNCF for INT8, and neither is wired in; use onnxruntime instead "
        "(`visiontune export RUN --format onnx --int8`, then --backend onnxruntime --int8)"
    )


def is_export_path(path: str | Path) -> bool:
    """Whether ``path`` names an ONNX export (a .onnx / export .json file, or a folder holding model.json)
    rather than a run directory."""
    p = Path(path)
    if p.suffix in (".onnx", ".json") and p.is_file():
        return True
    return p.is_dir() and not (p / "config.yaml").is_file() and (p / "model.json").is_file()


def resolve_backend(backend: str | None, path: str | Path, int8: bool = False) -> str:
    """``torch`` or ``onnxruntime`` for ``backend`` (None / ``auto``: by the kind of ``path``).

    Raises:
        ConfigError: an unknown backend, openvino, or ``int8`` with the torch backend.
    """
    if backend in (None, "auto"):
        backend = "onnxruntime" if int8 or is_export_path(path) else "torch"
    if backend == "openvino":
        raise openvino_unsupported("--backend")
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is invalid; use one of auto, {', '.join(BACKENDS)}")
    if backend == "torch" and is_export_path(path):
        raise ConfigError(f"{str(path)!r} is an ONNX export, which the torch backend cannot run; use --backend onnxruntime "
                          "(or the run directory it came from with --backend torch)")
    if backend == "torch" and int8:
        raise ConfigError("--int8 runs an INT8 ONNX export and needs --backend onnxruntime; drop --int8 for PyTorch")
    return backend


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (the adapter an export was made from, to detect a stale export)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- finding an export


def find_export(path: str | Path, int8: bool = False) -> tuple[Path, Path]:
    """``(model .onnx, metadata .json)`` for a run directory, an export folder, a .onnx or its .json.

    Args:
        path: a run directory (its ``export/`` folder is used), an export folder, a model file or its JSON.
        int8: pick the INT8 model (``model.int8.onnx``) where ``path`` is a folder.

    Raises:
        ConfigError: nothing to load there, with the ``visiontune export`` command that makes it.
    """
    p = Path(path)
    want = INT8_NAME if int8 else FP32_NAME
    flag = " --int8" if int8 else ""
    if p.is_dir():
        is_run = (p / "config.yaml").is_file()
        folder = p / "export" if is_run else p
        model = folder / want
        if not model.is_file():
            if is_run:
                raise ConfigError(f"run {str(p)!r} has no {'INT8' if int8 else 'fp32'} ONNX export ({model} is missing); "
                                  f"make it with: visiontune export {p}{flag}")
            raise ConfigError(f"{str(p)!r} holds no {want}; pass a run directory, an export folder written by "
                              f"`visiontune export` or a .onnx file, or make the export with: visiontune export RUN{flag}")
        return model, model.with_suffix(".json")
    if p.suffix == ".json" and p.is_file():
        meta = _read_meta(p)
        return p.parent / meta["model"], p
    if p.suffix == ".onnx" and p.is_file():
        meta_path = p.with_suffix(".json")
        if not meta_path.is_file():
            raise ConfigError(f"{str(p)!r} has no {meta_path.name} beside it (labels and preprocessing); re-export it "
                              "with `visiontune export RUN`, which writes both")
        meta = _read_meta(meta_path)
        if int8 and meta.get("precision", "fp32") != "int8":
            raise ConfigError(f"{str(p)!r} is a {meta.get('precision', 'fp32')} export, not INT8; drop --int8 or pass "
                              f"{p.with_name(INT8_NAME)}")
        return p, meta_path
    raise ConfigError(f"{str(p)!r} does not exist or is not a run directory, an export folder, a .onnx or its .json")


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the export metadata {str(path)!r} ({exc}); re-export with `visiontune export RUN`") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"{str(path)!r} is not a visiontune export's metadata (format {EXPORT_FORMAT!r}); "
                          "re-export with `visiontune export RUN`")
    return meta


MAX_INPUT_SIDE = 4096
"""Largest image side an export's preprocessing may resize to: far above any backbone's input, and small enough
that a tampered JSON cannot make every request decode a gigapixel image."""


def _input_name(meta: dict[str, Any], meta_path: Path) -> str:
    name = (meta.get("input") or {}).get("name") if isinstance(meta.get("input"), dict) else None
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{str(meta_path)!r} names no model input (input.name); re-export with `visiontune export RUN`")
    return name


def check_export(model: OnnxRuntimeModel, meta: dict[str, Any], meta_path: Path) -> None:
    """Refuse an export whose JSON and model disagree, or whose preprocessing is out of bounds.

    The JSON is what a reader trusts for labels and pixels; the model is what computes. Checked: the labels are
    a list of names as long as the model's output (4 outputs with 10 labels mislabel silently, 10 with 4 fail on
    every request), and the preprocessing's input size is an image of at most :data:`MAX_INPUT_SIDE` pixels a
    side that matches the model's own input shape (a tampered size drives decoding to gigabytes).

    Raises:
        ConfigError: naming both files and the fix.
    """
    fix = "re-export with `visiontune export RUN` (it writes both files together)"
    classes = meta.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise ConfigError(f"{str(meta_path)!r} has no list of class names (classes); {fix}")
    pre = meta.get("preprocessing")
    size = pre.get("input_size") if isinstance(pre, dict) else None
    ok = (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
          and size[0] == input_channels(pre) and all(1 <= v <= MAX_INPUT_SIDE for v in size[1:]))
    crop = pre.get("crop_pct") if isinstance(pre, dict) else None
    if ok and crop is not None:
        ok = isinstance(crop, (int, float)) and not isinstance(crop, bool) and 0 < crop and max(size[1:]) / crop <= MAX_INPUT_SIDE
    if not ok:
        raise ConfigError(f"{str(meta_path)!r}: preprocessing input_size {size!r} / crop_pct {crop!r} is not an image "
                          f"of [C, H, W] (C = 3, or the bands its 'bands' entry feeds) with sides of 1 to {MAX_INPUT_SIDE} pixels "
                          f"after resizing; {fix}")
    want = model.session.get_inputs()[0].shape
    fixed = [(i, d) for i, d in enumerate(want[1:], start=1) if isinstance(d, int)]
    if any(size[i - 1] != d for i, d in fixed):
        raise ConfigError(f"{str(meta_path)!r} preprocesses images to {size} but {str(model.path)!r} takes "
                          f"{list(want[1:])}; the two files are not one export: {fix}")
    width = model.session.get_outputs()[0].shape[-1]
    if not isinstance(width, int):  # a dynamic width: ask the model once
        width = int(model(torch.zeros(1, *size)).shape[-1])
    if width != len(classes):
        raise ConfigError(f"{str(model.path)!r} gives {width} scores per image but {str(meta_path)!r} lists "
                          f"{len(classes)} labels; the two files are not one export: {fix}")


def _check_fresh(run_dir: Path, meta: dict[str, Any], meta_path: Path) -> None:
    """Refuse an export made from an older adapter file of ``run_dir``."""
    recorded = meta.get("run", {}).get("adapter_sha256")
    adapter = run_dir / ADAPTER_FILE
    if recorded and adapter.is_file() and file_sha256(adapter) != recorded:
        raise ConfigError(f"the export {meta_path.parent} was made from an older {ADAPTER_FILE} of {run_dir} "
                          f"(the run was retrained since); re-export with: visiontune export {run_dir}"
                          + (" --int8" if meta.get("precision") == "int8" else ""))


# ----------------------------------------------------------------------------- running it


def session_options(threads: int | None = None) -> Any:
    """onnxruntime session options: ``threads`` intra-op threads (default: torch's thread count, so both
    backends use the same cores) and every graph optimisation (the QDQ -> integer-kernel fusions)."""
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: its warnings about unused initializers say nothing to a user
    return opts


class OnnxRuntimeModel(nn.Module):
    """An ONNX model run by onnxruntime, as a module ``[B, 3, H, W] float -> [B, classes] logits``.

    A module (without parameters) so that the predictor, the evaluation loop and the service call it
    exactly like the PyTorch model; ``eval()``, ``train()`` and ``to("cpu")`` are harmless no-ops.

    Args:
        path: the .onnx file.
        input_name: the model's input tensor name (from the export JSON).
        threads: onnxruntime intra-op threads (default: ``torch.get_num_threads()``).
    """

    def __init__(self, path: str | Path, input_name: str = "pixel_values", threads: int | None = None):
        super().__init__()
        ort = require_onnxruntime()
        self.path = Path(path)
        self.input_name = input_name
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own classes for unreadable models
            raise ConfigError(
                f"{str(self.path)!r} is not a model onnxruntime can load ({type(e).__name__}: {str(e).strip()[:200]}); "
                "re-export it with `visiontune export RUN`"
            ) from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}"


@dataclass
class LoadedExport:
    """An export in memory: the model, its labels, preprocessing and metadata."""

    model: OnnxRuntimeModel
    classes: list[str]
    transform: Callable[[Any], torch.Tensor]
    meta: dict[str, Any]
    model_path: Path
    run_dir: Path | None

    @property
    def precision(self) -> str:
        return str(self.meta.get("precision", "fp32"))

    @property
    def method(self) -> str | None:
        return self.meta.get("run", {}).get("method")

    @property
    def merged(self) -> bool:
        return bool(self.meta.get("run", {}).get("merged", False))

    def limits(
        self, max_pixels: int | None = None, max_aspect: float | None = None,
        settings: tuple[str, str] = ("max_pixels", "max_aspect"),
    ) -> Any:
        """The decoding size guard for this export's inputs: the given limits, else the ones the export
        recorded (the run's ``data.max_pixels`` / ``data.max_aspect``), else the run's config when its
        directory is here, else the defaults."""
        recorded = dict(self.meta.get("image_limits") or {})
        if not recorded and self.run_dir is not None and (self.run_dir / "config.yaml").is_file():
            try:
                data = load_config(self.run_dir / "config.yaml").data
                recorded = {"max_pixels": data.max_pixels, "max_aspect": data.max_aspect}
            except Exception:  # noqa: BLE001 - an unreadable config falls back to the defaults
                recorded = {}
        pixels = recorded.get("max_pixels", DEFAULT_MAX_PIXELS) if max_pixels is None else max_pixels
        aspect = recorded.get("max_aspect", DEFAULT_MAX_ASPECT) if max_aspect is None else max_aspect
        return ImageLimits(int(pixels), float(aspect), *settings)


def load_export(path: str | Path, int8: bool = False, threads: int | None = None) -> LoadedExport:
    """Load an export (or a run directory's export) for onnxruntime inference.

    Raises:
        ConfigError: no export there, a stale export, metadata that is not visiontune's, no onnxruntime.
    """
    require_onnxruntime()
    model_path, meta_path = find_export(path, int8)
    meta = _read_meta(meta_path)
    src = Path(path)
    run_dir = src if src.is_dir() and (src / "config.yaml").is_file() else None
    if run_dir is not None:
        _check_fresh(run_dir, meta, meta_path)
    recorded = meta.get("run", {}).get("run_dir")
    model = OnnxRuntimeModel(model_path, _input_name(meta, meta_path), threads=threads)
    check_export(model, meta, meta_path)
    return LoadedExport(model, list(meta["classes"]), eval_transform(meta["preprocessing"]), meta, model_path,
                        run_dir or (Path(recorded) if recorded else None))


# ----------------------------------------------------------------------------- serving several exports


@dataclass
class _MethodName:
    name: str


@dataclass
class ExportTask:
    """One adapter of an :class:`ExportHost`: its own merged ONNX model, labels and preprocessing."""

    name: str
    model: OnnxRuntimeModel
    classes: list[str]
    transform: Callable[[Any], torch.Tensor]
    method: _MethodName
    source: str
    private_bytes: int
    precision: str


class ExportHost(TaskHost):
    """The service's adapter host over ONNX exports: the interface of :class:`visiontune.multi.AdapterHost`
    (``tasks``, ``classes``, ``logits``, ``transform_for``, ``identity``) with onnxruntime models.

    Nothing is shared here: each adapter is a whole merged model (its size is its ``private_bytes``), so
    exports of different backbones or image sizes can be served together, each with its own preprocessing.
    """

    def __init__(self, tasks: dict[str, ExportTask]):
        if not tasks:
            raise ConfigError("the export host has no adapters; pass at least one --adapter NAME=RUN_OR_EXPORT")
        self.tasks = tasks
        self.device = torch.device("cpu")
        first = next(iter(tasks.values()))
        self.transform = first.transform
        self.precision = "/".join(sorted({t.precision for t in tasks.values()}))
        self.identity = {"backend": "onnxruntime", "precision": self.precision, "shared": False,
                         **self._backbone(first)}

    @staticmethod
    def _backbone(task: ExportTask) -> dict[str, Any]:
        meta = json.loads(task.model.path.with_suffix(".json").read_text())
        return dict(meta.get("backbone") or {})

    @classmethod
    def from_exports(cls, exports: dict[str, str | Path], int8: bool = False, threads: int | None = None) -> ExportHost:
        """Load ``{name: run directory or export}`` (run directories use their ``export/``)."""
        tasks = {}
        for name, path in exports.items():
            exp = load_export(path, int8=int8, threads=threads)
            tasks[name] = ExportTask(name, exp.model, exp.classes, exp.transform, _MethodName(exp.method or "unknown"),
                                     str(path), exp.model_path.stat().st_size, exp.precision)
        return cls(tasks)

    def transform_for(self, name: str) -> Callable[[Any], torch.Tensor]:
        """The preprocessing of task ``name`` (each export brings its own)."""
        return self._task(name).transform

    @torch.inference_mode()
    def logits(self, name: str, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] of task ``name`` for preprocessed images [B, 3, H, W]."""
        return self._task(name).model(images).float()
