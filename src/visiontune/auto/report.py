"""``leaderboard.md`` / ``leaderboard.json`` and the two figures of a ``visiontune auto`` selection."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.atomic import write_text_atomic
from visiontune.auto.schedule import used_text


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "—"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _ci(ci: list[float] | None, signed: bool = False) -> str:
    if not ci or not all(np.isfinite(ci)):
        return "—"
    return f"[{_pct(ci[0], signed)}, {_pct(ci[1], signed)}]"


def _se(row: dict[str, Any]) -> str:
    se = row.get("vs_probe_se")
    return "" if se is None or not math.isfinite(se) or se == 0 else f" ± {100 * se:.1f}"


def _used(record: dict[str, Any]) -> str:
    """'Used 12.3 of 15.0 minutes' of the budget."""
    text = used_text(record["elapsed_s"], record.get("budget_s"))
    return text[0].upper() + text[1:]


def _pm(mean: float | None, sd: float | None) -> str:
    """'+3.1 ± 2.0' points, '+3.1' without a finite sd, '—' without a mean."""
    if mean is None:
        return "—"
    return f"{100 * mean:+.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def posterior_markdown(record: dict[str, Any]) -> list[str]:
    """The decision's table (each eligible candidate's posterior gain over the probe) and the prior's provenance,
    outside-range note and nearest meta-benchmark tasks."""
    rows = [r for r in record["leaderboard"] if r.get("gain")]
    if not rows:
        return []
    decision = record["decision"]
    rope = decision.get("rope", 1.0)
    lines = [
        f"| candidate | prior gain (points, source) | fold gain (t location ± scale) | posterior gain | P(better) "
        f"| P(within ±{rope:g}) | from prior / data | expected accuracy (%) |",
        "|:---|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: -r["gain"]["utility"]):
        g, p = r["gain"], r["gain"]["prior"]
        prior = "flat" if p["mean"] is None else f"{_pm(p['mean'], p['sd'])} ({p['source']}" + (
            f"; outside its range: {', '.join(p['outside'])}" if p["outside"] else "") + (
            f"; missing: {', '.join(p['missing'])}" if p["missing"] else "") + ")"
        data = "—" if g["data_mean"] is None else _pm(g["data_mean"], g["data_scale"])
        share = f"{100 * g['prior_share']:.0f} / {100 * g['data_share']:.0f} %"
        mark = "**" if r["candidate"] == decision["candidate"] else ""
        if r["candidate"] == record.get("probe"):
            lines.append(f"| {mark}{r['candidate']}{mark} | — (the reference) | — | 0 | — | — | — | {_pct(g['expected_accuracy'])} |")
            continue
        lines.append(f"| {mark}{r['candidate']}{mark} | {prior} | {data} | {_pm(g['mean'], g['sd'])} | {g['p_better']:.2f} "
                     f"| {g['p_equivalent']:.2f} | {share} | {_pct(g['expected_accuracy'])} |")
    out = ["", "Posterior gain over the linear probe (points): the prior combined with the paired folds by the Bayesian "
           "correlated t-test (Benavoli et al. 2017); chosen: the highest expected accuracy"
           + (f" less the cost margin of {decision['cost_margin']:g} points for a fine-tune" if decision.get("cost_margin")
              else " (cost margin 0)") + ".", "", *lines, ""]
    prior = record.get("prior") or {}
    if prior.get("name") == "meta":
        prov = prior.get("provenance", {})
        out.append(f"Prior: learned on the meta-benchmark ({len(prov.get('datasets') or [])} datasets, "
                   f"{prov.get('rows_used', '?')} tasks; {prov.get('date', 'undated')}, code {prov.get('code', '?')}"
                   + (f"; left out: {', '.join(prov['left_out'])}" if prov.get("left_out") else "") + f"; `{prior.get('file')}`).")
        if any(r["gain"]["prior"]["outside"] for r in rows):
            out.append("This task lies outside the range the prior was fitted on (features named above): its sd is "
                       "widened there, so the folds weigh more.")
        near = prior.get("nearest") or []
        if near:
            out.append("Nearest meta-benchmark tasks (standardized meta-features): " + "; ".join(
                f"{t['task']} ({t['backbone']}, distance {t['distance']:.1f}: "
                + ", ".join(f"{k} {100 * v:+.1f}" for k, v in t["gain"].items()) + ")" for t in near) + ".")
    else:
        out.append("Prior: flat (no learned prior; the folds alone decide).")
    return [*out, ""]


def leaderboard_markdown(record: dict[str, Any]) -> str:
    """The leaderboard table, the decision in words and the final model's held-out test score."""
    rows = sorted(record["leaderboard"], key=lambda r: -(r.get("accuracy") or -1))
    head = (
        "| candidate | status | folds | CV accuracy (%) | 95 % interval | weighted F1 | macro F1 | vs linear probe (points ± SE) "
        "| 95 % interval | train time per fold | trainable % |\n|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        stop = r.get("partial")
        stopped = (f"; stopped by the budget at epoch {stop['epoch']} of {stop['epochs']} of fold {stop['fold']}: "
                   f"{_pct(stop['accuracy'])} %") if stop and r.get("folds") else ""
        if not r.get("folds"):
            rung = r.get("first_rung")
            where = f"0 (fold 1 at epoch {rung['epoch']} of {rung['epochs']}: {_pct(rung['accuracy'])} %)" if rung else "0"
            status = r["status"] + (f": {r['why']}" if r["status"] == "budget" and r.get("why") else "")
            lines.append(f"| {r['candidate']} | {status} | {where} | — | — | — | — | — | — | — | — |")
            continue
        mark = "**" if r["candidate"] == record["decision"]["candidate"] else ""
        trainable = "—" if r.get("trainable_pct") is None else f"{r['trainable_pct']:.2f}"
        lines.append(
            f"| {mark}{r['candidate']}{mark} | {r['status']} | {r['folds']}{stopped} | {_pct(r['accuracy'])} | {_ci(r['accuracy_ci'])} "
            f"| {r['f1_weighted']:.3f} | {r['f1_macro']:.3f} | {_pct(r['vs_probe'], True)}{_se(r)} | {_ci(r['vs_probe_ci'], True)} "
            f"| {r['train_s_per_fold']:.1f} s | {trainable} |"
        )
    final = record["final"]
    test = final.get("test")
    parts = [
        f"# visiontune auto: {record['backbone']}",
        "",
        f"{record['pool']} labeled images, stratified {record['folds']}-fold cross-validation (the same folds for every "
        f"candidate); {record['test_images']} test images held out and read once, by the final model. "
        + _used(record) + ".",
        "",
        "\n".join(lines),
        "",
        *[f"Skipped, cannot apply to {record['backbone']}: **{r['candidate']}**: {r['why']}\n" for r in rows
          if r.get("status") == "skipped"],
        *posterior_markdown(record),
        f"**Decision: {record['decision']['candidate']}.** {record['decision']['reason']}.",
        "",
        f"Shipped: `{final['run_dir']}` ({final['method']}{'; ' + final['note'] if final.get('note') else ''}), trained on "
        "every labeled image.",
    ]
    ex = record.get("explora")
    if ex:
        if ex["status"] == "complete":
            g = ex["gain_vs_base"]
            parts.append(
                f"ExPLoRA on the unlabeled images ({ex.get('images')} images, {ex.get('held_out') or 0} test/val images "
                f"left out, {ex['pretrain_s'] / 60:.1f} min): best cheap candidate {_pct(g['mean'], True)} points vs the "
                f"original backbone (standard error {_pct(g.get('se', float('nan')))}, 95 % interval {_pct(g['low'], True)} to "
                f"{_pct(g['high'], True)}); "
                + ("fine-tuning ran on the ExPLoRA backbone." if ex["chosen"] else "not more than one standard error, so "
                   "the original backbone was kept.")
            )
        else:
            parts.append(f"ExPLoRA on the unlabeled images: not used ({ex['status']}: {ex.get('why', '')}).")
    if record.get("finetune_s"):
        parts.append(f"Fine-tuning jobs of the search (first-rung thirds, folds): {record['finetune_s'] / 60:.1f} min of wall time.")
    if test:
        parts.append(
            f"Held-out test ({test['num_samples']} images): accuracy {100 * test['accuracy']:.1f} %, weighted F1 "
            f"{test['f1_weighted']:.3f}, macro F1 {test['f1_macro']:.3f}."
        )
    parts += [
        "",
        "Intervals and standard errors: corrected resampled t (Nadeau & Bengio 2003) over folds. Rule: the highest "
        "posterior expected accuracy (probe's fold mean + posterior gain), less the cost margin for a fine-tune; a fold "
        "the budget stopped is not in the fold mean; a candidate the budget left with fewer than two finished folds (not "
        "pruned) is judged on its learned prior alone, where one applies; "
        "'pruned' = stopped early by successive "
        "halving (not in the top third at a rung: a third of the way into fold 1, the end of fold 1, the end of fold 3; "
        "one pruned after two or more finished folds is judged on those), 'budget' = not started (too little of the budget left for one epoch) or stopped by it between two optimizer steps, its last checkpoint scored on the fold's held-out part"
        + ("; 'failed' = the worker training one of its folds died (the same command retries it)."
           if any(r.get("status") == "failed" for r in record["leaderboard"]) else "."),
        "",
        "![accuracy vs time](accuracy_vs_time.png)",
        "",
        "![per-class F1](per_class_f1.png)",
    ]
    return "\n".join(parts) + "\n"


def _per_class_f1(confusions: list[list[list[int]]]) -> np.ndarray:
    cm = np.sum(np.asarray(confusions, dtype=float), axis=0)
    tp = np.diag(cm)
    prec = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
    rec = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
    return np.divide(2 * prec * rec, prec + rec, out=np.zeros_like(tp), where=(prec + rec) > 0)


def _spread_labels(xs: list[float], ys: list[float], span: list[float], gap: float = 0.045) -> list[float]:
    """Label heights for points on a log-x plot so that labels of neighbouring points do not overlap.

    Greedy, from the highest point down: a label moves down until it is ``gap`` (a fraction of the plotted
    accuracy range) below every label already placed whose point lies within a factor of 2 in x (labels sit to
    the right of their point, so farther ones do not collide). Written by hand: matplotlib has no label
    placement, and a dependency (adjustText) for a few labels is not worth it.
    """
    values = [*ys, *span]
    step = gap * (max(values) - min(values) or 1.0)
    placed: list[tuple[float, float]] = []
    out = [0.0] * len(ys)
    for i in sorted(range(len(ys)), key=lambda i: -ys[i]):
        y = ys[i]
        for x, ly in sorted(placed, key=lambda p: -p[1]):
            if abs(np.log2(xs[i] / x)) < 1 and y > ly - step:
                y = ly - step
        placed.append((xs[i], y))
        out[i] = y
    return out


def write_report(out: Path, record: dict[str, Any], state: dict[str, Any], classes: list[str], probe: str) -> None:
    """Write leaderboard.md / .json, accuracy_vs_time.png and per_class_f1.png into ``out``; the per-class
    figure sets the winner beside ``probe`` (the linear probe's candidate name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_text_atomic(out / "leaderboard.json", json.dumps(record, indent=1, default=float) + "\n")
    write_text_atomic(out / "leaderboard.md", leaderboard_markdown(record))

    rows = [r for r in record["leaderboard"] if r.get("folds")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [max(r["train_s_per_fold"], 1e-2) for r in rows]
    ys = [100 * r["accuracy"] for r in rows]
    label_ys = _spread_labels(xs, ys, [100 * v for r in rows for v in r["accuracy_ci"] if np.isfinite(v)])
    for r, x, y, ly in zip(rows, xs, ys, label_ys):
        lo, hi = r["accuracy_ci"]
        err = [[100 * (r["accuracy"] - lo)], [100 * (hi - r["accuracy"])]] if np.isfinite(lo) else None
        chosen = r["candidate"] == record["decision"]["candidate"]
        ax.errorbar(
            x, y, yerr=err, fmt="o", capsize=3,
            color="tab:red" if chosen else ("tab:gray" if r["status"] != "complete" else "tab:blue"),
        )
        moved = abs(ly - y) > 1e-9
        ax.annotate(r["candidate"], (x, y), xytext=(x * 1.12, ly), fontsize=7, va="center",
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if moved else None)
    ax.set_xscale("log")
    ax.margins(x=0.12)  # room on the right for the labels of the dearest candidates
    ax.set_xlabel("training time per fold (s, log)")
    ax.set_ylabel("cross-validated accuracy (%)")
    ax.set_title("candidates: mean and 95 % interval over folds (red: chosen, gray: pruned/partial)")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_time.png", dpi=120)
    plt.close(fig)

    def confusions(name: str) -> list | None:
        for pool in state["cheap"].values():
            if name in pool["candidates"]:
                return [f["confusion"] for f in pool["candidates"][name]["folds"]]
        rec = state["finetune"].get(name)
        return [f["confusion"] for f in rec["folds"]] if rec and rec["folds"] else None

    winner = record["decision"]["candidate"]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes)), 4))
    idx = np.arange(len(classes))
    for k, (name, color) in enumerate([(probe, "tab:gray"), (winner, "tab:red")]):
        cms = confusions(name)
        if cms:
            ax.bar(idx + (k - 0.5) * 0.4, _per_class_f1(cms), width=0.4, label=name, color=color)
    ax.set_xticks(idx, classes, rotation=45 if len(classes) > 6 else 0, ha="right" if len(classes) > 6 else "center")
    ax.set_ylabel("F1 (out-of-fold predictions)")
    ax.set_ylim(0, 1.15)  # room above the bars for the legend
    ax.legend(loc="upper center", ncol=2)
    ax.set_title("per-class F1: chosen candidate vs linear probe")
    fig.tight_layout()
    fig.savefig(out / "per_class_f1.png", dpi=120)
    plt.close(fig)
