"""Running a sweep (:func:`run_sweep`): every entry not finished yet, in this process, in a local process pool or
on Ray, each outcome recorded in ``failures.json``, each invocation in ``sweep.json``, then the report."""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from visiontune.atomic import write_json_atomic
from visiontune.errors import ConfigError
from visiontune.rundir import read_json
from visiontune.sweep.cluster import check_executor, run_on_ray
from visiontune.sweep.pool import run_parallel
from visiontune.sweep.report import aggregate, claim_sweep_dir
from visiontune.sweep.resume import existing_runs, refuse_changed
from visiontune.sweep.spec import Sweep, SweepEntry, read_failures
from visiontune.sweep.worker import (
    WORKERS_DIR, failure_text, train_entry, available_cores, run_entry, worker_record_path, worker_threads,
)


def run_sweep(
    sweep: Sweep, progress: bool = True, workers: int | None = None, report: bool = True, executor: str = "local",
    ray_address: str | None = None, cpus_per_run: int | None = None, gpus_per_run: float | None = None,
) -> dict[str, Any]:
    """Run every entry not finished yet (resuming from checkpoints), then aggregate.

    Args:
        sweep: from :func:`load_sweep`.
        progress: show the sweep's progress bar (and each run's, when sequential).
        workers: local executor: 1 (default) runs in this process, one after another; N > 1 runs up to N at
            a time, each in its own process with ``cores // N`` torch threads (unless the config sets
            ``run.threads``). Ray: at most N runs in flight (default: as many as the cluster's resources allow).
            Runs are seeded, so results do not depend on this beyond floating-point summation order.
        report: aggregate afterwards (results.csv, report.md, figures; see :func:`aggregate`).
        executor: ``local`` or ``ray`` (each run a Ray task; see :mod:`visiontune.sweep.cluster`).
        ray_address: the Ray cluster to join (default ``RAY_ADDRESS``, else a local instance is started).
        cpus_per_run: Ray: CPUs reserved per run, also its torch threads (default: a GPU's share of the
            cluster's CPUs when runs get GPUs, else :data:`visiontune.sweep.cluster.DEFAULT_CPUS_PER_RUN`).
        gpus_per_run: Ray: GPUs per run (default 1 when the cluster has GPUs and the runs do not ask for
            ``run.device=cpu``, else 0).

    Returns:
        {"done": [...], "skipped": [...], "failed": {name: error}, "report": path or None}
    """
    from tqdm.auto import tqdm

    check_executor(executor, ray_address=ray_address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run)
    if workers is not None and workers < 1:
        raise ConfigError(f"workers={workers} must be >= 1 (1 = sequential in this process)")
    if executor == "local":
        workers = workers or 1
    states = existing_runs(sweep)
    refuse_changed(sweep, states)  # before anything is written
    claim_sweep_dir(sweep.dir)
    fail_path = sweep.dir / "failures.json"
    failures = read_failures(sweep.dir)
    done: list[str] = []
    skipped = [e.name for e in sweep.entries if states[e.name][0].kind == "finished"]
    todo = [e for e in sweep.entries if e.name not in set(skipped)]
    bar = tqdm(total=len(sweep.entries), initial=len(skipped), desc="sweep", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    how: dict[str, Any] = {"executor": executor, "workers": workers}

    def record(entry: SweepEntry, state: str, text: str) -> None:
        if state == "ok":
            done.append(entry.name)
            failures.pop(entry.name, None)
            if progress:
                bar.write(f"[sweep] {entry.name}: test accuracy {text}")
        else:  # one run's failure must not stop the sweep: record it and go on
            failures[entry.name] = text
            if progress:
                bar.write(f"[sweep] {entry.name} failed: {text.splitlines()[0]}")
        write_json_atomic(fail_path, failures)
        worker_record_path(sweep.dir, entry.name).unlink(missing_ok=True)

    try:
        if executor == "ray":
            how.update(run_on_ray(sweep, todo, bar, record, address=ray_address, cpus_per_run=cpus_per_run,
                                  gpus_per_run=gpus_per_run, max_in_flight=workers, on_start=how.update,
                                  run_entry=run_entry, cores=available_cores()))
        elif workers == 1:
            for entry in todo:
                bar.set_postfix_str(entry.name[:60])
                try:
                    acc = train_entry(sweep.base, entry, sweep.dir, progress)
                    record(entry, "ok", f"{acc:.4f}")
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    record(entry, "failed", failure_text(e))
                bar.update(1)
        else:
            run_parallel(sweep, todo, workers, bar, record)
    finally:
        bar.close()
        with contextlib.suppress(OSError):  # left only while runs execute elsewhere; drop it once empty
            (sweep.dir / WORKERS_DIR).rmdir()
        _log_session(sweep, how, time.perf_counter() - started, len(done), len(skipped))
    path = aggregate(sweep) if report else None
    return {"done": done, "skipped": skipped, "failed": failures, "report": str(path) if path else None}


def _log_session(sweep: Sweep, how: dict[str, Any], wall: float, done: int, skipped: int) -> None:
    """Append this invocation to sweep.json, so the report can say how long the sweep took and how it ran."""
    import torch


    path = sweep.dir / "sweep.json"
    data, problem = read_json(path) if path.exists() else ({"sessions": []}, None)
    if problem or not isinstance(data, dict) or not isinstance(data.get("sessions"), list):
        print(f"[sweep] warning: {problem or f'{path} has no sessions list'}; starting a new session log", file=sys.stderr)
        data = {"sessions": []}
    session: dict[str, Any] = {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - wall)),
        "wall_time_s": round(wall, 2), "executor": how.get("executor", "local"), "workers": how.get("workers"),
    }
    if session["executor"] == "local":
        workers = how.get("workers") or 1
        session["threads_per_worker"] = worker_threads(workers) if workers > 1 else torch.get_num_threads()
        session["cores"] = available_cores()
    else:
        session.update({k: v for k, v in how.items() if k not in session})
    session.update(done=done, skipped=skipped)
    data["sessions"].append(session)
    write_json_atomic(path, data)


__all__ = ["run_sweep"]
