"""What a sweep folder already holds: each entry's run directory, whether it was made with the configuration the
sweep asks for now (:func:`existing_runs`; :func:`refuse_changed` stops a sweep before it writes anything), and
each entry's state in words (:func:`sweep_status`)."""

from __future__ import annotations

import json
from typing import Any

from visiontune.config import Config
from visiontune.data import load_records, make_splits
from visiontune.data.splits import split_identity
from visiontune.errors import ConfigError
from visiontune.registry import METHODS
from visiontune.rundir import read_yaml_mapping
from visiontune.runs import config_changes, finished_run_changes, inspect_run
from visiontune.sweep.spec import Sweep, SweepEntry, entry_config, read_failures
from visiontune.train.loop import resolve_config


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


def refuse_changed(sweep: Sweep, states: dict[str, tuple[Any, list[str]]]) -> None:
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


__all__ = ["existing_runs", "refuse_changed", "resolved_entry_config", "sweep_status"]
