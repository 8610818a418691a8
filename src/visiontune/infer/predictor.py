"""The predictor: a finished run as a callable from images to top-k ``[{"label", "score"}]``.

The ModelScope vision-efficient-tuning pipeline answers one image with its candidate labels and their
confidences; this is that interface over a visiontune run directory. It loads the run through
:func:`visiontune.runs.load_run` with ``merge=True`` (adapters folded into the backbone where the
method allows) and preprocesses with the run's own eval transform, so a prediction here sees exactly
the pixels evaluation saw. Decoding goes through :func:`visiontune.data.load_image` for the same reason.

Written by hand because it is glue: what it does (accept paths / PIL images / arrays / bytes, batch
them, soft-max and rank) is specific to visiontune's run format; timm and torchvision supply the
transform and the model.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from visiontune.data.bands import blank_input, decode_for, transform_channels
from visiontune.data.images import ImageLimits, decode_image
from visiontune.errors import ConfigError, DataError
from visiontune.runtime import autocast, inference_dtype, resolve_device
from visiontune.infer.backends import ExportBackend, check_device, check_export_precision, load_export, resolve_backend
from visiontune.runs import load_run

ImageInput = str | os.PathLike | Image.Image | np.ndarray | bytes | bytearray
"""One image: a file path, a PIL image, a uint8 array (HxW[xC]), or encoded file bytes (PNG, JPEG ...)."""

Prediction = list[dict[str, Any]]
"""Top-k of one image, best first: ``[{"label": str, "score": float in [0, 1]}, ...]``."""


def decode_bytes(data: bytes | bytearray, name: str = "uploaded image", limits: ImageLimits | None = None) -> Image.Image:
    """Decode encoded image bytes to 8-bit RGB: :func:`visiontune.data.images.decode_image` on bytes.

    Raises:
        ImageTooLargeError: beyond ``limits`` (pixels or aspect ratio), naming the limit and its setting.
        DataError: empty data, or not an image PIL can decode; the message names ``name``.
    """
    return decode_image(bytes(data), name, limits)


def to_image(item: ImageInput, name: str | None = None, limits: ImageLimits | None = None) -> Image.Image:
    """Any supported single-image input -> 8-bit RGB PIL image (through the same size guard).

    Raises:
        DataError: unreadable file, undecodable bytes, an image beyond ``limits``, or an array that is
            not an image.
        TypeError: an unsupported input type.
    """
    if isinstance(item, (bytes, bytearray)):
        return decode_image(bytes(item), name or "image bytes", limits)
    if isinstance(item, (str, os.PathLike, np.ndarray, Image.Image)):
        return decode_image(item, name, limits)
    raise TypeError(
        f"cannot predict on a {type(item).__name__}; pass a file path, a PIL image, a uint8 numpy array "
        "(HxW, HxWxC, or NxHxWxC for a batch), encoded image bytes, or a list of these"
    )


def check_top_k(top_k: Any) -> int:
    """Validate ``top_k`` (an integer >= 1) and return it as an int.

    Raises:
        ConfigError: naming the bad value.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ConfigError(f"top_k={top_k!r} is invalid; use an integer >= 1 (larger than the number of labels means all)")
    return int(top_k)


def top_k_predictions(probs: torch.Tensor, classes: Sequence[str], top_k: int) -> list[Prediction]:
    """Rank each row of ``probs`` [B, C] and return the best ``top_k`` labels per row (all if fewer)."""
    k = min(check_top_k(top_k), probs.shape[1])
    scores, idx = probs.float().topk(k, dim=1)
    return [
        [{"label": classes[i], "score": float(s)} for s, i in zip(row_s, row_i)]
        for row_s, row_i in zip(scores.tolist(), idx.tolist())
    ]


@dataclass
class PredictionResult:
    """One input's outcome in :meth:`Predictor.predict_many`: predictions, or the error that stopped it."""

    source: str
    predictions: Prediction | None = None
    error: str | None = None


def _is_batch(inputs: Any) -> bool:
    if isinstance(inputs, (list, tuple)):
        return True
    return isinstance(inputs, np.ndarray) and inputs.ndim == 4


def _source_name(item: Any, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return f"<{type(item).__name__} #{index}>"


class Predictor:
    """Top-k label predictions from a trained model, with the run's eval preprocessing.

    Build it with :func:`pipeline` / :meth:`from_run`; call it on one image or a batch::

        predict = vt.pipeline("runs/my-run")
        predict("cow.jpg")                     # [{"label": "lying", "score": 0.91}, ...]
        predict(["a.jpg", pil_img, array])     # one list per image

    Args:
        model: maps ``[B, 3, H, W]`` to logits ``[B, len(classes)]`` (eval mode).
        classes: label names in logit order.
        transform: RGB PIL image -> ``3 x H x W`` tensor (the run's eval transform).
        device: where ``model`` lives.
        top_k: default number of labels returned per image.
        batch_size: images per forward pass for batch input.
        amp: autocast dtype (None: the model's own precision).
        merged: whether ``model`` has the adapters folded in (reported by :attr:`info`).
        run_dir: the run it came from, if any.
        method: the run's method name, if any (reported by :attr:`info`).
        limits: the decoding size guard (largest image, most elongated aspect ratio) every input passes.
        backend: the inference backend's name (``torch``; an export backend's for :meth:`from_export`); reported by :attr:`info`.
        precision: what the model computes in (default: ``fp32``, or the ``amp`` dtype); reported by :attr:`info`.
    """

    def __init__(
        self, model: nn.Module, classes: Sequence[str], transform: Callable[[Image.Image], torch.Tensor],
        device: str | torch.device = "cpu", top_k: int = 5, batch_size: int = 32, amp: torch.dtype | None = None,
        merged: bool = False, run_dir: str | Path | None = None, method: str | None = None,
        limits: ImageLimits | None = None, backend: str = "torch", precision: str | None = None,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} is invalid; use an integer >= 1")
        self.model = model.eval()
        self.classes = list(classes)
        self.transform = transform
        self.device = torch.device(device)
        self.top_k = check_top_k(top_k)
        self.batch_size = int(batch_size)
        self.amp = amp
        self.merged = merged
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.method = method
        self.limits = limits or ImageLimits()
        self.backend = backend
        self.precision = precision or ("fp32" if amp is None else str(amp).removeprefix("torch.").replace("bfloat16", "bf16"))

    @classmethod
    def from_run(
        cls, run_dir: str | Path, device: str = "cpu", merge: bool = True, top_k: int = 5, batch_size: int = 32,
        max_pixels: int | None = None, max_aspect: float | None = None, settings: tuple[str, str] = ("max_pixels", "max_aspect"),
        precision: str = "run",
    ) -> Predictor:
        """Load a finished run directory (merged fast path when ``merge`` and the method allows).

        ``precision``: ``run`` (the run's ``optim.precision``: fp32 on a CPU), ``fp32`` or ``bf16`` autocast
        (:func:`visiontune.runtime.inference_dtype`).

        ``max_pixels`` / ``max_aspect`` default to the run's ``data.max_pixels`` / ``data.max_aspect``,
        so images like the ones it was trained on are accepted; ``settings`` is how errors name them
        (``("--max-pixels", "--max-aspect")`` for the command line).

        Raises:
            ConfigError: not a run directory. WeightsError: the adapter does not fit its backbone.
        """
        dev = resolve_device(device)
        run = load_run(run_dir, device=str(dev), merge=merge)
        return cls(
            run.model.eval(), run.classes, run.transform, device=dev, top_k=top_k, batch_size=batch_size,
            amp=inference_dtype(precision, run.config.optim.precision, dev), merged=run.merged, run_dir=run.run_dir,
            method=run.config.method.name,
            limits=ImageLimits(
                int(run.config.data.max_pixels if max_pixels is None else max_pixels),
                float(run.config.data.max_aspect if max_aspect is None else max_aspect), *settings,
            ),
        )

    @classmethod
    def from_export(
        cls, path: str | Path, int8: bool = False, top_k: int = 5, batch_size: int = 32, threads: int | None = None,
        max_pixels: int | None = None, max_aspect: float | None = None, settings: tuple[str, str] = ("max_pixels", "max_aspect"),
        backend: ExportBackend | None = None,
    ) -> Predictor:
        """A predictor for an export (folder, model file, its .json) or a run directory's own export, run by
        ``backend`` (default: the export's own backend; for a run directory, the first export backend).

        Preprocessing is the one the export recorded, built by the same function as the run's; inputs
        pass the same decoding size guard, ``max_pixels`` / ``max_aspect`` defaulting to the run's
        ``data.max_pixels`` / ``data.max_aspect`` (recorded by the export).

        Raises:
            ConfigError: no export there (naming the ``visiontune export`` command), a stale export, or
                the backend's package missing.
        """
        exp = load_export(path, int8=int8, threads=threads, backend=backend)
        return cls(exp.model, exp.classes, exp.transform, device="cpu", top_k=top_k, batch_size=batch_size,
                   merged=exp.merged, run_dir=exp.run_dir, method=exp.method, limits=exp.limits(max_pixels, max_aspect, settings),
                   backend=exp.backend.name, precision=exp.precision)

    # ------------------------------------------------------------------ info
    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` the transform produces."""
        return tuple(self.transform(blank_input(self.transform)).shape)  # type: ignore[return-value]

    @property
    def info(self) -> dict[str, Any]:
        """What is being served: run, method, labels, merged or not, device, input size."""
        return {
            "run_dir": str(self.run_dir) if self.run_dir else None, "method": self.method, "classes": self.classes,
            "merged": self.merged, "device": str(self.device), "input_size": list(self.input_size),
            "backend": self.backend, "precision": self.precision,
        }

    # ------------------------------------------------------------------ prediction
    def preprocess(self, item: ImageInput, name: str | None = None) -> torch.Tensor:
        """One input -> the normalised ``C x H x W`` tensor the model sees (a multi-band run reads ``.npy`` / ``.tif``
        paths, their bytes or ``HxWxC`` / ``CxHxW`` arrays through :func:`visiontune.data.bands.decode_for`)."""
        if transform_channels(self.transform) is not None:
            return self.transform(decode_for(self.transform, item, name, self.limits))
        return self.transform(to_image(item, name, self.limits))

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Soft-max class probabilities ``[B, C]`` (on CPU) of preprocessed images ``[B, 3, H, W]``."""
        with autocast(self.device, self.amp):
            logits = self.model(batch.to(self.device))
        return logits.float().softmax(dim=1).cpu()

    def __call__(self, inputs: ImageInput | Sequence[ImageInput], top_k: int | None = None) -> Prediction | list[Prediction]:
        """Top-k labels of one image, or one list per image for a list / tuple / ``N x H x W x C`` array.

        Raises:
            DataError: an input cannot be decoded (for batches, :meth:`predict_many` reports per input instead).
            ConfigError: a bad ``top_k``.
        """
        k = check_top_k(self.top_k if top_k is None else top_k)
        if not _is_batch(inputs):
            return top_k_predictions(self.probabilities(self.preprocess(inputs)[None]), self.classes, k)[0]  # type: ignore[arg-type]
        items = list(inputs)  # type: ignore[arg-type]
        out: list[Prediction] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            x = torch.stack([self.preprocess(it, _source_name(it, start + i)) for i, it in enumerate(chunk)])
            out.extend(top_k_predictions(self.probabilities(x), self.classes, k))
        return out

    def predict_many(
        self, items: Iterable[ImageInput], top_k: int | None = None, progress: bool = False, workers: int = 2,
    ) -> Iterator[PredictionResult]:
        """Predict a stream of inputs in batches; an unreadable input yields an error result, the rest go on.

        Decoding and preprocessing run on ``workers`` threads (PIL and torchvision release the GIL
        while decoding and resizing) while the model runs batch by batch.

        Args:
            items: inputs (paths are named by their path in results, others by type and position).
            top_k: labels per image (default: the predictor's).
            progress: show a progress bar (tqdm, on stderr).
            workers: preprocessing threads.
        """
        from tqdm import tqdm

        k = check_top_k(self.top_k if top_k is None else top_k)
        items = list(items)

        def prep(pair: tuple[int, ImageInput]) -> tuple[str, torch.Tensor | None, str | None]:
            i, it = pair
            name = _source_name(it, i)
            try:
                return name, self.preprocess(it, name), None
            except (DataError, TypeError) as exc:
                return name, None, str(exc)

        bar = tqdm(total=len(items), disable=not progress, unit="img", dynamic_ncols=True, desc="predict")
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for start in range(0, len(items), self.batch_size):
                prepared = list(pool.map(prep, enumerate(items[start:start + self.batch_size], start)))
                good = [(n, t) for n, t, e in prepared if t is not None]
                preds = iter(top_k_predictions(self.probabilities(torch.stack([t for _, t in good])), self.classes, k)) if good else iter(())
                for name, tensor, error in prepared:
                    yield PredictionResult(name, error=error) if tensor is None else PredictionResult(name, next(preds))
                bar.update(len(prepared))
        bar.close()


def pipeline(
    run_dir: str | Path, device: str = "cpu", merge: bool = True, top_k: int = 5, batch_size: int = 32,
    max_pixels: int | None = None, max_aspect: float | None = None, backend: str | None = None, int8: bool = False,
    settings: tuple[str, str] = ("max_pixels", "max_aspect"), precision: str = "run",
) -> Predictor:
    """A :class:`Predictor` for a finished run directory: ``vt.pipeline("runs/<name>")("img.jpg")``.

    Args:
        run_dir: a run directory written by :func:`visiontune.train`, or an export of one (``visiontune export``:
            its folder, its model file, e.g. ``model.onnx`` / ``openvino_model.int8.xml``, or the JSON beside it).
        device: ``cpu``, ``cuda``, ``auto`` ... (torch backend; export backends run on the CPU).
        merge: fold adapters into the backbone when the method allows (same outputs, faster).
        top_k: default labels returned per image.
        batch_size: images per forward pass for batch input.
        max_pixels: largest decoded image (width x height; default: the run's ``data.max_pixels``).
            Larger JPEGs are decoded at reduced scale, other images are refused with a DataError.
        max_aspect: largest longer / shorter side ratio (default: the run's ``data.max_aspect``).
        backend: a registered inference backend (``torch``, ``onnxruntime``, ``openvino``; an export backend
            on a run directory uses its ``export/``), or None for torch on a run and the export's own backend
            on an export.
        int8: the INT8 export (export backends only).
        settings: how errors name ``max_pixels`` / ``max_aspect`` (``("--max-pixels", "--max-aspect")``
            for the command line).
        precision: torch backend: ``run`` (the run's own, fp32 on a CPU), ``fp32`` or ``bf16`` autocast.
    """
    chosen = resolve_backend(backend, run_dir, int8)
    if isinstance(chosen, ExportBackend):
        check_device(chosen, device)
        check_export_precision(chosen, precision)
        return Predictor.from_export(run_dir, int8=int8, top_k=top_k, batch_size=batch_size,
                                     max_pixels=max_pixels, max_aspect=max_aspect, settings=settings, backend=chosen)
    return Predictor.from_run(run_dir, device=device, merge=merge, top_k=top_k, batch_size=batch_size,
                              max_pixels=max_pixels, max_aspect=max_aspect, settings=settings, precision=precision)
