"""Inference backends behind one protocol and registry: PyTorch (the run itself) and the export backends
(onnxruntime, OpenVINO: a model written by ``visiontune export --format FORMAT``).

An :class:`InferenceBackend` loads a model, runs a batch (the model is a parameter-free
:class:`torch.nn.Module` mapping a float tensor to logits, so the predictor, the evaluation loop and the
service's batcher run every backend unchanged: the same batching, the same errors, the same outputs) and
describes its precision and hardware. Each backend is one module that registers itself with
:func:`register_backend`; :data:`visiontune.registry.INFERENCE_PLUGINS` lists those modules, and the
registry imports them on its first read (as methods are). ``predict``, ``eval``, ``serve``, ``export``
and ``bench-infer`` ask the registry (:func:`resolve_backend`, :func:`export_backend`) and never compare
backend names.

``--backend`` takes a registered name or ``auto`` (the default): torch for a run directory, the export's
own backend for an export (an export folder, its model file, or the JSON beside one). A run directory with
an export backend uses the run's own export (``<run>/export/``, the INT8 model with ``--int8``) and
refuses an export older than the run's adapter file, which would silently answer with the old weights.

Preprocessing comes from the timm data config the export's JSON recorded, through
:func:`visiontune.backbones.transforms.eval_transform`, the function that builds the run's own eval
transform, so every backend sees the same pixels.

Written by hand: the runtimes run the models; what is here is finding the right file, checking it
belongs to the run, and the glue.

Why one module over 500 lines: the protocol, its registry, how a path resolves to a backend, and the checks
that an export belongs to its run and fits its model are one contract every backend and every command relies on;
the format-specific code lives in the plug-ins (``infer/onnxruntime.py``, ``infer/openvino.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal

import numpy as np
import torch
from torch import nn

from visiontune.atomic import publish, staging_path
from visiontune.errors import ConfigError
from visiontune.extras import install_hint
from visiontune.registry import INFERENCE_BACKENDS, INFERENCE_PLUGINS
from visiontune.backbones.transforms import eval_transform
from visiontune.config import load_config
from visiontune.data.images import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, ImageLimits
from visiontune.data.bands import input_channels
from visiontune.multi import TaskHost
from visiontune.runs import ADAPTER_FILE
from visiontune.runtime import cpu_info  # recorded with exports; benchmarks import it from here

EXPORT_FORMAT = "visiontune-onnx/1"
"""The ONNX export JSON's ``format`` tag (other export formats: ``visiontune-<format>/1``, see :meth:`ExportBackend.meta_format`)."""
FP32_NAME, INT8_NAME = "model.onnx", "model.int8.onnx"

Precision = Literal["fp32", "int8"]


class InferenceBackend:
    """What runs a model for ``predict`` / ``eval`` / ``serve`` / ``bench-infer``: one subclass per backend,
    registered by name in :data:`visiontune.registry.INFERENCE_BACKENDS` by the module that defines it.

    The protocol: :meth:`load` a model (an export file here; the torch backend loads run directories through
    :func:`visiontune.runs.load_run` instead), run a batch (the loaded model is a parameter-free
    :class:`torch.nn.Module` ``[B, 3, H, W] float -> [B, classes] logits``, so the predictor, the evaluation loop
    and the service's batcher call every backend alike), and :meth:`describe` its precision and hardware.
    Callers never compare names: they ask the backend (``exports``, ``precisions``, ``extra``).
    """

    name: ClassVar[str] = ""
    format: ClassVar[str | None] = None
    """The ``visiontune export --format`` this backend runs, or None for a backend that runs run directories."""
    extra: ClassVar[str | None] = None
    """The optional extra that installs it (``pip install 'visiontune[EXTRA]'``), None for the base install."""
    modules: ClassVar[tuple[str, ...]] = ()
    """Top-level modules it imports to run a model (checked with find_spec: importing some takes seconds)."""
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    """The precisions it runs; ``int8`` here is what ``--int8`` asks for."""
    summary: ClassVar[str] = ""

    @property
    def exports(self) -> bool:
        """Whether it runs exports (of its :attr:`format`) rather than run directories."""
        return self.format is not None

    def available(self) -> bool:
        """Whether its packages are installed."""
        return all(importlib.util.find_spec(m) is not None for m in self.modules)

    def require(self, what: str | None = None) -> None:
        """Raise the install hint when its packages are missing.

        Raises:
            ConfigError: naming the missing package and ``pip install 'visiontune[EXTRA]'``.
        """
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"{what or f'the {self.name} backend'} needs the {', '.join(missing)} package"
                              f"{'s' if len(missing) > 1 else ''}; install it with: {install_hint(self.extra or self.name)}")

    def versions(self) -> dict[str, str]:
        """Installed versions of its packages (from metadata: importing them is not needed)."""
        out = {}
        for m in self.modules:
            try:
                out[m] = importlib.metadata.version(m)
            except importlib.metadata.PackageNotFoundError:
                pass
        return out

    def describe(self, precision: str = "fp32") -> dict[str, Any]:
        """Backend, precision, runtime versions and the CPU (model, vector extensions) it runs on."""
        return {"backend": self.name, "precision": precision, "runtime": self.versions(), "hardware": cpu_info()}

    def __repr__(self) -> str:
        return f"<inference backend {self.name!r}>"


def register_backend(cls: type[InferenceBackend]) -> type[InferenceBackend]:
    """Class decorator: register one instance of ``cls`` under ``cls.name`` (a duplicate name raises)."""
    INFERENCE_BACKENDS.register(cls.name, cls(), help=cls.summary or (cls.__doc__ or "").strip().split("\n")[0])
    return cls


def all_backends() -> list[InferenceBackend]:
    """Every registered backend, in the plug-in list's order (then any registered from elsewhere)."""
    listed = [name for name, _, _ in INFERENCE_PLUGINS]
    names = [n for n in listed if n in INFERENCE_BACKENDS] + [n for n in INFERENCE_BACKENDS.names() if n not in listed]
    return [INFERENCE_BACKENDS.get(n) for n in names]


def get_backend(name: str) -> InferenceBackend:
    """The backend registered as ``name``.

    Raises:
        ConfigError: an unknown name, with the valid ones.
    """
    return INFERENCE_BACKENDS.get(name)


def export_backend(fmt: str) -> ExportBackend:
    """The backend that writes and runs export format ``fmt`` (``visiontune export --format``).

    Raises:
        ConfigError: an unknown format, with the valid ones.
    """
    found = {b.format: b for b in all_backends() if b.exports}
    if fmt not in found:
        raise ConfigError(f"export format {fmt!r} is not supported; use one of {', '.join(found)}")
    return found[fmt]  # type: ignore[return-value]


class TaggedModel(nn.Module):
    """An exported model as a parameter-free module (``eval()``, ``train()``, ``to("cpu")`` are harmless no-ops);
    every export backend's model is one, so :func:`check_export` can ask any of them for its shapes."""

    path: Path

    @property
    def input_shape(self) -> list[Any]:
        """The model's input shape, an int per fixed dimension and anything else for a dynamic one."""
        raise NotImplementedError

    @property
    def output_width(self) -> int | None:
        """Scores per image when the model fixes it, else None."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}"


class ExportBackend(InferenceBackend):
    """A backend that runs models written by ``visiontune export --format FORMAT``: the file names, the reader,
    and the writer (``convert``, ``quantize``) ``visiontune export`` calls."""

    title: ClassVar[str] = ""
    """How messages name the format (``ONNX``, ``OpenVINO``)."""
    files: ClassVar[tuple[str, str]] = ("", "")
    """The fp32 and INT8 model file names in an export folder; each has its ``.json`` metadata beside it."""
    convert_modules: ClassVar[tuple[str, ...]] = ()
    """Top-level modules the conversion needs (default: :attr:`modules`)."""
    export_options: ClassVar[frozenset[str]] = frozenset()
    """Which of export's format-specific options (exporter, opset, keep_fp32, smoothing) it takes."""
    precisions = ("fp32", "int8")

    def meta_format(self) -> str:
        """The ``format`` tag of its export JSON (``visiontune-onnx/1`` for ONNX: :data:`EXPORT_FORMAT`)."""
        return f"visiontune-{self.format}/1"

    def suffix(self) -> str:
        return Path(self.files[0]).suffix

    def companions(self, model_path: Path) -> list[Path]:
        """Files beside the model that belong to it (OpenVINO's weights ``.bin``); published before it."""
        return []

    def owns(self, path: Path) -> bool:
        """Whether ``path`` (a model file) is one of this backend's."""
        return path.suffix == self.suffix()

    def load(self, model_path: Path, input_name: str = "pixel_values", threads: int | None = None) -> TaggedModel:
        """The model at ``model_path`` as a module (the backend's packages are required)."""
        raise NotImplementedError

    def check_export_options(self, options: dict[str, Any]) -> None:
        """Refuse a format-specific option this backend does not take (given, i.e. not None / empty)."""
        bad = sorted(k for k, v in options.items() if v not in (None, (), []) and k not in self.export_options)
        if bad:
            raise ConfigError(f"--{bad[0].replace('_', '-')} does not apply to --format {self.format}; drop it "
                              f"(it shapes {', '.join(sorted({b.format for b in all_backends() if b.exports and bad[0] in b.export_options}))} exports)")

    def check_options(self, options: dict[str, Any]) -> None:
        """Validate the format-specific options it takes, before any work (default: nothing to check)."""

    def require_convert(self) -> None:
        """Raise the install hint when the conversion's packages are missing."""
        missing = [m for m in (self.convert_modules or self.modules) if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"--format {self.format} export needs the {', '.join(missing)} package; install it with: "
                              f"{install_hint(self.extra or self.name)}")

    @contextlib.contextmanager
    def staging(self, path: Path) -> Iterator[Path]:
        """A temporary name to write the model for ``path`` at, removed afterwards unless :meth:`publish` moved it."""
        staged = staging_path(path)
        try:
            yield staged
        finally:
            staged.unlink(missing_ok=True)

    def publish(self, staged: Path, path: Path) -> None:
        """Move a finished staged model into place, its companions first."""
        publish(staged, path)

    def convert(self, model: nn.Module, input_size: tuple[int, int, int], out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Write ``model`` (``[B, C, H, W] -> [B, classes]``, dynamic batch) to ``out``; returns what to record."""
        raise NotImplementedError

    def label(self, path: Path, meta: dict[str, str]) -> None:
        """Write ``meta`` (labels, run) into the model file itself, where the format has a place for it."""

    def quantize(self, fp32_path: Path, out: Path, images: list[np.ndarray], options: dict[str, Any]) -> dict[str, Any]:
        """Write an INT8 copy of ``fp32_path`` to ``out``, calibrated on preprocessed ``images`` (``3 x H x W``);
        returns the report recorded in the INT8 JSON as ``quantization``."""
        raise NotImplementedError


def default_export_backend() -> ExportBackend:
    """The first export backend of the plug-in list (``visiontune export``'s default ``--format``)."""
    return next(b for b in all_backends() if isinstance(b, ExportBackend))


def export_flags(backend: ExportBackend, int8: bool = False) -> str:
    """The ``visiontune export`` options that make ``backend``'s export (``--format`` unless it is the default)."""
    return (f" --format {backend.format}" if backend is not default_export_backend() else "") + (" --int8" if int8 else "")


def require_onnxruntime(what: str = "the onnxruntime backend") -> Any:
    """Import onnxruntime, or say how to install it."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise ConfigError(f"{what} needs the onnxruntime package; install it with: pip install 'visiontune[onnx]'")
    import onnxruntime

    return onnxruntime


def is_export_path(path: str | Path) -> bool:
    """Whether ``path`` names an export (a model file of an export backend or its .json, or a folder holding an
    export's metadata) rather than a run directory."""
    return export_backend_of(path) is not None


def export_backend_of(path: str | Path) -> ExportBackend | None:
    """The export backend whose export ``path`` names (a model file, its JSON, or a folder that is not a run
    directory), or None: the first in the plug-in list's order when a folder holds several."""
    p = Path(path)
    backends = [b for b in all_backends() if isinstance(b, ExportBackend)]
    if p.is_file():
        if p.suffix == ".json":
            tag = _meta_tag(p)
            return next((b for b in backends if tag == b.meta_format()), None)
        return next((b for b in backends if b.owns(p)), None)
    if p.is_dir() and not (p / "config.yaml").is_file():
        return next((b for b in backends if any((p / Path(f).with_suffix(".json")).is_file() for f in b.files)), None)
    return None


def _meta_tag(path: Path) -> str | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta.get("format") if isinstance(meta, dict) else None


def resolve_backend(backend: str | None, path: str | Path, int8: bool = False) -> InferenceBackend:
    """The backend for ``backend`` (None / ``auto``: the export's own backend for an export, the first run-directory
    backend — torch — for a run directory, the first export backend with such an export there for ``int8``).

    Raises:
        ConfigError: an unknown backend, one whose packages are missing, an export given to a backend that runs
            run directories, or ``int8`` with a backend that has no INT8.
    """
    found = export_backend_of(path)
    if backend in (None, "auto"):
        if found is not None:
            return found
        runs = [b for b in all_backends() if not b.exports]
        if not int8:
            return runs[0]
        exports = [b for b in all_backends() if isinstance(b, ExportBackend)]
        folder = Path(path) / "export"
        return next((b for b in exports if (folder / b.files[1]).is_file()), exports[0])
    b = get_backend(str(backend))
    b.require()
    if not b.exports and found is not None:
        raise ConfigError(f"{str(path)!r} is an {found.title} export, which the {b.name} backend cannot run; use "
                          f"--backend {found.name} (or the run directory it came from with --backend {b.name})")
    if b.exports and found is not None and found is not b:
        raise ConfigError(f"{str(path)!r} is an {found.title} export, which the {b.name} backend cannot run; use "
                          f"--backend {found.name}, or export the run with --format {b.format}")
    if int8 and "int8" not in b.precisions:
        can = [x.name for x in all_backends() if "int8" in x.precisions]
        raise ConfigError(f"--int8 runs an INT8 export and needs a backend that has one ({', '.join(can)}); "
                          f"drop --int8 for {b.name}")
    return b


def check_device(backend: InferenceBackend, device: str | torch.device) -> None:
    """Export backends run on the CPU here: refuse another device."""
    if backend.exports and torch.device(device if device != "auto" else "cpu").type != "cpu":
        raise ConfigError(f"device={str(device)!r} is invalid with the {backend.name} backend, which runs on the CPU "
                          "here; use --device cpu, or --backend torch for the GPU")


def check_export_precision(backend: InferenceBackend, precision: str) -> None:
    """An export computes in the precision it was exported in: only ``run`` / ``fp32`` mean it."""
    if backend.exports and precision not in ("run", "fp32"):
        raise ConfigError(f"--precision {precision} applies to the torch backend; a {backend.name} export computes in "
                          "the precision it was exported in (fp32, or INT8 with --int8): drop --precision or use "
                          "--backend torch")


@register_backend
class TorchBackend(InferenceBackend):
    """PyTorch, eager: the run directory itself (adapters merged where the method allows)."""

    name = "torch"
    modules = ("torch",)
    precisions = ("fp32", "bf16")

    def describe(self, precision: str = "fp32") -> dict[str, Any]:
        return {**super().describe(precision), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (the adapter an export was made from, to detect a stale export)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- finding an export


def find_export(path: str | Path, int8: bool = False, backend: ExportBackend | None = None) -> tuple[Path, Path]:
    """``(model file, metadata .json)`` for a run directory, an export folder, a model file or its JSON.

    Args:
        path: a run directory (its ``export/`` folder is used), an export folder, a model file or its JSON.
        int8: pick the INT8 model where ``path`` is a folder.
        backend: whose export to look for (default: the one ``path`` names, else the first export backend).

    Raises:
        ConfigError: nothing to load there, with the ``visiontune export`` command that makes it.
    """
    p = Path(path)
    backend = backend or export_backend_of(p) or default_export_backend()
    want = backend.files[1] if int8 else backend.files[0]
    flag = export_flags(backend, int8)
    if p.is_dir():
        is_run = (p / "config.yaml").is_file()
        folder = p / "export" if is_run else p
        model = folder / want
        if not model.is_file():
            if is_run:
                raise ConfigError(f"run {str(p)!r} has no {'INT8' if int8 else 'fp32'} {backend.title} export ({model} is "
                                  f"missing); make it with: visiontune export {p}{flag}")
            raise ConfigError(f"{str(p)!r} holds no {want}; pass a run directory, an export folder written by "
                              f"`visiontune export` or a {backend.suffix()} file, or make the export with: "
                              f"visiontune export RUN{flag}")
        return model, model.with_suffix(".json")
    if p.suffix == ".json" and p.is_file():
        meta = _read_meta(p)
        return p.parent / meta["model"], p
    if backend.owns(p) and p.is_file():
        meta_path = p.with_suffix(".json")
        if not meta_path.is_file():
            raise ConfigError(f"{str(p)!r} has no {meta_path.name} beside it (labels and preprocessing); re-export it "
                              "with `visiontune export RUN`, which writes both")
        meta = _read_meta(meta_path)
        if int8 and meta.get("precision", "fp32") != "int8":
            raise ConfigError(f"{str(p)!r} is a {meta.get('precision', 'fp32')} export, not INT8; drop --int8 or pass "
                              f"{p.with_name(backend.files[1])}")
        return p, meta_path
    raise ConfigError(f"{str(p)!r} does not exist or is not a run directory, an export folder, a model file "
                      f"({', '.join(b.suffix() for b in all_backends() if isinstance(b, ExportBackend))}) or its .json")


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the export metadata {str(path)!r} ({exc}); re-export with `visiontune export RUN`") from None
    tags = [b.meta_format() for b in all_backends() if isinstance(b, ExportBackend)]
    if not isinstance(meta, dict) or meta.get("format") not in tags:
        raise ConfigError(f"{str(path)!r} is not a visiontune export's metadata (format {' or '.join(map(repr, tags))}); "
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


def check_export(model: TaggedModel, meta: dict[str, Any], meta_path: Path) -> None:
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
    want = model.input_shape
    fixed = [(i, d) for i, d in enumerate(want[1:], start=1) if isinstance(d, int)]
    if any(size[i - 1] != d for i, d in fixed):
        raise ConfigError(f"{str(meta_path)!r} preprocesses images to {size} but {str(model.path)!r} takes "
                          f"{list(want[1:])}; the two files are not one export: {fix}")
    width = model.output_width
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
        fmt = meta.get("format", "")
        backend = next((b for b in all_backends() if isinstance(b, ExportBackend) and b.meta_format() == fmt),
                       default_export_backend())
        raise ConfigError(f"the export {meta_path.parent} was made from an older {ADAPTER_FILE} of {run_dir} "
                          f"(the run was retrained since); re-export with: visiontune export {run_dir}"
                          + export_flags(backend, meta.get("precision") == "int8"))


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


class OnnxRuntimeModel(TaggedModel):
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

    @property
    def input_shape(self) -> list[Any]:
        return list(self.session.get_inputs()[0].shape)

    @property
    def output_width(self) -> int | None:
        width = self.session.get_outputs()[0].shape[-1]
        return width if isinstance(width, int) else None


@dataclass
class LoadedExport:
    """An export in memory: the model, its labels, preprocessing and metadata."""

    model: TaggedModel
    classes: list[str]
    transform: Callable[[Any], torch.Tensor]
    meta: dict[str, Any]
    model_path: Path
    run_dir: Path | None
    backend: ExportBackend

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


def load_export(
    path: str | Path, int8: bool = False, threads: int | None = None, backend: ExportBackend | None = None,
) -> LoadedExport:
    """Load an export (or a run directory's export) for inference on its backend.

    Args:
        path: a run directory (its ``export/``), an export folder, a model file or its JSON.
        int8: the INT8 model.
        threads: the runtime's intra-op threads (default: torch's thread count).
        backend: whose export (default: the one ``path`` names, else the first export backend).

    Raises:
        ConfigError: no export there, a stale export, metadata that is not visiontune's, a missing package.
    """
    backend = backend or export_backend_of(path) or default_export_backend()
    backend.require()
    model_path, meta_path = find_export(path, int8, backend)
    meta = _read_meta(meta_path)
    src = Path(path)
    run_dir = src if src.is_dir() and (src / "config.yaml").is_file() else None
    if run_dir is not None:
        _check_fresh(run_dir, meta, meta_path)
    recorded = meta.get("run", {}).get("run_dir")
    model = backend.load(model_path, _input_name(meta, meta_path), threads=threads)
    check_export(model, meta, meta_path)
    return LoadedExport(model, list(meta["classes"]), eval_transform(meta["preprocessing"]), meta, model_path,
                        run_dir or (Path(recorded) if recorded else None), backend)


# ----------------------------------------------------------------------------- serving several exports


@dataclass
class _MethodName:
    name: str


@dataclass
class ExportTask:
    """One adapter of an :class:`ExportHost`: its own merged ONNX model, labels and preprocessing."""

    name: str
    model: TaggedModel
    classes: list[str]
    transform: Callable[[Any], torch.Tensor]
    method: _MethodName
    source: str
    private_bytes: int
    precision: str


class ExportHost(TaskHost):
    """The service's adapter host over exports: the interface of :class:`visiontune.multi.AdapterHost`
    (``tasks``, ``classes``, ``logits``, ``transform_for``, ``identity``) with an export backend's models.

    Nothing is shared here: each adapter is a whole merged model (its size is its ``private_bytes``), so
    exports of different backbones or image sizes can be served together, each with its own preprocessing.
    """

    def __init__(self, tasks: dict[str, ExportTask], backend: ExportBackend):
        if not tasks:
            raise ConfigError("the export host has no adapters; pass at least one --adapter NAME=RUN_OR_EXPORT")
        self.tasks = tasks
        self.device = torch.device("cpu")
        first = next(iter(tasks.values()))
        self.transform = first.transform
        self.precision = "/".join(sorted({t.precision for t in tasks.values()}))
        self.identity = {"backend": backend.name, "precision": self.precision, "shared": False,
                         **self._backbone(first)}

    @staticmethod
    def _backbone(task: ExportTask) -> dict[str, Any]:
        meta = json.loads(task.model.path.with_suffix(".json").read_text())
        return dict(meta.get("backbone") or {})

    @classmethod
    def from_exports(
        cls, exports: dict[str, str | Path], int8: bool = False, threads: int | None = None,
        backend: ExportBackend | None = None,
    ) -> ExportHost:
        """Load ``{name: run directory or export}`` (run directories use their ``export/``) on ``backend`` (default:
        the first export's own, else the first export backend)."""
        first = next(iter(exports.values()), None)
        backend = backend or (export_backend_of(first) if first is not None else None) or default_export_backend()
        tasks = {}
        for name, path in exports.items():
            exp = load_export(path, int8=int8, threads=threads, backend=backend)
            tasks[name] = ExportTask(name, exp.model, exp.classes, exp.transform, _MethodName(exp.method or "unknown"),
                                     str(path), sum(f.stat().st_size for f in (exp.model_path, *backend.companions(exp.model_path))),
                                     exp.precision)
        return cls(tasks, backend)

    def transform_for(self, name: str) -> Callable[[Any], torch.Tensor]:
        """The preprocessing of task ``name`` (each export brings its own)."""
        return self._task(name).transform

    @torch.inference_mode()
    def logits(self, name: str, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] of task ``name`` for preprocessed images [B, 3, H, W]."""
        return self._task(name).model(images).float()
