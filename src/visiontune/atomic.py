"""Atomic file writes: the one way visiontune writes an artifact (run, sweep, pretraining, weight cache).

Readers of a run directory -- a resumed run, ``visiontune sweep`` deciding what is finished,
``visiontune eval``, a report -- must see either the previous complete file or the new complete one,
never a truncated one. A process killed mid-write (Ctrl-C, the OOM killer, ``kill -9``, a full disk)
would otherwise leave, say, half a ``metrics.json`` that later passes for a finished run. So every
file goes to a temporary file in the destination's own folder (same filesystem: the rename is never a
copy), is flushed to disk with ``fsync``, and is renamed over the destination with ``os.replace``
(atomic on POSIX and Windows); on POSIX the folder is fsynced too, so the rename itself survives a
power cut.

Ownership: a folder visiontune made for a run, a sweep, a selection (``auto``) or an export carries a
manifest, :data:`MANIFEST_NAME`, with a format version, what kind of folder it is and every top-level entry
visiontune wrote there. :func:`atomic_write` adds each file it writes to the manifest of the folder that owns
it, so the list is complete by construction. Commands that replace or resume a folder delete only what its
manifest lists (:mod:`visiontune.rundir`): a ``thesis.tex`` the user put beside a run survives every command.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from visiontune.errors import ConfigError

__all__ = [
    "MANIFEST_NAME", "atomic_write", "check_writable", "claim_folder", "publish", "staging_path", "clean_stale_temps", "is_temp_name", "read_manifest", "record_made",
    "write_bytes_atomic", "write_json_atomic", "write_text_atomic",
]

MANIFEST_NAME = ".visiontune-manifest.json"
"""The file that marks a folder as visiontune's and lists what visiontune made in it."""
MANIFEST_FORMAT = 1

_TEMP = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp$")
"""What :func:`atomic_write` names its temporary files (``.<name>.<pid>-<8 hex>.tmp``): nothing else matches."""


def _fsync_path(path: Path, directory: bool = False) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk; a filesystem that cannot is not an error."""
    if directory and os.name == "nt":  # Windows cannot open a folder for fsync; its renames are journaled
        return
    try:
        fd = os.open(path, os.O_RDONLY if directory else os.O_RDWR)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. some network or FUSE filesystems
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], Any], fsync: bool = True) -> Path:
    """Write ``path`` all at once: ``write(tmp)`` fills a temporary file, which then replaces ``path``.

    Args:
        path: the destination; its folder is created if missing.
        write: called with the temporary file's path (an empty file that already exists); it may open
            it by name (``safetensors.save_file``, ``Figure.savefig``, ``torch.save``). The temporary
            name ends in ``.tmp``, so writers that pick a format from the suffix must be told the format.
        fsync: flush the file and the folder to disk before returning (off only for throwaway files).

    Returns:
        ``path``.

    Raises:
        Whatever ``write`` raises; the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    # Created with the default permissions (umask applied), unlike tempfile.mkstemp's 0600, so the
    # finished artifact is as readable as a file written in place.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = tmp.stat().st_mode & 0o777
    try:
        write(tmp)
        if tmp.stat().st_mode & 0o777 != mode:  # a writer that replaced the file (safetensors writes 0600)
            os.chmod(tmp, mode)
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_path(path.parent, directory=True)
    if path.name != MANIFEST_NAME:
        record_made(path)
    return path


def staging_path(path: str | Path) -> Path:
    """A temporary name beside ``path`` for a file a library writes in place (an ONNX exporter): fill it, then
    :func:`publish` it. Its name is one :func:`clean_stale_temps` recognises, so a killed writer's file is cleaned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def publish(staged: str | Path, path: str | Path) -> Path:
    """Rename a finished :func:`staging_path` file over ``path`` (atomically, flushed), recorded as visiontune's."""
    staged, path = Path(staged), Path(path)
    _fsync_path(staged)
    os.replace(staged, path)
    _fsync_path(path.parent, directory=True)
    record_made(path)
    return path


def write_bytes_atomic(path: str | Path, data: bytes, fsync: bool = True) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def write_text_atomic(path: str | Path, text: str, fsync: bool = True) -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8 (the same bytes on every platform)."""
    return write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 1, fsync: bool = True) -> Path:
    """:func:`atomic_write` of ``obj`` as JSON (serialised first, so an unserialisable value touches no file)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent), fsync=fsync)


# ----------------------------------------------------------------------------- ownership


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of ``folder``, or None when it has none (or one that is not visiontune's format).

    A manifest that does not parse is treated as absent: ownership is then decided as for a folder without
    one (refused unless the caller recognises an older visiontune folder), never by guessing.
    """
    try:
        data = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT and isinstance(data.get("kind"), str)
            and isinstance(data.get("files"), list) and all(isinstance(f, str) for f in data["files"])):
        return None
    return data


def _safe_names(names: Iterable[str]) -> list[str]:
    """Entries a manifest may list: ``name`` (a whole file or folder) or ``folder/name`` (one file in a subfolder),
    never anything that leaves the folder."""
    def ok(n: str) -> bool:
        parts = n.split("/")
        return (0 < len(parts) <= 2 and "\\" not in n and all(p and p not in (".", "..") for p in parts)
                and n != MANIFEST_NAME)
    return sorted({n for n in names if isinstance(n, str) and ok(n)})


def claim_folder(folder: str | Path, kind: str, files: Iterable[str] = ()) -> Path:
    """Mark ``folder`` (created if missing) as a visiontune ``kind`` folder that made ``files``.

    An existing manifest of the same kind keeps its list, with ``files`` added; one of another kind, or none,
    is replaced. Callers decide first (:mod:`visiontune.rundir`) that the folder may be claimed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    old = read_manifest(folder)
    known = old["files"] if old is not None and old["kind"] == kind else []
    manifest = {"format": MANIFEST_FORMAT, "kind": kind, "files": _safe_names([*known, *files])}
    if old != manifest:
        write_json_atomic(folder / MANIFEST_NAME, manifest)
    return folder


def record_made(path: str | Path) -> None:
    """Add ``path`` to the manifest of the visiontune folder it sits in (its folder, else that folder's parent).

    Two levels cover every layout visiontune writes (``run/metrics.json``, ``run/checkpoint/last.safetensors``).
    A file in a subfolder is listed as ``subfolder/name``, not the subfolder: a folder of the user's inside a run
    (``run/notes/``) that a command wrote one file into keeps the rest of its files when the run is replaced.
    A path in no claimed folder is left alone.
    """
    path = Path(path)
    if is_temp_name(path.name):
        return
    for owner, entry in ((path.parent, path.name), (path.parent.parent, f"{path.parent.name}/{path.name}")):
        manifest = read_manifest(owner)
        if manifest is not None:
            if entry not in manifest["files"]:
                claim_folder(owner, manifest["kind"], [entry])
            return


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` when its process was killed mid-write.

    Only names :func:`atomic_write` makes are touched, and only those of processes no longer running, so a
    concurrent writer's file is never pulled from under it. Returns what was deleted.
    """
    gone = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return gone
    for p in entries:
        m = _TEMP.match(p.name)
        if m is None or not p.is_file() or p.is_symlink() or _alive(int(m.group(1))):
            continue
        try:
            p.unlink()
            gone.append(p)
        except OSError:
            pass
    return gone


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of :func:`atomic_write`'s temporary file names."""
    return _TEMP.match(name) is not None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def check_writable(path: str | Path, what: str) -> Path:
    """``path`` when a file can be created there, else a ConfigError naming it and the fix (before any long job).

    Tried for real (a temporary file created and removed in the nearest folder that exists), because
    permission bits do not tell about read-only filesystems, quotas or a missing parent.
    """
    path = Path(path)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    problem = None
    if not folder.is_dir():
        problem = f"{folder} is not a folder"
    else:
        probe = folder / f".visiontune-write-test.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            probe.unlink()
        except OSError as e:
            problem = f"{folder} is not writable ({e.strerror or e})"
    if problem:
        raise ConfigError(f"cannot write {what} {str(path)!r}: {problem}; choose a path in a folder you can write to")
    return path
