"""What a sweep is once parsed (:class:`Sweep`, :class:`SweepEntry`), the config of one of its runs and its
record of failed runs: what the sweep runner, its dry-run check and its report all read.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiontune.config import apply_overrides, config_from_dict
from visiontune.rundir import read_json


@dataclass
class SweepEntry:
    """One run of a sweep: its name, its overrides (dotted key -> value) and seed."""

    name: str
    overrides: dict[str, Any]
    seed: int
    group: str = ""


@dataclass
class Sweep:
    """A parsed sweep: base config dict, output folder and the expanded entries."""

    base: dict[str, Any]
    dir: Path
    entries: list[SweepEntry] = field(default_factory=list)


def entry_config(base: dict[str, Any], entry: SweepEntry, out: Path) -> Any:
    """The validated Config of one entry (method-specific base keys are dropped when the method changes)."""
    data = copy.deepcopy(base)  # apply_overrides edits nested sections in place: never touch the shared base
    if "method.name" in entry.overrides and entry.overrides["method.name"] != data.get("method", {}).get("name"):
        data["method"] = {}  # the base's method options belong to another method
    data = apply_overrides(data, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in entry.overrides.items()])
    data = apply_overrides(data, [f"run.seed={entry.seed}", f"run.dir={out / 'runs'}", f"run.name={entry.name}"])
    return config_from_dict(data)


def read_failures(sweep_dir: Path) -> dict[str, str]:
    """``failures.json`` of a sweep ({} when absent; an unreadable one is reported on stderr and ignored)."""
    path = sweep_dir / "failures.json"
    if not path.exists():
        return {}
    data, problem = read_json(path)
    if problem or not isinstance(data, dict):
        print(f"[sweep] warning: {problem or f'{path} is not a mapping'}; its failed runs count as pending", file=sys.stderr)
        return {}
    return {str(k): str(v) for k, v in data.items()}
