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

One module per stage: :mod:`~visiontune.sweep.load` (parse and expand), :mod:`~visiontune.sweep.check` (the
dry run), :mod:`~visiontune.sweep.resume` (what the folder already holds), :mod:`~visiontune.sweep.runner` (run
the rest: in this process, :mod:`~visiontune.sweep.pool` or :mod:`~visiontune.sweep.cluster`, each run through
:mod:`~visiontune.sweep.worker`), :mod:`~visiontune.sweep.report` (aggregate).
Written by hand: no library does grid expansion over this config vocabulary plus study-style aggregation.
"""

from visiontune.sweep.check import EntryCheck, check_sweep, format_check, summarize_checks
from visiontune.sweep.cluster import EXECUTORS
from visiontune.sweep.load import load_sweep
from visiontune.sweep.report import aggregate, mean_std
from visiontune.sweep.resume import existing_runs, resolved_entry_config, sweep_status
from visiontune.sweep.runner import run_sweep
from visiontune.sweep.spec import Sweep, SweepEntry, entry_config
from visiontune.sweep.worker import available_cores, run_entry, worker_record_path, worker_threads

__all__ = [
    "EXECUTORS", "EntryCheck", "Sweep", "SweepEntry", "aggregate", "available_cores", "check_sweep", "entry_config",
    "existing_runs", "format_check", "load_sweep", "mean_std", "resolved_entry_config", "run_entry", "run_sweep",
    "summarize_checks", "sweep_status", "worker_record_path", "worker_threads",
]
