"""Aggregating a sweep: results.csv (one row per run), report.md (the study's table) and figures.

Written by hand: the grouping (one configuration = one grid point, its runs = its seeds), mean ± std
over seeds, the best configuration's margin over the linear probe with its uncertainty, and the
study-style layout are this project's own; pandas would only replace a few list comprehensions.

Uncertainty of a margin (best − probe, in accuracy points) combines two sources in quadrature:
the test-set sampling error of each accuracy (binomial, ``sqrt(p(1-p)/n)``, counted independently for
the two runs although they share test images — conservative), and when there are several seeds the
standard error of the mean paired difference across seeds. A margin under two standard errors is
reported as not demonstrated.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from visiontune.atomic import atomic_write, write_text_atomic
from visiontune.eval import plot_confusion
from visiontune.eval.report import format_count, format_duration
from visiontune.eval.summary import summarize_run
from visiontune.rundir import claim_output_folder, read_json, read_yaml_mapping
from visiontune.sweep.plots import plot_per_class_f1, plot_sweep_scatter
from visiontune.sweep.spec import Sweep, read_failures

_SHOWN_KEYS = {"method.name", "method.targets", "method.rank", "backbone.name"}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(mean: float, std: float, n: int, scale: float = 1.0, fmt: str = ".1f") -> str:
    return f"{mean * scale:{fmt}}" + (f" ± {std * scale:{fmt}}" if n > 1 else "")


def _value_text(v: Any) -> str:
    return "+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _run_rows(sweep: Sweep, unreadable: list[str] | None = None) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """One flat row per finished entry (metrics.json + resolved config.yaml), and metrics by run name.

    A run whose metrics.json or config.yaml does not read back (a write cut short) is left out and, when
    ``unreadable`` is given, one line naming the file is appended to it.
    """
    rows, metrics = [], {}
    for e in sweep.entries:
        run_dir = sweep.dir / "runs" / e.name
        if not (run_dir / "metrics.json").exists():
            continue
        m, problem = read_json(run_dir / "metrics.json")
        if not problem and not (isinstance(m, dict) and isinstance(m.get("test"), dict) and isinstance(m.get("run"), dict)):
            problem = f"{run_dir / 'metrics.json'} is unreadable (no 'run' and 'test' sections)"
        cfg: dict[str, Any] | None = {}
        if not problem and (run_dir / "config.yaml").exists():
            cfg, problem = read_yaml_mapping(run_dir / "config.yaml")
        if problem:
            if unreadable is not None:
                unreadable.append(f"`{e.name}`: {problem}")
            continue
        method_cfg = (cfg or {}).get("method") or {}
        extras = {k: v for k, v in e.overrides.items() if k not in _SHOWN_KEYS}
        metrics[e.name] = m
        rows.append({
            "run": e.name, "group": e.group, "seed": e.seed,
            "target": _value_text(method_cfg["targets"]) if method_cfg.get("targets") else "",
            "rank": method_cfg.get("rank"),
            "setting": ", ".join(f"{k.split('.')[-1]}={_value_text(v)}" for k, v in extras.items()),
            "detail": m["run"].get("method_detail", m["run"]["method"]),
            **summarize_run(m),
        })
    return rows, metrics


def _groups(rows: list[dict[str, Any]], metrics: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: labels, mean ± std of accuracy / F1 / time over its seeds, per-class F1s."""
    by_group: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    modal_backbone = Counter(r["backbone"] for r in rows).most_common(1)[0][0] if rows else None
    out = []
    for g, rs in by_group.items():
        r0 = rs[0]
        show_backbone = r0["method"] == "scratch" or r0["backbone"] != modal_backbone
        series = " · ".join(p for p in (r0["method"], r0["backbone"] if show_backbone else "", r0["target"], r0["setting"]) if p)
        label = series + (f" · r{r0['rank']}" if r0["rank"] is not None else "")
        acc = mean_std([r["test_accuracy"] for r in rs])
        f1 = mean_std([r["test_f1_weighted"] for r in rs])
        t = mean_std([r["train_time_s"] or 0.0 for r in rs])
        classes = list(metrics[r0["run"]]["test"]["per_class"])
        per_class = {c: mean_std([metrics[r["run"]]["test"]["per_class"][c]["f1"] for r in rs]) for c in classes}
        out.append({
            "group": g, "runs": rs, "n": len(rs), "label": label, "series": series, "method": r0["method"],
            "backbone": r0["backbone"], "target": r0["target"], "rank": r0["rank"], "setting": r0["setting"],
            "trainable": r0["trainable"], "trainable_pct": r0["trainable_pct"], "acc_mean": acc[0], "acc_std": acc[1],
            "f1_mean": f1[0], "f1_std": f1[1], "time_mean": t[0], "time_std": t[1], "classes": classes,
            "per_class_f1": per_class, "test_size": metrics[r0["run"]]["run"]["test_size"],
        })
    return out


def margin(best: dict[str, Any], probe: dict[str, Any]) -> dict[str, float]:
    """Best − probe accuracy (fractions) with its standard error; see the module docstring.

    Args:
        best: a configuration summary (from the aggregation) with ``runs``, ``acc_mean`` and ``test_size``.
        probe: the linear probe's summary.

    Returns:
        {"margin", "se", "se_test", "se_seed"} as fractions of 1.
    """
    diff = best["acc_mean"] - probe["acc_mean"]
    n_b, n_p = best["test_size"], probe["test_size"]
    se_test = math.sqrt(best["acc_mean"] * (1 - best["acc_mean"]) / n_b + probe["acc_mean"] * (1 - probe["acc_mean"]) / n_p)
    se_seed = 0.0
    seeds_b = {r["seed"]: r["test_accuracy"] for r in best["runs"]}
    seeds_p = {r["seed"]: r["test_accuracy"] for r in probe["runs"]}
    paired = sorted(set(seeds_b) & set(seeds_p))
    if len(paired) > 1:  # same seeds: the paired differences cancel what the seeds share
        se_seed = statistics.stdev([seeds_b[s] - seeds_p[s] for s in paired]) / math.sqrt(len(paired))
    elif best["n"] > 1 or probe["n"] > 1:
        se_seed = math.sqrt(best["acc_std"] ** 2 / best["n"] + probe["acc_std"] ** 2 / probe["n"])
    return {"margin": diff, "se": math.hypot(se_test, se_seed), "se_test": se_test, "se_seed": se_seed}


def _best_sentence(best: dict[str, Any], probe: dict[str, Any] | None, groups: list[dict[str, Any]]) -> list[str]:
    seeds = f" (mean ± std over {best['n']} seeds)" if best["n"] > 1 else ""
    head = (
        f"**Best configuration: {best['label']}** ({best['backbone']}, {_count(best['trainable'])} trainable, "
        f"{best['trainable_pct']:.2f}%): test accuracy {_pm(best['acc_mean'], best['acc_std'], best['n'], 100)}%"
        f"{seeds}, weighted F1 {_pm(best['f1_mean'], best['f1_std'], best['n'], 1, '.3f')}."
    )
    if probe is None:
        return [head, "", "No linear probe in this sweep: add `{method.name: linear}` to its runs for the reference margin."]
    if probe is best:
        others = [g for g in groups if g is not best]
        if not others:
            return [head]
        second = max(others, key=lambda g: g["acc_mean"])
        m = margin(second, probe)
        return [head, "", (
            f"The linear probe is the best configuration: the runner-up, {second['label']}, is "
            f"{m['margin'] * 100:+.1f} ± {m['se'] * 100:.1f} points from it (one standard error)."
        )]
    m = margin(best, probe)
    clear = abs(m["margin"]) >= 2 * m["se"]
    parts = [f"binomial over {best['test_size']} test images ±{m['se_test'] * 100:.1f}"]
    if m["se_seed"]:
        parts.append(f"across seeds ±{m['se_seed'] * 100:.1f}")
    verdict = (
        "more than two standard errors: a real improvement on this test set" if clear
        else "under two standard errors: **not a demonstrated improvement** over the probe"
    )
    return [head, "", (
        f"Margin over the linear probe ({_pm(probe['acc_mean'], probe['acc_std'], probe['n'], 100)}%): "
        f"**{m['margin'] * 100:+.1f} ± {m['se'] * 100:.1f} points** (one standard error: {'; '.join(parts)}) — {verdict}."
    )]


def _count(n: int | None) -> str:
    return format_count(n)


def _sessions_line(sweep_dir: Path) -> list[str]:
    """How the sweep ran (from sweep.json, written by run_sweep): sessions, wall time, workers."""
    path = sweep_dir / "sweep.json"
    if not path.exists():
        return []

    data, problem = read_json(path)
    sessions = data.get("sessions") if not problem and isinstance(data, dict) else None
    if not sessions or not isinstance(sessions, list):
        return []

    wall = sum(s.get("wall_time_s", 0.0) for s in sessions)
    last = sessions[-1]
    if last.get("executor") == "ray":
        cluster = last.get("cluster") or {}
        how = (f"on Ray ({last.get('address') or 'local instance'}: {cluster.get('CPU', 0):g} CPUs, "
               f"{cluster.get('GPU', 0):g} GPUs), per run {last.get('cpus_per_run', '?')} CPU(s) and "
               f"{last.get('gpus_per_run', 0):g} GPU(s)")
    else:
        workers, threads = last.get("workers") or 1, last.get("threads_per_worker", "?")
        how = (f"{workers} worker processes × {threads} torch threads" if workers > 1
               else f"one run at a time, {threads} torch threads") + f", {last.get('cores', '?')} cores"
    return ["", (
        f"Ran in {len(sessions)} session(s), {format_duration(wall)} wall in all; last: `{last.get('command', '')}`, "
        f"{how}."
    )]


SWEEP_KIND = "sweep"
SWEEP_MAKES = (
    "runs", "workers", "failures.json", "sweep.json", "results.csv", "report.md", "accuracy_vs_params.png",
    "accuracy_vs_time.png", "best_confusion.png", "best_per_class_f1.png",
)
"""Every top-level entry a sweep writes into its ``dir:`` (what an older sweep folder without a manifest holds)."""


def _is_old_sweep(folder: Path) -> bool:
    """A sweep folder from before manifests: its sweep.json session log reads back, or it holds only what a sweep
    writes, with ``runs/`` or ``results.csv`` among it."""
    log, problem = read_json(folder / "sweep.json")
    if not problem and isinstance(log, dict) and isinstance(log.get("sessions"), list):
        return True
    names = {p.name for p in folder.iterdir()}
    return bool(names & {"runs", "results.csv"}) and names <= set(SWEEP_MAKES)


def claim_sweep_dir(folder: Path, option: str = "the sweep's dir:") -> Path:
    """Refuse a sweep folder (or report folder) that holds what no sweep made; else mark it as a sweep's."""
    return claim_output_folder(folder, SWEEP_KIND, SWEEP_MAKES, _is_old_sweep, option)


def aggregate(sweep: Sweep, out: str | Path | None = None) -> Path:
    """Write results.csv, report.md and the figures for the finished runs of ``sweep``.

    Args:
        sweep: the parsed sweep; its runs are read from ``sweep.dir / "runs"``.
        out: folder for the outputs (default ``sweep.dir``), e.g. a results folder kept in git.

    Returns:
        The path of report.md. Figures: accuracy_vs_params.png, accuracy_vs_time.png (log x,
        mean ± std over seeds), best_confusion.png (the best configuration's best run) and
        best_per_class_f1.png (best configuration next to the linear probe).
    """
    out = Path(out) if out is not None else sweep.dir
    claim_sweep_dir(out, "the sweep's dir:" if out == sweep.dir else "the sweep report folder")

    unreadable: list[str] = []
    rows, metrics = _run_rows(sweep, unreadable)

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)

    atomic_write(out / "results.csv", write_csv)
    groups = _groups(rows, metrics)
    lines = [f"# Sweep `{sweep.dir.name}`", "", f"{len(rows)} of {len(sweep.entries)} runs finished."]
    if rows:
        r0 = metrics[rows[0]["run"]]["run"]
        cfg_path = sweep.dir / "runs" / rows[0]["run"] / "config.yaml"
        data = ((read_yaml_mapping(cfg_path)[0] or {}).get("data") or {}) if cfg_path.exists() else {}
        cap = data.get("test_per_class")
        lines.append(
            f"Data: `{r0['dataset']}`, {r0['train_size']} training images, {r0['val_size']} validation, "
            f"{r0['test_size']} test (everything else" + (f", capped at {cap} per class" if cap else "")
            + "); the same split for every run."
        )
    best = max(groups, key=lambda g: (g["acc_mean"], -(g["trainable"] or 0))) if groups else None
    probes = [g for g in groups if g["method"] == "linear"]
    probe = next((g for g in probes if best and g["backbone"] == best["backbone"]), probes[0] if probes else None)
    several_backbones = len({g["backbone"] for g in groups}) > 1
    has_setting = any(g["setting"] for g in groups)
    header = ["method"] + (["backbone"] if several_backbones else []) + ["target", "rank"] + (["setting"] if has_setting else []) + [
        "trainable", "trainable %", "train time", "test accuracy (%)", "weighted F1", "seeds"]
    align = [":---"] * (len(header) - 6) + ["---:"] * 6
    table = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for g in groups:
        acc = _pm(g["acc_mean"], g["acc_std"], g["n"], 100)
        cells = [g["method"]] + ([g["backbone"]] if several_backbones else []) + [
            g["target"] or "—", str(g["rank"]) if g["rank"] is not None else "—"] + ([g["setting"] or "—"] if has_setting else []) + [
            _count(g["trainable"]), f"{g['trainable_pct']:.2f}%",
            format_duration(g["time_mean"]) + (f" ± {format_duration(g['time_std'])}" if g["n"] > 1 else ""),
            f"**{acc}**" if g is best else acc, _pm(g["f1_mean"], g["f1_std"], g["n"], 1, ".3f"), str(g["n"])]
        table.append("| " + " | ".join(cells) + " |")
    if groups:
        lines += ["", *table, "", *_best_sentence(best, probe, groups)]
        lines += _sessions_line(sweep.dir)
        lines += ["", "![accuracy vs trainable parameters](accuracy_vs_params.png)",
                  "", "![accuracy vs training time](accuracy_vs_time.png)"]
        plot_sweep_scatter(groups, "trainable", out / "accuracy_vs_params.png", "trainable parameters (log scale)",
                           "test accuracy vs trainable parameters")
        plot_sweep_scatter(groups, "time_mean", out / "accuracy_vs_time.png", "training time, s (log scale)",
                           "test accuracy vs training time")
        lines += _best_details(best, probe, metrics, out)
    failures = read_failures(sweep.dir)
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- `{k}`: {(v.splitlines() or [''])[0]}" for k, v in failures.items()]
    if unreadable:
        lines += ["", "## Unfinished runs with unreadable files", "",
                  "Left out above; `visiontune sweep` redoes them.", ""] + [f"- {u}" for u in unreadable]
    return write_text_atomic(out / "report.md", "\n".join(lines) + "\n")


def _best_details(best: dict[str, Any], probe: dict[str, Any] | None, metrics: dict[str, dict[str, Any]], out: Path) -> list[str]:
    """Per-class table and F1 bars of the best configuration (vs the probe), and its best run's confusion matrix."""
    classes = best["classes"]
    runs = [metrics[r["run"]]["test"]["per_class"] for r in best["runs"]]
    n = best["n"]
    compare = probe is not None and probe is not best and probe["classes"] == classes
    lines = ["", f"## Per-class scores of the best configuration ({best['label']})", "",
             "| class | precision | recall | F1 |" + (" F1 of the linear probe |" if compare else "") + " support |",
             "|:---|---:|---:|---:|" + ("---:|" if compare else "") + "---:|"]
    for c in classes:
        p, r = mean_std([x[c]["precision"] for x in runs]), mean_std([x[c]["recall"] for x in runs])
        f1 = best["per_class_f1"][c]
        probe_cell = f" {_pm(*probe['per_class_f1'][c], probe['n'], 1, '.3f')} |" if compare else ""
        lines.append(f"| {c} | {_pm(*p, n, 1, '.3f')} | {_pm(*r, n, 1, '.3f')} | {_pm(*f1, n, 1, '.3f')} |{probe_cell} {runs[0][c]['support']} |")
    bars = {best["label"]: ([best["per_class_f1"][c][0] for c in classes], [best["per_class_f1"][c][1] for c in classes])}
    if compare:
        bars["linear probe"] = ([probe["per_class_f1"][c][0] for c in classes], [probe["per_class_f1"][c][1] for c in classes])
    plot_per_class_f1(classes, bars, out / "best_per_class_f1.png", "per-class test F1" + (" (mean ± std over seeds)" if n > 1 else ""))
    top = max(best["runs"], key=lambda r: r["test_accuracy"])
    plot_confusion(metrics[top["run"]]["test"]["confusion"], classes, out / "best_confusion.png",
                   title=f"{best['label']}, seed {top['seed']}: {top['test_accuracy'] * 100:.1f}%")
    lines += ["", "![per-class F1](best_per_class_f1.png)", "",
              f"Confusion matrix of the best run (`runs/{top['run']}`, test accuracy {top['test_accuracy'] * 100:.1f}%):",
              "", "![confusion matrix of the best run](best_confusion.png)"]
    return lines
