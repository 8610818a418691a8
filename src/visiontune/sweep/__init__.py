"""Method-comparison sweeps: a base config plus a grid, run one by one, resumable, aggregated.

A sweep file (YAML)::

    base: ../demo.yaml            # a run config (path relative to this file) or an inline mapping
    dir: runs/sweeps/my-sweep     # where runs, results.csv, report.md and plots go
    seeds: [0, 1]                 # run.seed values; every entry runs once per seed
    runs:                         # explicit entries (dotted overrides), e.g. the baselines
      - {method.name: linear}
      - {method.name: scratch, backbone.name: resnet18}
    grid:                         # plus the cartesian product of these lists
      method.name: [qlora, dora]
      method.targets: [q, all-linear]
      method.rank: [8, 16, 64]

``--dry-run`` (:func:`check_sweep`) checks every run against the real model classes on the meta device
(no weights, no data) and names the runs that cannot start.

Resumable: a finished run (every artifact reads back) is skipped and one with a checkpoint resumes
from it -- but only when it was made with the configuration the sweep asks for now: a rerun with other
overrides is refused up front, naming each such run and the keys that differ, instead of reporting
old results under a new command. One run's failure is recorded in ``failures.json`` and the rest go on. Runs go one after another in
this process by default, ``workers`` at a time in their own processes, or as Ray tasks on a local instance
or a cluster (``executor="ray"``, :mod:`visiontune.sweep.cluster`); both multi-process executors run
:func:`run_entry` and record outcomes the same way. Each invocation is logged
in ``sweep.json``; :func:`aggregate` (``sweep/report.py``) writes results.csv, report.md and figures.
Written by hand: no library does grid expansion over this config vocabulary plus study-style aggregation.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import re
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import yaml

from visiontune.atomic import write_json_atomic
from visiontune.config import Config, apply_overrides
from visiontune.errors import ConfigError
from visiontune.sweep.check import EntryCheck, check_sweep, format_check, summarize_checks
from visiontune.sweep.report import aggregate, claim_sweep_dir, mean_std
from visiontune.sweep.spec import Sweep, SweepEntry, entry_config, read_failures
from visiontune.train.loop import train
from visiontune.data import load_records, make_splits
from visiontune.data.splits import split_identity
from visiontune.registry import METHODS
from visiontune.rundir import read_json, read_yaml_mapping
from visiontune.runs import config_changes, finished_run_changes, inspect_run
from visiontune.sweep.cluster import EXECUTORS, check_executor, run_on_ray
from visiontune.train.loop import resolve_config

__all__ = [
    "EXECUTORS", "EntryCheck", "Sweep", "SweepEntry", "aggregate", "available_cores", "check_sweep", "entry_config",
    "format_check", "load_sweep", "mean_std", "run_entry", "run_sweep", "summarize_checks", "sweep_status",
    "worker_record_path", "worker_threads",
]


def _slug(overrides: dict[str, Any]) -> str:
    """A readable run name from overrides: method=dora__targets=q__rank=8 (``x.name`` keys show as ``x``)."""
    parts = []
    for k, v in overrides.items():
        keys = k.split(".")
        label = keys[-2] if keys[-1] == "name" and len(keys) > 1 else keys[-1]
        v = "+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        parts.append(f"{label}={v}")
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "__".join(parts)) or "base"


def load_sweep(path: str | Path, overrides: list[str] | None = None, validate: bool = True) -> Sweep:
    """Parse and expand a sweep file; ``overrides`` (dotted) apply to the base config of every run.

    Args:
        validate: check every entry's config (False leaves that to :func:`check_sweep`, which reports
            each run's problems on its own line instead of raising).

    Raises:
        ConfigError: a missing/invalid file, or entries whose configs are invalid (all reported at once).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist; see configs/sweeps/ for examples")
    spec = _read_yaml(path, "sweep file") or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {str(path)!r} should hold a mapping with base, dir, runs and/or grid")
    unknown = set(spec) - {"base", "dir", "seeds", "runs", "grid"}
    if unknown:
        raise ConfigError(f"unknown sweep keys {sorted(unknown)} in {path}; valid: base, dir, seeds, runs, grid")
    base = spec.get("base") or {}
    if isinstance(base, str):
        bpath = (path.parent / base).resolve()
        if not bpath.is_file():
            raise ConfigError(f"sweep base config {str(bpath)!r} (from {path}) does not exist")
        base = _read_yaml(bpath, "sweep base config") or {}
    _check_spec_shapes(path, spec, base)
    base = apply_overrides(copy.deepcopy(base), list(overrides or []))
    out = Path(spec.get("dir") or (base.get("run") or {}).get("dir") or f"runs/sweeps/{path.stem}")
    seeds = [int(s) for s in (spec.get("seeds") or [(base.get("run") or {}).get("seed", 0)])]
    combos: list[dict[str, Any]] = [dict(r) for r in (spec.get("runs") or [])]
    grid = spec.get("grid") or {}
    if grid:
        keys = list(grid)
        lists = [v if isinstance(v, list) else [v] for v in grid.values()]
        combos += [dict(zip(keys, values)) for values in itertools.product(*lists)]
    if not combos:
        combos = [{}]
    entries, problems = [], []
    for combo in combos:
        group = _slug(combo)
        for seed in seeds:
            name = f"{group}__seed={seed}" if len(seeds) > 1 else group
            entries.append(SweepEntry(name=name, overrides=combo, seed=seed, group=group))
            if not validate:
                continue
            try:
                entry_config(base, entries[-1], out)
            except ConfigError as e:
                problems += [f"{name}: {p}" for p in e.problems]
    if len({e.name for e in entries}) != len(entries):
        raise ConfigError(f"sweep {path} expands to duplicate run names; make its runs/grid entries distinct")
    if problems:
        raise ConfigError(problems)
    return Sweep(base=base, dir=out, entries=entries)


def _read_yaml(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(e, "problem", None) or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ConfigError(f"{what} {str(path)!r} is not readable YAML ({reason}{where}); see configs/sweeps/ for "
                          "examples") from None


def _check_spec_shapes(path: Path, spec: dict[str, Any], base: Any) -> None:
    """Every malformed part of a sweep file at once, before anything is expanded (each names the key and the fix)."""
    problems = []
    if not isinstance(base, dict):
        problems.append(f"base should be a mapping of config sections (or a config file's path), not {base!r}")
    elif not isinstance(base.get("run") or {}, dict):
        problems.append(f"base.run should be a mapping, not {base['run']!r}")
    if spec.get("dir") is not None and not isinstance(spec["dir"], str):
        problems.append(f"dir should be a folder path, not {spec['dir']!r}")
    seeds = spec.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                                                  for x in seeds)):
        problems.append(f"seeds should be a list of integers, e.g. [0, 1, 2], not {seeds!r}")
    runs = spec.get("runs")
    if runs is not None and not (isinstance(runs, list) and all(isinstance(r, dict) for r in runs)):
        problems.append(f"runs should be a list of mappings of dotted overrides, e.g. [{{method.name: lora}}], not {runs!r}")
    grid = spec.get("grid")
    if grid is not None and not isinstance(grid, dict):
        problems.append(f"grid should be a mapping of dotted keys to lists of values, not {grid!r}")
    if problems:
        raise ConfigError([f"sweep file {path}: {p}" for p in problems])


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def worker_threads(workers: int, cores: int | None = None) -> int:
    """Torch threads per worker process: the cores split evenly, so N workers never oversubscribe them."""
    return max(1, (cores or available_cores()) // max(1, workers))


def resolved_entry_config(sweep: Sweep, entry: SweepEntry) -> Config:
    """The config an entry's run writes to its ``config.yaml`` (method defaults filled in), for comparisons."""

    cfg = entry_config(sweep.base, entry, sweep.dir)
    return resolve_config(cfg, METHODS.get(cfg.method.name)(cfg.method))


def existing_runs(sweep: Sweep, check_split: bool = True) -> dict[str, tuple[Any, list[str]]]:
    """For each entry: its run directory's state and how its stored configuration differs from the entry's.

    Args:
        sweep: from :func:`load_sweep`.
        check_split: for finished runs, also compare the stored data split with the split the data gives
            now (loads each distinct dataset once); off for a quick status.

    Returns:
        name -> (:class:`visiontune.rundir.RunDirState`, differences); no differences for runs not started.
    """

    splits: dict[str, dict[str, Any]] = {}

    def split_of(cfg: Config) -> dict[str, Any]:
        key = json.dumps(cfg.to_dict()["data"], sort_keys=True, default=str)
        if key not in splits:
            splits[key] = split_identity(make_splits(load_records(cfg.data.dataset, root=cfg.data.root, channels=cfg.data.channels), cfg.data))
        return splits[key]

    out: dict[str, tuple[Any, list[str]]] = {}
    for e in sweep.entries:
        run_dir = sweep.dir / "runs" / e.name
        state = inspect_run(run_dir)
        changes: list[str] = []
        if state.kind == "finished":
            cfg = resolved_entry_config(sweep, e)
            changes = finished_run_changes(run_dir, cfg, split_of(cfg) if check_split else None)
        elif state.kind in ("partial", "started"):
            stored, _ = read_yaml_mapping(run_dir / "config.yaml")
            changes = config_changes(stored, resolved_entry_config(sweep, e)) if stored is not None else []
        out[e.name] = (state, changes)
    return out


def _refuse_changed(sweep: Sweep, states: dict[str, tuple[Any, list[str]]]) -> None:
    """Raise ConfigError naming every existing run made with another configuration than the sweep's now."""
    changed = {name: changes for name, (_, changes) in states.items() if changes}
    if not changed:
        return
    lines = [f"  - {name}: " + "; ".join(changes) for name, changes in changed.items()]
    raise ConfigError(
        f"sweep folder {str(sweep.dir)!r}: {len(changed)} existing run(s) were made with another configuration than "
        "the sweep asks for now, so they are neither reused nor continued:\n" + "\n".join(lines)
        + "\nFix: rerun with the overrides the sweep was started with (see sweep.json), give the sweep another dir, "
        "or delete those run folders to redo them"
    )


def _failure_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"


def _train_entry(sweep_base: dict[str, Any], entry: SweepEntry, out: Path, progress: bool, threads: int | None = None) -> float:
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
        acc = _train_entry(sweep_base, entry, Path(out), progress=False, threads=threads)
        return "ok", f"{acc:.4f}"
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent handles it
        return "interrupted", ""
    except Exception as e:  # reported to the parent, which records it and goes on
        return "failed", _failure_text(e)


def _worker(sweep_base: dict[str, Any], entry: SweepEntry, out: str, threads: int, conn: Any) -> None:
    """Body of one worker process of the process pool: :func:`run_entry`, its outcome sent back on ``conn``."""
    try:
        conn.send(run_entry(sweep_base, entry, out, threads))
    finally:
        conn.close()


def _run_parallel(
    sweep: Sweep, todo: list[SweepEntry], workers: int, bar: Any, record: Callable[[SweepEntry, str, str], None]
) -> None:
    """Run ``todo`` in up to ``workers`` fresh processes at a time, one process per run.

    ``record(entry, state, text)`` is called as each finishes ("ok" with its accuracy, or "failed" with
    the error); ``bar`` (tqdm) advances by one per finished run.

    A process per run gives every run a clean interpreter, so a crash, a leak or an out-of-memory kill
    costs that run only. Processes come from a fork server that imported torch and visiontune once
    (never forked from this process: forking after torch started its thread pools can hang), so a run
    does not pay the imports again; ``spawn`` where there is no fork server (Windows). A hand-rolled
    scheduler rather than ``ProcessPoolExecutor``: a worker killed by the OS breaks a whole executor,
    and here it must only be recorded as that run's failure.
    """
    import multiprocessing as mp
    from multiprocessing.connection import wait

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["visiontune", "visiontune.train.loop", "visiontune.runs", "visiontune.sweep"])
    else:
        ctx = mp.get_context("spawn")
    threads = worker_threads(workers)
    pending = list(todo)
    running: dict[Any, tuple[Any, SweepEntry]] = {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                entry = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker, args=(sweep.base, entry, str(sweep.dir), threads, send),
                                   name=f"visiontune-sweep {entry.name}")
                proc.start()
                send.close()  # the parent keeps only its read end, so a dead child reads as EOF
                running[recv] = (proc, entry)
            for recv in wait(list(running)):
                proc, entry = running.pop(recv)
                try:
                    state, text = recv.recv()
                except EOFError:
                    state, text = "failed", ""
                proc.join()
                if state == "interrupted":
                    raise KeyboardInterrupt(entry.name)
                if state == "failed" and not text:
                    text = (f"worker process exited with code {proc.exitcode} before reporting "
                            "(killed by a signal or out of memory?)")
                record(entry, state, text)
                bar.update(1)
    finally:
        for proc, _ in running.values():  # interrupted: stop the others; their checkpoints let them resume
            proc.terminate()
            proc.join()




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
    _refuse_changed(sweep, states)  # before anything is written
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
                    acc = _train_entry(sweep.base, entry, sweep.dir, progress)
                    record(entry, "ok", f"{acc:.4f}")
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    record(entry, "failed", _failure_text(e))
                bar.update(1)
        else:
            _run_parallel(sweep, todo, workers, bar, record)
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


def sweep_status(sweep: Sweep) -> list[tuple[str, str]]:
    """(run name, state) for every entry: done, changed, failed, partial, not done or pending.

    ``done`` needs every artifact of the finished run to read back; a run whose ``metrics.json`` (say) is
    truncated is "not done", with the file named. ``changed``: finished, but with another configuration
    than the sweep asks for now (``visiontune sweep`` refuses to go on). Reads only; the data split is
    not recomputed here (``visiontune sweep`` checks it).
    """
    failures = read_failures(sweep.dir)
    out = []
    for e in sweep.entries:
        state, changes = existing_runs(Sweep(sweep.base, sweep.dir, [e]), check_split=False)[e.name]
        notes = f"; {'; '.join(state.problems)}" if state.problems else ""
        if changes:
            text = f"changed: made with another configuration ({'; '.join(changes)})"
        elif state.kind == "finished":
            text = "done"
        elif e.name in failures:
            text = "failed: " + (failures[e.name].splitlines() or [""])[0]
        elif state.kind == "partial":
            text = ("partial (resumes from its checkpoint" if state.checkpoint is not None
                    else "partial (an old pickle checkpoint/last.pt, which is not loaded: delete the run to redo it") + notes + ")"
        elif state.kind == "foreign":
            text = f"blocked: {state.path} is not a visiontune run directory"
        elif state.problems:
            text = f"not done ({'; '.join(state.problems)}): reruns"
        else:
            text = "pending"
        out.append((e.name, text))
    return out
