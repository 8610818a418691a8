"""One run's ``metrics.json``: reading it back and flattening it into the scalar fields that tables, plots
and CSV exports show (see :mod:`visiontune.eval.report` for the layout)."""

from __future__ import annotations

import json
from pathlib import Path

from visiontune.errors import DataError

METRICS_NAME = "metrics.json"


def section(metrics: dict, key: str) -> dict:
    """``metrics[key]`` when it is a dict, else an empty dict (a section the run did not record)."""
    value = metrics.get(key)
    return value if isinstance(value, dict) else {}


def load_run_metrics(run_dir: str | Path) -> dict:
    """Reads a run directory's ``metrics.json``.

    Args:
        run_dir: the run directory, or the ``metrics.json`` file itself.

    Returns:
        The metrics dict in the layout described in this module's docstring.

    Raises:
        DataError: if the file is missing, is not valid JSON, or has no ``test`` metrics.
    """
    path = Path(run_dir)
    if path.is_dir() or path.suffix != ".json":
        path = path / METRICS_NAME
    if not path.is_file():
        raise DataError(
            f"no {METRICS_NAME} at {path}: {path.parent} is not a finished run directory; "
            "point at the folder a completed `visiontune train` run wrote (its run.dir)"
        )
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            "the run may have been interrupted while writing it — re-run evaluation for this run"
        ) from err
    if not isinstance(metrics, dict) or not isinstance(metrics.get("test"), dict):
        raise DataError(
            f"{path} has no 'test' metrics section (top-level keys: "
            f"{sorted(metrics) if isinstance(metrics, dict) else type(metrics).__name__}); "
            "it was not written by a completed visiontune run"
        )
    return metrics


def summarize_run(metrics: dict) -> dict:
    """Flattens one run's metrics dict into the scalar fields used by tables, plots and CSV exports.

    Args:
        metrics: a metrics dict in the ``metrics.json`` layout.

    Returns:
        Flat dict; fields the run did not record are ``None``.
    """
    run, params, train = section(metrics, "run"), section(metrics, "params"), section(metrics, "train")
    test, val, speed = section(metrics, "test"), section(metrics, "val"), section(metrics, "speed")
    return {
        "name": run.get("name"),
        "method": run.get("method"),
        "backbone": run.get("backbone"),
        "weights": run.get("weights"),
        "dataset": run.get("dataset"),
        "trainable": params.get("trainable"),
        "total": params.get("total"),
        "trainable_pct": params.get("trainable_pct"),
        "train_time_s": train.get("wall_time_s"),
        "epochs": train.get("epochs"),
        "peak_memory_mb": train.get("peak_memory_mb"),
        "test_accuracy": test.get("accuracy"),
        "test_f1_weighted": test.get("f1_weighted"),
        "test_f1_macro": test.get("f1_macro"),
        "val_accuracy": val.get("accuracy"),
        "latency_ms": speed.get("latency_ms"),
        "throughput_img_s": speed.get("throughput_img_s"),
    }
