"""Run directories before a run starts: what state one is in, whether a new run may use it, emptying it.

Shared by fine-tuning (:mod:`visiontune.train`), extended pretraining (:mod:`visiontune.pretrain`) and
sweeps. The rules, the same for both kinds of run:

=========================  ==========  ==================================  =========================
existing directory         neither     ``run.resume=true``                 ``run.overwrite=true``
=========================  ==========  ==================================  =========================
missing or empty           new run     new run                             new run
finished                   refused     kept as it is, if its config and    deleted, then a new run
                                       data match (else refused)
checkpoint, unfinished     refused     continued, if its config and data   deleted, then a new run
                                       match (else refused)
started, no checkpoint     refused     emptied, then a new run (if the     deleted, then a new run
                                       stored config matches)
not a run directory        refused     refused                             refused
=========================  ==========  ==================================  =========================

Nothing is written into an existing directory until these checks have passed, so a refused or failed
start leaves a finished run exactly as it was. "Finished" means every artifact of the finished run
reads back (an interrupted write of ``metrics.json`` is not a finished run), and the message names
any file that does not.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from visiontune.checkpoint import CHECKPOINT_DIR, checkpoint_path, legacy_checkpoint
from visiontune.errors import ConfigError

StateKind = Literal["new", "finished", "partial", "started", "foreign"]

_MISSING = object()


# ----------------------------------------------------------------------------- reading artifacts


def read_json(path: Path) -> tuple[Any, str | None]:
    """(parsed JSON, None), or (None, a problem naming the file) when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except FileNotFoundError:
        return None, f"{path} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path} is unreadable ({type(e).__name__}: {e})"


def read_yaml_mapping(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(parsed YAML mapping, None), or (None, a problem naming the file)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{path} is missing"
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return None, f"{path} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(data, dict):
        return None, f"{path} is unreadable (a {type(data).__name__}, not a mapping of config sections)"
    return data, None


def json_check(required: Callable[[Any], bool] = lambda obj: True, what: str = "") -> Callable[[Path], str | None]:
    """A file check for :func:`inspect_run_dir`: the file parses as JSON and ``required(obj)`` holds."""
    def check(path: Path) -> str | None:
        obj, problem = read_json(path)
        if problem:
            return problem
        return None if required(obj) else f"{path} is unreadable (it has no {what})"
    return check


def yaml_check(path: Path) -> str | None:
    """A file check for :func:`inspect_run_dir`: the file parses as a YAML mapping."""
    return read_yaml_mapping(path)[1]


def exists_check(path: Path) -> str | None:
    """A file check for :func:`inspect_run_dir`: the file exists and is not empty."""
    if not path.is_file():
        return f"{path} is missing"
    return None if path.stat().st_size > 0 else f"{path} is unreadable (empty)"


# ----------------------------------------------------------------------------- states


@dataclass
class RunDirState:
    """What an existing run directory holds.

    Attributes:
        path: the directory.
        kind: ``new`` (missing or empty), ``finished`` (every finished-run file reads back), ``partial``
            (a checkpoint, not finished), ``started`` (run files but neither), ``foreign`` (files that
            are not a run's).
        problems: why a directory with a finished run's files is not finished (each names its file).
        checkpoint: the resumable checkpoint, if present.
        legacy: an old pickle checkpoint (``last.pt``), if present (never loaded).
    """

    path: Path
    kind: StateKind
    problems: list[str] = field(default_factory=list)
    checkpoint: Path | None = None
    legacy: Path | None = None


def inspect_run_dir(run_dir: Path, finished: dict[str, Callable[[Path], str | None]]) -> RunDirState:
    """Classify ``run_dir`` by reading (never writing) it.

    Args:
        run_dir: the run directory.
        finished: file name -> check (None when fine, else a problem naming the file) for every file a
            finished run has; the first file is the one whose presence means "the run got to its end".
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        if run_dir.exists():
            return RunDirState(run_dir, "foreign", [f"{run_dir} is a file"])
        return RunDirState(run_dir, "new")
    names = {p.name for p in run_dir.iterdir()}
    if not names:
        return RunDirState(run_dir, "new")
    ck = checkpoint_path(run_dir)
    state = RunDirState(run_dir, "started", checkpoint=ck if ck.is_file() else None, legacy=legacy_checkpoint(run_dir))
    markers = {"config.yaml", CHECKPOINT_DIR, *finished}
    if not names & markers and not all(n.startswith(".") and n.endswith(".tmp") for n in names):
        state.kind = "foreign"
        return state
    first = next(iter(finished))
    if first in names:
        state.problems = [p for p in (check(run_dir / name) for name, check in finished.items()) if p]
        if not state.problems:
            state.kind = "finished"
            return state
    if state.checkpoint is not None or state.legacy is not None:
        state.kind = "partial"
    return state


def refuse_reuse(state: RunDirState, resume: bool, overwrite: bool, unit: str = "run", progress: str = "") -> None:
    """Raise unless the table in this module's docstring allows a run in ``state``'s directory.

    Args:
        state: from :func:`inspect_run_dir`.
        resume, overwrite: ``run.resume`` and ``run.overwrite``.
        unit: what a run is called in messages ("run", "pretraining run").
        progress: how far a partial run got (e.g. "epoch 17 of 20"), for the message.

    Raises:
        ConfigError: naming the directory, what it holds and the setting that would allow it.
    """
    where = str(state.path)
    if state.kind == "foreign":
        shown = sorted(p.name for p in state.path.iterdir())[:5] if state.path.is_dir() else []
        raise ConfigError(
            f"{where!r} exists and is not a visiontune {unit} directory"
            f"{f' (it holds {shown})' if shown else ''}; set run.name or run.dir to another folder "
            "(nothing there was changed, and run.overwrite=true never deletes such a folder)"
        )
    if state.kind == "new" or overwrite:
        return
    notes = f" ({'; '.join(state.problems)})" if state.problems else ""
    if state.kind == "finished" and not resume:
        raise ConfigError(
            f"run directory {where!r} already holds a finished {unit}; set run.name to another name, or "
            "run.overwrite=true to replace it"
        )
    if state.kind == "partial" and not resume:
        what = f"checkpoint at {progress}" if progress else "checkpoint"
        raise ConfigError(
            f"run directory {where!r} holds an unfinished {unit} with a {what}{notes}; set run.resume=true to "
            f"continue it, or run.overwrite=true to discard it and start over"
        )
    if state.kind == "started" and not resume:
        raise ConfigError(
            f"run directory {where!r} holds an unfinished {unit} that saved no checkpoint{notes}; set "
            "run.overwrite=true (or run.resume=true, which starts over when there is no checkpoint) to run it again"
        )


def clear_run_dir(run_dir: Path) -> str | None:
    """Delete ``run_dir``'s contents so that a new run starts from an empty folder; say what was done.

    The folder is renamed to a hidden sibling first and deleted from there, so an interrupted deletion
    never leaves a half-emptied folder under the run's name.

    Returns:
        A sentence for the user, or None when there was nothing to delete.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    trash = run_dir.with_name(f".{run_dir.name}.deleting-{os.getpid()}-{secrets.token_hex(3)}")
    os.replace(run_dir, trash)
    shutil.rmtree(trash, ignore_errors=True)
    left = f" (could not delete all of it: {trash} remains)" if trash.exists() else ""
    return f"deleted the previous contents of {run_dir}{left}"


# ----------------------------------------------------------------------------- config comparison


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"a.b.c": value}; lists and other values are leaves."""
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _show(value: Any) -> str:
    return "(absent)" if value is _MISSING else repr(value)


def config_differences(stored: dict[str, Any], current: dict[str, Any], neutral: Iterable[str]) -> list[str]:
    """Every dotted key whose value differs between two config dicts, except the ``neutral`` ones.

    Returns:
        One line per key: ``optim.lr: 0.001 in the stored run, 0.01 now``.
    """
    skip = set(neutral)
    a, b = flatten(stored), flatten(current)
    out = []
    for key in [*b, *(k for k in a if k not in b)]:
        if key in skip:
            continue
        old, new = a.get(key, _MISSING), b.get(key, _MISSING)
        if old != new:
            out.append(f"{key}: {_show(old)} in the stored run, {_show(new)} now")
    return out


def refuse_changes(differences: list[str], where: Path, unit: str = "run") -> None:
    """Raise ConfigError listing ``differences`` (when any), with the ways out."""
    if differences:
        raise ConfigError(
            f"run directory {str(where)!r} holds a {unit} made with another configuration, and mixing two "
            f"configurations in one run is refused:\n" + "\n".join(f"  - {d}" for d in differences)
            + "\nFix: use the stored values (see its config.yaml), or set run.name to a new run, or "
            "run.overwrite=true to discard the stored run"
        )
