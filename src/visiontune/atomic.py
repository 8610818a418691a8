"""Atomic file writes: the one way visiontune writes an artifact (run, sweep, pretraining, weight cache).

Readers of a run directory -- a resumed run, ``visiontune sweep`` deciding what is finished,
``visiontune eval``, a report -- must see either the previous complete file or the new complete one,
never a truncated one. A process killed mid-write (Ctrl-C, the OOM killer, ``kill -9``, a full disk)
would otherwise leave, say, half a ``metrics.json`` that later passes for a finished run. So every
file goes to a temporary file in the destination's own folder (same filesystem: the rename is never a
copy), is flushed to disk with ``fsync``, and is renamed over the destination with ``os.replace``
(atomic on POSIX and Windows); on POSIX the folder is fsynced too, so the rename itself survives a
power cut.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


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
