"""Evaluating a finished run, or its export (any export backend), on its own test split or on another labeled dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import visiontune.distributed as distributed
from visiontune.config import load_config
from visiontune.data import load_records, make_splits
from visiontune.data.bands import records_dataset, transform_channels
from visiontune.errors import ConfigError
from visiontune.eval.metrics import compute_metrics
from visiontune.infer.files import EVAL_HEADER, check_table_path, write_table
from visiontune.infer.backends import ExportBackend, check_device, check_export_precision, load_export, resolve_backend
from visiontune.runs import load_run
from visiontune.runtime import inference_dtype, make_loader, resolve_device
from visiontune.train.loop import predict_logits


def evaluate_run(
    run_dir: str | Path, data: str | None = None, device: str = "cpu", batch_size: int | None = None,
    progress: bool = True, backend: str | None = None, int8: bool = False, workers: int = 0,
    predictions: str | Path | None = None, precision: str = "run",
) -> dict[str, Any]:
    """Evaluate a finished run on its own test split, or on another dataset (all its images, same labels).

    Args:
        run_dir: a run directory, or an export of one (its test split is found through the run
            directory the export records; ``data`` works without it).
        data: another dataset to evaluate on (same labels).
        device: torch device (export backends run on the CPU).
        batch_size: images per forward pass (default: the run's ``optim.eval_batch_size``).
        progress: a progress bar.
        backend: a registered inference backend (``torch``, ``onnxruntime``, ``openvino``) or None (torch for a
            run, the export's own backend for an export).
        int8: evaluate the INT8 export.
        workers: DataLoader worker processes decoding images (0: in this process). Images are decoded
            batch by batch, never all at once; only the logits of every image are kept.
        predictions: a ``.csv`` file to write one row per image to: ``file, label, predicted, score``.
        precision: torch backend: ``run`` (the run's own ``optim.precision``, fp32 on a CPU), ``fp32`` or ``bf16``
            autocast (:func:`visiontune.runtime.inference_dtype`).

    Under ``torchrun`` / ``accelerate launch`` each process scores a contiguous share of the images
    (:mod:`visiontune.distributed`), every image exactly once; every process returns the same metrics
    and process 0 writes ``predictions``.

    Returns:
        The metrics dict of :func:`visiontune.eval.compute_metrics`, plus ``backend``, ``precision`` and
        ``processes``.
    """
    if predictions is not None:
        check_table_path(predictions)  # before any work
    if workers < 0:
        raise ConfigError(f"workers={workers} must be >= 0 (0 decodes in the main process)")
    if batch_size is not None and batch_size < 1:  # 0 used to mean the run's default, silently
        raise ConfigError(f"--batch-size {batch_size} is invalid; use an integer >= 1, or leave it out for the run's "
                          "optim.eval_batch_size")

    chosen = resolve_backend(backend, run_dir, int8)
    if isinstance(chosen, ExportBackend):
        check_device(chosen, device)
        check_export_precision(chosen, precision)
        distributed.setup("cpu")
        exp = load_export(run_dir, int8=int8, backend=chosen)
        if exp.run_dir is None or not (exp.run_dir / "config.yaml").is_file():
            if data is None:
                raise ConfigError(f"the export {str(run_dir)!r} records no run directory here ({exp.run_dir}), so its test "
                                  "split is unknown; pass --data with labeled images to evaluate on")
        model, classes, transform, dev, amp = exp.model, exp.classes, exp.transform, torch.device("cpu"), None
        cfg = load_config(exp.run_dir / "config.yaml") if exp.run_dir is not None and (exp.run_dir / "config.yaml").is_file() else None
        extra = {"backend": chosen.name, "precision": exp.precision, "model": str(exp.model_path)}
        # The run's decoding size guard (recorded by the export, or its config; defaults without either).
        limits = cfg.data.image_limits() if cfg is not None else exp.limits()
    else:
        dist = distributed.setup(device)
        dev = dist.device if dist is not None else resolve_device(device)
        run = load_run(run_dir, device=str(dev))
        model, classes, transform, cfg = run.model, run.classes, run.transform, run.config
        amp = inference_dtype(precision, cfg.optim.precision, dev)
        extra = {"backend": chosen.name, "precision": "fp32" if amp is None else str(amp).removeprefix("torch.")}
        limits = cfg.data.image_limits()
    if data is None:
        assert cfg is not None
        records = load_records(cfg.data.dataset, root=cfg.data.root, limits=limits, channels=cfg.data.channels)
        if list(records.classes) != classes:
            raise ConfigError(f"the run's dataset {cfg.data.dataset!r} now has classes {records.classes}, not {classes}")
        test = make_splits(records, cfg.data)["test"]
    else:
        test = load_records(data, classes=classes, limits=limits, channels=transform_channels(transform))
    size = batch_size or (cfg.optim.eval_batch_size if cfg is not None else 64)
    loader = distributed.shard_eval(make_loader(records_dataset(test, transform, limits), size, False, 0, workers))
    logits, labels = predict_logits(model, loader, dev, amp, progress and distributed.is_main())
    pred = logits.argmax(1)
    metrics = compute_metrics(labels.numpy(), pred.numpy(), classes)
    dist = distributed.current()
    extra["processes"] = 1 if dist is None else dist.world
    if predictions is not None and distributed.is_main():
        score = torch.softmax(logits, 1).gather(1, pred[:, None])[:, 0]
        write_table(predictions, EVAL_HEADER,
                    ((test.ids[i], classes[int(labels[i])], classes[int(pred[i])], f"{float(score[i]):.6f}")
                     for i in range(len(test))))
    return {**metrics, **extra}
