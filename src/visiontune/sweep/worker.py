"""One run of a sweep, wherever it executes: in this process, in a worker process of the local pool
(:mod:`visiontune.sweep.pool`) or as a Ray task (:mod:`visiontune.sweep.cluster`). :func:`run_entry` reports its
outcome instead of raising, so every executor records failures and resumes the same way."""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any

from visiontune.atomic import write_json_atomic
from visiontune.sweep.spec import SweepEntry, entry_config
from visiontune.train.loop import train


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def worker_threads(workers: int, cores: int | None = None) -> int:
    """Torch threads per worker process: the cores split evenly, so N workers never oversubscribe them."""
    return max(1, (cores or available_cores()) // max(1, workers))


def failure_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"


def train_entry(sweep_base: dict[str, Any], entry: SweepEntry, out: Path, progress: bool, threads: int | None = None) -> float:
    """Train one entry (resuming from its checkpoint if it has one); returns its test accuracy."""
    cfg = entry_config(sweep_base, entry, out)
    # An existing run folder is continued (or, finished, reused), never deleted: train() checks that it was
    # made with this configuration. run_sweep has already refused the sweep if one was not.
    run_dir = out / "runs" / entry.name
    cfg.run.resume, cfg.run.overwrite = run_dir.is_dir() and any(run_dir.iterdir()), False
    cfg.run.progress = progress and cfg.run.progress
    if threads is not None and cfg.run.threads is None:
        cfg.run.threads = threads
    return train(cfg).accuracy


WORKERS_DIR = "workers"
"""Sweep subfolder where a run executing in another process says where it runs (``<run name>.json``)."""


def worker_record_path(sweep_dir: Path, name: str) -> Path:
    """``<sweep dir>/workers/<run name>.json``: pid, host (and Ray node) of the process running that run now."""
    return Path(sweep_dir) / WORKERS_DIR / f"{name}.json"


def run_entry(sweep_base: dict[str, Any], entry: SweepEntry, out: str, threads: int, where: dict[str, Any] | None = None) -> tuple[str, str]:
    """What one worker process does for one run, whichever executor started it (process pool or Ray).

    Sets the torch threads, writes :func:`worker_record_path` (so a stuck or runaway run can be found and
    inspected by pid on whichever machine runs it), trains, and reports instead of raising:
    ``("ok", accuracy)``, ``("failed", error text)`` or ``("interrupted", "")``. The caller records the
    outcome, so both executors fill ``failures.json`` and resume identically.
    """
    import socket

    import torch

    torch.set_num_threads(threads)
    try:
        write_json_atomic(worker_record_path(Path(out), entry.name), {
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "threads": threads, **(where or {}),
        })
        acc = train_entry(sweep_base, entry, Path(out), progress=False, threads=threads)
        return "ok", f"{acc:.4f}"
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent handles it
        return "interrupted", ""
    except Exception as e:  # reported to the parent, which records it and goes on
        return "failed", failure_text(e)



__all__ = ["WORKERS_DIR", "available_cores", "run_entry", "worker_record_path", "worker_threads"]
