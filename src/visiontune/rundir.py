"""Run directories before a run starts: what state one is in, whether a new run may use it, emptying it.

Shared by fine-tuning (:mod:`visiontune.train`), extended pretraining (:mod:`visiontune.pretrain`) and
sweeps: each kind of run is a :class:`RunKind` (``visiontune.runs.TRAIN_RUNS``, ``visiontune.pretrain.runs.PRETRAIN_RUNS``),
and :func:`start_run` is the start-up both loops share. The rules, the same for both kinds of run:

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

A directory is a run directory only when visiontune marked it so: its manifest
(:data:`~visiontune.atomic.MANIFEST_NAME`, written when the run starts) names the kind of run, and lists every
entry the run made. A run directory from before manifests counts as one only when its ``config.yaml`` reads as a
visiontune configuration of this kind *and* it holds another file such a run makes. "Deleted" and "emptied"
above mean: the entries the manifest lists (or, for an older run, the files such a run makes) and nothing else,
so a file the user put into a run directory survives ``run.overwrite=true``.

Nothing is written into an existing directory until these checks have passed, so a refused or failed
start leaves a finished run exactly as it was. "Finished" means every artifact of the finished run
reads back (an interrupted write of ``metrics.json`` is not a finished run), and the message names
any file that does not.

Why this module is longer than ~500 lines: the table above, the states it names, the one state machine that
applies it (:meth:`RunKind.prepare`) and the ownership checks it relies on read together; each section below is
one step of that table.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from visiontune.atomic import (
    MANIFEST_FORMAT, MANIFEST_NAME as MANIFEST, check_writable, claim_folder, clean_stale_temps, is_temp_name, read_manifest,
    write_json_atomic,
)
from visiontune.checkpoint import (
    CheckpointError, checkpoint_path, checkpoint_progress, legacy_checkpoint, legacy_message, load_checkpoint,
)
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
        owner: the manifest kind of the run (``train``, ``pretrain``) this directory is inspected for.
        owned: the entries visiontune made there: all that :func:`clear_run_dir` may delete.
    """

    path: Path
    kind: StateKind
    problems: list[str] = field(default_factory=list)
    checkpoint: Path | None = None
    legacy: Path | None = None
    owner: str = "train"
    owned: list[str] = field(default_factory=list)


TRASH_PREFIX = ".visiontune-trash-"
"""Hidden folder inside a run directory that :func:`clear_run_dir` moves what it deletes into first."""


def _ours(name: str) -> bool:
    """Entries that only visiontune's own writers name so (temporary files, an interrupted deletion)."""
    return is_temp_name(name) or name.startswith(TRASH_PREFIX)


def owned_entries(folder: Path, kind: str, makes: Iterable[str], is_old_run: Callable[[Path], bool] | None = None,
                  ) -> tuple[list[str] | None, str]:
    """What visiontune made in ``folder``, as a ``kind`` folder: (entry names, "") or (None, why it is not ours).

    Args:
        folder: an existing folder.
        kind: the manifest kind the caller works with (``train``, ``pretrain``, ``sweep``, ``auto``).
        makes: every top-level entry a ``kind`` folder made before manifests existed.
        is_old_run: recognises such an older folder (its config reads as one of ours, ...); None: only a
            manifest counts.
    """
    entries = {p.name for p in folder.iterdir()}
    leftovers = sorted(n for n in entries if _ours(n))
    manifest = read_manifest(folder)
    if manifest is not None:
        if manifest["kind"] != kind:
            return None, f"it holds a visiontune {manifest['kind']} folder, not a {kind} one"
        listed = (n for n in manifest["files"] if (folder / n).exists() or (folder / n).is_symlink())
        return sorted({*listed, *leftovers}), ""
    others = sorted(n for n in entries if not _ours(n))
    if not others:
        return leftovers, ""
    if is_old_run is not None and is_old_run(folder):
        return sorted({*(n for n in makes if n in entries), *leftovers}), ""
    return None, f"it holds {others[:5]}{' ...' if len(others) > 5 else ''} and no visiontune manifest ({MANIFEST})"


def old_run_check(config_ok: Callable[[dict[str, Any]], bool], also: Iterable[str]) -> Callable[[Path], bool]:
    """An ``is_old_run`` for :func:`owned_entries`: config.yaml passes ``config_ok`` and one of ``also`` is a file
    (or, for ``checkpoint``, the checkpoint) that reads back."""
    also = tuple(also)

    def check(folder: Path) -> bool:
        stored, problem = read_yaml_mapping(folder / "config.yaml")
        if problem or stored is None:
            return False
        try:
            if not config_ok(stored):
                return False
        except Exception:  # noqa: BLE001 -- any failure to read it as our config means: not ours
            return False
        return any((checkpoint_path(folder).is_file() or legacy_checkpoint(folder) is not None) if n == "checkpoint"
                   else exists_check(folder / n) is None for n in also)
    return check


def inspect_run_dir(
    run_dir: Path, finished: dict[str, Callable[[Path], str | None]], owner: str = "train", makes: Iterable[str] = (),
    is_old_run: Callable[[Path], bool] | None = None,
) -> RunDirState:
    """Classify ``run_dir`` by reading (never writing) it.

    Args:
        run_dir: the run directory.
        finished: file name -> check (None when fine, else a problem naming the file) for every file a
            finished run has; the first file is the one whose presence means "the run got to its end".
        owner, makes, is_old_run: whose directory it must be (see :func:`owned_entries`).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        if run_dir.exists() or run_dir.is_symlink():
            return RunDirState(run_dir, "foreign", ["it is a file, not a folder"], owner=owner)
        return RunDirState(run_dir, "new", owner=owner)
    owned, why = owned_entries(run_dir, owner, makes, is_old_run)
    if owned is None:
        return RunDirState(run_dir, "foreign", [why], owner=owner)
    names = {n.split("/")[0] for n in owned if not _ours(n)}
    if not names:
        return RunDirState(run_dir, "new", owner=owner, owned=owned)
    ck = checkpoint_path(run_dir)
    state = RunDirState(run_dir, "started", checkpoint=ck if ck.is_file() else None, legacy=legacy_checkpoint(run_dir),
                        owner=owner, owned=owned)
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
        why = f" ({'; '.join(state.problems)})" if state.problems else ""
        raise ConfigError(
            f"{where!r} exists and is not a visiontune {unit} directory{why}; set run.name or run.dir to another "
            "folder (nothing there was changed: run.resume and run.overwrite never touch a folder visiontune did "
            "not make)"
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


def clear_run_dir(state: RunDirState) -> str | None:
    """Delete what visiontune made in ``state``'s directory (``state.owned``), and nothing else; say what was done.

    The entries are first moved into one hidden folder inside the run directory and deleted from there,
    so an interrupted deletion never leaves a half-emptied run under the run's name (the next start
    finishes deleting that folder: its name is visiontune's).

    Returns:
        A sentence for the user, or None when there was nothing to delete.
    """
    run_dir = state.path
    if state.kind == "foreign":  # refuse_reuse refuses these first; deleting is never the fallback
        raise ConfigError(f"{str(run_dir)!r} is not a visiontune run directory; nothing was deleted")
    victims = [run_dir / n for n in state.owned if (run_dir / n).exists() or (run_dir / n).is_symlink()]
    if not victims:
        return None
    check_writable(run_dir / MANIFEST, "the run directory")  # a read-only folder: one clear error, nothing moved
    trash = run_dir / f"{TRASH_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    trash.mkdir()
    for i, p in enumerate(victims):
        os.replace(p, trash / f"{i}-{p.name}")
    for p in victims:  # a subfolder emptied of what visiontune wrote goes too; one holding the user's files stays
        if p.parent != run_dir:
            with contextlib.suppress(OSError):
                p.parent.rmdir()
    # The manifest keeps its kind (the folder stays ours, even if the deletion below is cut short).
    _drop_from_manifest(run_dir, state.owner, [str(p.relative_to(run_dir)) for p in victims])
    for p in run_dir.iterdir():
        if p.name.startswith(TRASH_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
    kept = sorted(p.name for p in run_dir.iterdir() if p.name != MANIFEST and not _ours(p.name))
    left = f"; kept what visiontune did not make: {kept[:5]}" if kept else ""
    return f"deleted the previous run in {run_dir} ({len(victims)} entries visiontune made){left}"


def _drop_from_manifest(folder: Path, kind: str, names: list[str]) -> None:
    manifest = read_manifest(folder) or {"files": []}
    write_json_atomic(folder / MANIFEST, {"format": MANIFEST_FORMAT, "kind": kind,
                                          "files": [n for n in manifest["files"] if n not in names]})


def claim_run_dir(state: RunDirState) -> None:
    """Mark ``state``'s directory as this run's (an older run's files adopted into its manifest), and delete the
    temporary files a killed writer left there. Call once the checks have let the run use the directory."""
    if state.kind == "finished" and not os.access(state.path, os.W_OK):
        return  # a finished run on read-only storage is only read (resume returns its metrics): nothing to mark
    _claim(state.path, state.owner, state.owned, "run directory")
    clean_stale_temps(checkpoint_path(state.path).parent)


def claim_output_folder(
    folder: str | Path, kind: str, makes: Iterable[str] = (), is_old: Callable[[Path], bool] | None = None,
    option: str = "the output folder",
) -> Path:
    """Let a ``kind`` command (``sweep``, ``auto``) write into ``folder`` only if it is new, empty or its own.

    The folder is then marked (its manifest) and stale temporary files are removed. Every command that writes
    several files into one folder goes through here before any work, so none overwrites a ``report.md`` it did
    not make.

    Args:
        folder: where the command writes.
        kind: the manifest kind.
        makes, is_old: recognise a folder this command made before manifests (see :func:`owned_entries`); without
            ``is_old``, a folder holding only entries of ``makes``.
        option: how the user names the folder, for the message (``sweep dir:``, ``--out``).

    Raises:
        ConfigError: the folder is a file, holds what this command did not make, or cannot be written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option} {str(folder)!r} is a file, not a folder; choose a new folder")
    owned: list[str] = []
    makes = tuple(makes)
    if is_old is None:  # a folder holding only what this command writes is one it made before manifests
        def is_old(f: Path) -> bool:
            return {p.name for p in f.iterdir()} <= set(makes)
    if folder.is_dir():
        found, why = owned_entries(folder, kind, makes, is_old)
        if found is None:
            raise ConfigError(
                f"{option} {str(folder)!r} is not a visiontune {kind} folder ({why}); choose a new or empty folder "
                "(nothing there was changed: visiontune writes only into folders it made)"
            )
        owned = found
    _claim(folder, kind, owned, option)
    return folder


def _claim(folder: Path, kind: str, owned: list[str], what: str) -> None:
    check_writable(folder / MANIFEST, what)
    claim_folder(folder, kind, [n for n in owned if not _ours(n)])
    clean_stale_temps(folder)
    for name in owned:  # what an interrupted clear_run_dir had moved aside (only this folder's own trash)
        if name.startswith(TRASH_PREFIX):
            shutil.rmtree(folder / name, ignore_errors=True)


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


# ----------------------------------------------------------------------------- starting a run


@dataclass
class RunStart:
    """How a run may start in its directory (:meth:`RunKind.prepare`): fresh, from a checkpoint, or already finished.

    Attributes:
        run_dir: the run directory.
        checkpoint: the checkpoint to continue from (read and checked against the config and data).
        finished: what a finished run of the same config and data gives back (its kind's result).
        note: a sentence for the user (the previous run deleted, nothing left to resume).
    """

    run_dir: Path
    checkpoint: dict[str, Any] | None = None
    finished: Any = None
    note: str | None = None


class RunKind:
    """One kind of run directory (fine-tuning, pretraining): its files, and how a stored run is compared to a new one.

    :meth:`prepare` is the one state machine of this module's table; a kind supplies what differs: where its
    runs go (:meth:`path`), what a finished run holds (``finished_files``, the first written last), every entry a
    run makes (``makes``), and the comparisons of a stored config and data with the new run's.
    """

    kind: str
    """The manifest kind (:func:`visiontune.atomic.claim_folder`), also the checkpoint kind."""
    unit: str = "run"
    """What a run is called in messages."""
    finished_files: dict[str, Callable[[Path], str | None]]
    makes: tuple[str, ...]
    data_key: str
    """The checkpoint entry holding the data's identity."""

    def path(self, cfg: Any) -> Path:
        """The run directory of ``cfg``."""
        raise NotImplementedError

    def is_config(self, stored: dict[str, Any]) -> bool:
        """Whether a stored ``config.yaml`` is one of this kind's (raising counts as no)."""
        raise NotImplementedError

    def config_changes(self, stored: dict[str, Any], cfg: Any) -> list[str]:
        """How a stored config differs from ``cfg``, one line per setting (settings a resume may change aside)."""
        raise NotImplementedError

    def data_changes(self, stored: Any, data: Any) -> list[str]:
        """How the stored data identity (from a checkpoint) differs from ``data``."""
        raise NotImplementedError

    def finished(self, run_dir: Path, cfg: Any, data: Any) -> tuple[list[str], Any]:
        """(how a finished run differs from ``cfg`` and ``data``, what it gives back when it does not)."""
        raise NotImplementedError

    def inspect(self, run_dir: str | Path) -> RunDirState:
        """The state of a run directory of this kind (:func:`inspect_run_dir`)."""
        return inspect_run_dir(Path(run_dir), self.finished_files, self.kind, self.makes,
                               old_run_check(self.is_config, [n for n in self.makes if n != "config.yaml"]))

    def prepare(self, cfg: Any, data: Any) -> RunStart:
        """Decide, by reading only, whether and how this run may use its directory; then empty it if starting fresh.

        A resume (from a checkpoint, or of a finished run) is refused unless the stored config matches ``cfg``
        (:meth:`config_changes`) and the stored data identity matches ``data``. Nothing is written into an existing
        directory before these checks pass; a fresh start then begins from an empty directory (``run.overwrite=true``
        deletes the old one, and says so).

        Raises:
            ConfigError: the directory holds a run this config may not touch, or another configuration.
            CheckpointError: the checkpoint is unreadable, or an old pickle (never loaded).
        """
        state = self.inspect(self.path(cfg))
        progress = checkpoint_progress(state.checkpoint) if state.checkpoint else ""
        refuse_reuse(state, cfg.run.resume, cfg.run.overwrite, self.unit, progress)
        start = self._decide(cfg, data, state)
        claim_run_dir(state)  # every check passed: the folder is this run's (marked before anything is written)
        return start

    def _decide(self, cfg: Any, data: Any, state: RunDirState) -> RunStart:
        run_dir = state.path
        if cfg.run.overwrite:
            return RunStart(run_dir, note=clear_run_dir(state))
        if state.kind == "finished":  # with run.resume=true: nothing left to do if it is the same run
            changes, result = self.finished(run_dir, cfg, data)
            refuse_changes(changes, run_dir, self.unit)
            return RunStart(run_dir, finished=result, note=f"{run_dir} is already finished; nothing to resume")
        if state.kind == "partial":  # with run.resume=true
            if state.checkpoint is None:
                raise CheckpointError(legacy_message(state.legacy))
            ck = load_checkpoint(state.checkpoint, self.kind)
            refuse_changes(self.config_changes(ck.get("config") or {}, cfg) + self.data_changes(ck.get(self.data_key), data),
                           run_dir, self.unit)
            return RunStart(run_dir, checkpoint=ck)
        if state.kind == "started":  # with run.resume=true, but no checkpoint: start over, if it is the same run
            stored, _ = read_yaml_mapping(run_dir / "config.yaml")
            if stored is not None:
                refuse_changes(self.config_changes(stored, cfg), run_dir, self.unit)
            return RunStart(run_dir, note=clear_run_dir(state))
        return RunStart(run_dir)


def start_run(runs: RunKind, cfg: Any, data: Any, strategy: Any) -> RunStart:
    """The start-up every kind of run shares: process 0 decides how the run uses its directory (:meth:`RunKind.prepare`)
    and every process follows; the decision's note is printed; ``config.yaml`` is written unless a resumed run's
    reads back (it was checked equal to ``cfg`` up to the settings a resume may change).

    Args:
        strategy: the run's processes (:mod:`visiontune.train.strategy`): its ``main`` and ``broadcast``.
    """
    begin = strategy.broadcast(runs.prepare(cfg, data) if strategy.main else None)
    if begin.note and cfg.run.progress:
        print(f"[visiontune] {begin.note}")
    if begin.finished is None and strategy.main and (
            begin.checkpoint is None or read_yaml_mapping(begin.run_dir / "config.yaml")[1]):
        cfg.dump(begin.run_dir / "config.yaml")
    return begin
