"""Resumable checkpoints that load without running code: tensors in safetensors, everything else in JSON.

A checkpoint used to be a ``torch.save`` pickle read back with ``torch.load(weights_only=False)``. A
sweep resumes whenever a run has a checkpoint, so copying someone's sweep or run folder and running
``visiontune sweep`` (or ``train run.resume=true``) ran whatever their pickle said. Now a checkpoint is
one ``.safetensors`` file: the tensors (model and optimizer state, torch RNG states as byte tensors)
in the safetensors body, and the structure around them -- nested dicts, lists, tuples, numbers,
strings -- as JSON in its header metadata. Reading it parses a length-prefixed JSON header and raw
tensor bytes and nothing else, so a hostile file can at worst be refused as unreadable.

One file, replaced atomically (:mod:`visiontune.atomic`), so the tensors and the JSON never disagree.

Files named ``last.pt`` (the old pickle format) are never loaded: :func:`legacy_checkpoint` finds
them so that the caller can refuse with an explanation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from visiontune.atomic import atomic_write
from visiontune.errors import VisiontuneError

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "last.safetensors"
LEGACY_CHECKPOINT_FILE = "last.pt"
FORMAT_VERSION = 1
_META_KEY = "visiontune_checkpoint"

__all__ = [
    "CHECKPOINT_DIR", "CHECKPOINT_FILE", "CheckpointError", "checkpoint_path", "checkpoint_progress", "legacy_checkpoint",
    "legacy_message", "load_checkpoint", "save_checkpoint",
]


class CheckpointError(VisiontuneError):
    """A checkpoint is unreadable, of another format or kind, or an old pickle that is not loaded."""


def checkpoint_path(run_dir: str | Path) -> Path:
    """Where a run directory's resumable checkpoint lives."""
    return Path(run_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE


def legacy_checkpoint(run_dir: str | Path) -> Path | None:
    """The old pickle checkpoint (``checkpoint/last.pt``) of ``run_dir``, if there is one (never loaded)."""
    path = Path(run_dir) / CHECKPOINT_DIR / LEGACY_CHECKPOINT_FILE
    return path if path.is_file() else None


def legacy_message(path: Path) -> str:
    """Why a ``last.pt`` is refused, and what to do instead."""
    return (
        f"{path} is a pickle checkpoint (an older visiontune's format, or a file someone put there); it is not "
        "loaded, because unpickling a file can run any code it contains. Start the run over with "
        "run.overwrite=true (this deletes the run directory), or delete the file if you trust nothing in it"
    )


# ----------------------------------------------------------------------------- encoding


def _encode(obj: Any, tensors: dict[str, torch.Tensor], storages: set[int], where: str) -> Any:
    """``obj`` as JSON-able data, with each tensor moved into ``tensors`` and replaced by a reference."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages and t.numel():  # safetensors refuses two names on one storage: give it its own copy
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        key = f"t{len(tensors)}"
        tensors[key] = t
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, storages, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, storages, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, storages, f"{where}.{k}") for k, v in obj.items()}
        # Non-string keys (an optimizer's per-parameter state is keyed by int), or keys that look like tags.
        return {"__dict__": [[_encode(k, tensors, storages, where), _encode(v, tensors, storages, f"{where}[{k!r}]")]
                             for k, v in obj.items()]}
    raise TypeError(
        f"checkpoint value at {where} is a {type(obj).__name__}; only tensors, dicts, lists, tuples, numbers, "
        "strings, booleans and None are stored (convert it, e.g. a numpy array with .tolist())"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """The inverse of :func:`_encode` (only the tags it writes are understood)."""
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, value), = obj.items()
        if tag == "__tensor__":
            if value not in tensors:
                raise CheckpointError(f"{where}: the JSON refers to tensor {value!r}, which the file does not hold")
            return tensors[value]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors, where) for v in value)
        if tag == "__dict__":
            return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in value}
        if tag == "__float__":
            return float(value)  # 'inf', '-inf', 'nan' only ever: float() parses numbers, nothing else
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


# ----------------------------------------------------------------------------- files


def save_checkpoint(path: str | Path, state: dict[str, Any], kind: str, progress: str = "") -> Path:
    """Write ``state`` (nested dicts/lists/tuples of tensors and plain values) atomically to ``path``.

    Args:
        path: usually :func:`checkpoint_path` of a run directory.
        state: what to store; tensors are copied to CPU.
        kind: what wrote it (``"train"``, ``"pretrain"``); :func:`load_checkpoint` checks it.
        progress: how far the run got ("epoch 3 of 10"), readable without loading the tensors
            (:func:`checkpoint_progress`), for messages about the run.

    Raises:
        TypeError: a value that is not a tensor or plain data (named by its place in ``state``).
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, set(), "state")
    meta = {_META_KEY: json.dumps({"format": FORMAT_VERSION, "kind": kind, "progress": progress, "state": tree},
                                  allow_nan=False)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def checkpoint_progress(path: str | Path) -> str:
    """The ``progress`` text a checkpoint was saved with (reads only its header); "" when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            head = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        return str(head.get("progress") or "") if isinstance(head, dict) else ""
    except Exception:  # noqa: BLE001 - unreadable: reported when it is loaded; here it only lacks a progress note
        return ""


def load_checkpoint(path: str | Path, kind: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; nothing in the file is executed.

    Raises:
        CheckpointError: the file is missing, not safetensors (e.g. a pickle under the new name), has no
            visiontune metadata, another format version or another ``kind``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    fix = "delete it and resume from scratch with run.overwrite=true, or point run.name at another run"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors' own error types vary by version; none of them ran code
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file ({type(e).__name__}: {e}); it was not loaded "
            f"(a visiontune checkpoint is read as safetensors + JSON, never unpickled); {fix}"
        ) from e
    try:
        head = json.loads(meta[_META_KEY])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable visiontune metadata ({e!r}); {fix}") from e
    if not isinstance(head, dict) or head.get("format") != FORMAT_VERSION or head.get("kind") != kind:
        got = {k: head.get(k) for k in ("format", "kind")} if isinstance(head, dict) else type(head).__name__
        raise CheckpointError(
            f"checkpoint {path} is {got}, expected format {FORMAT_VERSION} of kind {kind!r}; {fix}"
        )
    try:
        state = _decode(head.get("state"), tensors, str(path))
    except CheckpointError:
        raise
    except (TypeError, ValueError, RecursionError) as e:  # malformed structure, e.g. an unhashable dict key
        raise CheckpointError(f"checkpoint {path} has malformed metadata ({type(e).__name__}: {e}); {fix}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a mapping; {fix}")
    return state
