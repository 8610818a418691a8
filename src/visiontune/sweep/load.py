"""Reading a sweep file: the YAML checked (every malformed part at once), the base config loaded and overridden, the
grid expanded into named entries (:func:`load_sweep`)."""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path
from typing import Any

import yaml

from visiontune.config import apply_overrides
from visiontune.errors import ConfigError
from visiontune.sweep.spec import Sweep, SweepEntry, entry_config


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


__all__ = ["load_sweep"]
