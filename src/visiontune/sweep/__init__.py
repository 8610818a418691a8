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

Resumable: a run whose ``metrics.json`` exists is skipped; one with a checkpoint resumes from it.
One run's failure is recorded in ``failures.json`` and the rest go on. Written by hand: no library
does grid expansion over this config vocabulary plus study-style aggregation.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from visiontune.config import apply_overrides, config_from_dict
from visiontune.errors import ConfigError


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


def _slug(overrides: dict[str, Any]) -> str:
    """A readable run name from overrides: method=dora__targets=q__rank=8 (``x.name`` keys show as ``x``)."""
    parts = []
    for k, v in overrides.items():
        keys = k.split(".")
        label = keys[-2] if keys[-1] == "name" and len(keys) > 1 else keys[-1]
        v = "+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        parts.append(f"{label}={v}")
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "__".join(parts)) or "base"


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Parse and expand a sweep file; ``overrides`` (dotted) apply to the base config of every run.

    Raises:
        ConfigError: a missing/invalid file, or entries whose configs are invalid (all reported at once).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist; see configs/sweeps/ for examples")
    spec = yaml.safe_load(path.read_text()) or {}
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
        base = yaml.safe_load(bpath.read_text()) or {}
    base = apply_overrides(copy.deepcopy(base), list(overrides or []))
    out = Path(spec.get("dir") or base.get("run", {}).get("dir") or f"runs/sweeps/{path.stem}")
    seeds = [int(s) for s in (spec.get("seeds") or [base.get("run", {}).get("seed", 0)])]
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
            try:
                entry_config(base, entries[-1], out)
            except ConfigError as e:
                problems += [f"{name}: {p}" for p in e.problems]
    if len({e.name for e in entries}) != len(entries):
        raise ConfigError(f"sweep {path} expands to duplicate run names; make its runs/grid entries distinct")
    if problems:
        raise ConfigError(problems)
    return Sweep(base=base, dir=out, entries=entries)


def entry_config(base: dict[str, Any], entry: SweepEntry, out: Path) -> Any:
    """The validated Config of one entry (method-specific base keys are dropped when the method changes)."""
    data = copy.deepcopy(base)  # apply_overrides edits nested sections in place: never touch the shared base
    if "method.name" in entry.overrides and entry.overrides["method.name"] != data.get("method", {}).get("name"):
        data["method"] = {}  # the base's method options belong to another method
    data = apply_overrides(data, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in entry.overrides.items()])
    data = apply_overrides(data, [f"run.seed={entry.seed}", f"run.dir={out / 'runs'}", f"run.name={entry.name}"])
    return config_from_dict(data)


def run_sweep(sweep: Sweep, progress: bool = True) -> dict[str, Any]:
    """Run every entry not finished yet (resuming from checkpoints), then aggregate.

    Returns:
        {"done": [...], "skipped": [...], "failed": {name: error}, "report": path}
    """
    from tqdm.auto import tqdm

    import visiontune as vt

    sweep.dir.mkdir(parents=True, exist_ok=True)
    fail_path = sweep.dir / "failures.json"
    failures: dict[str, str] = json.loads(fail_path.read_text()) if fail_path.exists() else {}
    done, skipped = [], []
    bar = tqdm(sweep.entries, desc="sweep", disable=not progress, dynamic_ncols=True)
    for entry in bar:
        bar.set_postfix_str(entry.name[:60])
        run_dir = sweep.dir / "runs" / entry.name
        if (run_dir / "metrics.json").exists():
            skipped.append(entry.name)
            continue
        cfg = entry_config(sweep.base, entry, sweep.dir)
        cfg.run.resume = (run_dir / "checkpoint" / "last.pt").exists()
        cfg.run.progress = progress and cfg.run.progress
        try:
            vt.train(cfg)
            done.append(entry.name)
            failures.pop(entry.name, None)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one run's failure must not stop the sweep: record it and go on
            failures[entry.name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
            if progress:
                print(f"[sweep] {entry.name} failed: {type(e).__name__}: {e}")
        fail_path.write_text(json.dumps(failures, indent=1))
    report = aggregate(sweep)
    return {"done": done, "skipped": skipped, "failed": failures, "report": str(report)}


def sweep_status(sweep: Sweep) -> list[tuple[str, str]]:
    """(run name, state) for every entry: done, failed, partial (has a checkpoint: resumes) or pending."""
    fail_path = sweep.dir / "failures.json"
    failures = json.loads(fail_path.read_text()) if fail_path.exists() else {}
    out = []
    for e in sweep.entries:
        d = sweep.dir / "runs" / e.name
        if (d / "metrics.json").exists():
            state = "done"
        elif e.name in failures:
            state = "failed: " + failures[e.name].splitlines()[0]
        elif (d / "checkpoint" / "last.pt").exists():
            state = "partial (resumes from its checkpoint)"
        else:
            state = "pending"
        out.append((e.name, state))
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def aggregate(sweep: Sweep) -> Path:
    """Write results.csv, report.md (study-style table, mean ± std over seeds, best vs linear probe) and plots."""
    from visiontune.eval import plot_comparison
    from visiontune.eval.report import format_count, format_duration, summarize_run

    rows, metrics_by_name = [], {}
    for e in sweep.entries:
        mpath = sweep.dir / "runs" / e.name / "metrics.json"
        if not mpath.exists():
            continue
        m = json.loads(mpath.read_text())
        metrics_by_name[e.name] = m
        detail = m["run"].get("method_detail", m["run"]["method"])
        rows.append({"run": e.name, "group": e.group, "seed": e.seed, "detail": detail, **summarize_run(m)})
    with open(sweep.dir / "results.csv", "w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    lines = [f"# Sweep `{sweep.dir.name}`", "", f"{len(rows)} of {len(sweep.entries)} runs finished.", ""]
    table = [
        "| method | detail | backbone | trainable | trainable % | train time | test accuracy (%) | weighted F1 | seeds |",
        "|:---|:---|:---|---:|---:|---:|---:|---:|---:|",
    ]
    summary = []
    for g, rs in groups.items():
        acc_m, acc_s = _mean_std([r["test_accuracy"] for r in rs])
        f1_m, f1_s = _mean_std([r["test_f1_weighted"] for r in rs])
        t_m, _ = _mean_std([r["train_time_s"] or 0.0 for r in rs])
        r0 = rs[0]
        summary.append((g, r0, acc_m, acc_s, f1_m, f1_s, len(rs)))
        pm = lambda m, s, k=1.0, fmt=".1f": f"{m * k:{fmt}}" + (f" ± {s * k:{fmt}}" if len(rs) > 1 else "")  # noqa: E731
        table.append(
            f"| {r0['method']} | {r0['detail']} | {r0['backbone']} | {format_count(r0['trainable'])} | "
            f"{r0['trainable_pct']:.2f}% | {format_duration(t_m)} | {pm(acc_m, acc_s, 100)} | {pm(f1_m, f1_s, 1, '.4f')} | {len(rs)} |"
        )
    lines += table
    if summary:
        best = max(summary, key=lambda s: s[2])
        lines += ["", f"**Best: {best[1]['detail']}** ({best[1]['backbone']}) — test accuracy {best[2] * 100:.1f}%"
                  + (f" ± {best[3] * 100:.1f}" if best[6] > 1 else "") + f", weighted F1 {best[4]:.4f}."]
        probe = [s for s in summary if s[1]["method"] == "linear"]
        if probe and probe[0] is not best:
            p = probe[0]
            n = metrics_by_name[best[1]["run"]]["run"]["test_size"]
            se = math.sqrt(max(best[2] * (1 - best[2]), 1e-9) / n) * 100
            lines.append(
                f"Margin over the linear probe: {(best[2] - p[2]) * 100:+.1f} points "
                f"(binomial standard error of one run's accuracy on {n} test images: ±{se:.1f}"
                + (f"; seed std {best[3] * 100:.1f}" if best[6] > 1 else "") + ")."
            )
        best_run = metrics_by_name[best[1]["run"]]
        lines += ["", "## Per-class scores of the best configuration", "",
                  "| class | precision | recall | F1 | support |", "|:---|---:|---:|---:|---:|"]
        for c, r in best_run["test"]["per_class"].items():
            lines.append(f"| {c} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |")
        plot_comparison(list(metrics_by_name.values()), sweep.dir / "accuracy_vs_params.png")
        lines += ["", "![accuracy vs trainable parameters](accuracy_vs_params.png)",
                  f"", f"Confusion matrix of the best run: `runs/{best[1]['run']}/confusion.png`."]
    fail_path = sweep.dir / "failures.json"
    failures = json.loads(fail_path.read_text()) if fail_path.exists() else {}
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- `{k}`: {v.splitlines()[0]}" for k, v in failures.items()]
    report = sweep.dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
