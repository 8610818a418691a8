"""Markdown reports: one run's ``report.md`` and the comparison table across runs.

Written by hand because no library formats this particular content; everything reads the
``metrics.json`` layout written by the training loop::

    {"run": {...}, "params": {...}, "train": {...}, "val": <metrics> | None, "test": <metrics>,
     "speed": <measure_speed> | None}

Sections whose data is missing are left out rather than printed as ``None``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visiontune.eval.plots import plot_confusion, plot_history
from visiontune.eval.summary import section, summarize_run
from visiontune.atomic import write_text_atomic

REPORT_NAME = "report.md"
CONFUSION_PNG = "confusion.png"
HISTORY_PNG = "history.png"

_MISSING = "–"


# ----------------------------------------------------------------------------------------------- formatting


def format_count(n: int | float | None) -> str:
    """Formats a parameter count compactly: 950, 12.3K, 2.6M, 1.1B."""
    if n is None:
        return _MISSING
    n = float(n)
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}"
    return f"{n:.0f}"


def format_pct(p: float | None) -> str:
    """Formats a percentage with precision that keeps small trainable fractions distinguishable."""
    if p is None:
        return _MISSING
    if p == 0:
        return "0%"
    if p < 0.01:
        return "<0.01%"
    if p < 1:
        return f"{p:.2f}%"
    if p < 10:
        return f"{p:.1f}%"
    return f"{p:.0f}%"


def format_duration(seconds: float | None) -> str:
    """Formats a wall time as seconds, minutes or hours."""
    if seconds is None:
        return _MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return _MISSING if value is None else format(value * scale, spec)


def _fmt_speed(value: float | None) -> str:
    if value is None:
        return _MISSING
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def _cell(value: Any) -> str:
    """Makes a value safe inside a Markdown table cell (a ``|`` would split the cell)."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]], align: list[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _facts(rows: list[list[Any]]) -> str | None:
    """Key-value facts as a bullet list (a two-column table would need an empty header row)."""
    return "\n".join(f"- **{key}**: {value}" for key, value in rows) if rows else None


# ----------------------------------------------------------------------------------------------- comparison

COMPARE_COLUMNS = [
    "method",
    "backbone",
    "weights",
    "trainable params",
    "train time",
    "test accuracy (%)",
    "weighted F1",
    "macro F1",
    "latency ms/img",
    "throughput img/s",
]


def compare_table(rows: list[dict]) -> str:
    """Markdown table comparing runs, in the order given, with the best test accuracy in bold.

    Accuracy is compared at the displayed precision (0.1 point), so runs that tie on screen are all bold.

    Args:
        rows: runs' metrics dicts in the ``metrics.json`` layout (e.g. from ``load_run_metrics``).

    Returns:
        The table as Markdown text (header, alignment row, one line per run), without a trailing newline.
    """
    summaries = [summarize_run(row) for row in rows]
    shown_acc = [_fmt(s["test_accuracy"], ".1f", 100.0) for s in summaries]
    numeric = [float(a) for a in shown_acc if a != _MISSING]
    best = format(max(numeric), ".1f") if numeric else None

    table_rows = []
    for s, acc in zip(summaries, shown_acc):
        params = format_count(s["trainable"])
        if s["trainable_pct"] is not None and s["trainable"] is not None:
            params += f" ({format_pct(s['trainable_pct'])})"
        table_rows.append(
            [
                s["method"] or _MISSING,
                s["backbone"] or _MISSING,
                s["weights"] or _MISSING,
                params,
                format_duration(s["train_time_s"]),
                f"**{acc}**" if acc == best else acc,
                _fmt(s["test_f1_weighted"], ".3f"),
                _fmt(s["test_f1_macro"], ".3f"),
                _fmt_speed(s["latency_ms"]),
                _fmt_speed(s["throughput_img_s"]),
            ]
        )
    align = [":---"] * 3 + ["---:"] * (len(COMPARE_COLUMNS) - 3)
    return _table(COMPARE_COLUMNS, table_rows, align)


# ----------------------------------------------------------------------------------------------- run report

_MEMORY_KINDS = {
    "cuda_allocated": "CUDA memory allocated to tensors",
    "cpu_rss_peak": "process resident memory, RSS",
}


def _summary_line(metrics: dict) -> str:
    run, params, train, test = (section(metrics, k) for k in ("run", "params", "train", "test"))
    subject = f"**{run.get('method', 'run')}**"
    if run.get("backbone"):
        subject += f" on **{run['backbone']}**"
        if run.get("weights"):
            subject += f" ({run['weights']} weights)"
    parts = [subject]
    if test.get("accuracy") is not None:
        scores = f"test accuracy **{100.0 * test['accuracy']:.1f}%**"
        extra = []
        if test.get("f1_weighted") is not None:
            extra.append(f"weighted F1 {test['f1_weighted']:.3f}")
        if test.get("f1_macro") is not None:
            extra.append(f"macro F1 {test['f1_macro']:.3f}")
        if extra:
            scores += f" ({', '.join(extra)})"
        if test.get("num_samples") is not None:
            scores += f" on {test['num_samples']} images"
        parts.append(scores)
    if params.get("trainable") is not None and params.get("total"):
        parts.append(
            f"{format_count(params['trainable'])} of {format_count(params['total'])} parameters trained "
            f"({format_pct(params.get('trainable_pct'))})"
        )
    if train.get("wall_time_s") is not None:
        parts.append(f"{format_duration(train['wall_time_s'])} of training")
    return parts[0] + (" — " + "; ".join(parts[1:]) if len(parts) > 1 else "") + "."


def _run_facts(run: dict) -> str | None:
    facts = []
    for key, label in (("name", "run"), ("method", "method"), ("backbone", "backbone"), ("weights", "weights"),
                       ("dataset", "dataset")):
        if run.get(key) is not None:
            facts.append([label, f"`{run[key]}`" if key in ("name", "dataset") else run[key]])
    classes = run.get("classes")
    if classes:
        shown = ", ".join(str(c) for c in classes[:12]) + (", …" if len(classes) > 12 else "")
        facts.append(["classes", f"{len(classes)} ({shown})"])
    sizes = [f"{split} {run[f'{split}_size']}" for split in ("train", "val", "test")
             if run.get(f"{split}_size") is not None]
    if sizes:
        facts.append(["images", " / ".join(sizes)])
    for key in ("seed", "device"):
        if run.get(key) is not None:
            facts.append([key, run[key]])
    return _facts(facts)


def _scores_table(metrics: dict) -> str | None:
    rows = []
    for split in ("val", "test"):
        scores = section(metrics, split)
        if scores.get("accuracy") is None:
            continue
        rows.append([
            split,
            _fmt(scores.get("accuracy"), ".1f", 100.0),
            _fmt(scores.get("f1_weighted"), ".3f"),
            _fmt(scores.get("f1_macro"), ".3f"),
            scores.get("num_samples", _MISSING),
        ])
    if not rows:
        return None
    header = ["split", "accuracy (%)", "weighted F1", "macro F1", "images"]
    return _table(header, rows, [":---", "---:", "---:", "---:", "---:"])


def _per_class_table(test: dict) -> str | None:
    per_class = test.get("per_class")
    if not per_class:
        return None
    rows = [
        [name, _fmt(c.get("precision"), ".3f"), _fmt(c.get("recall"), ".3f"), _fmt(c.get("f1"), ".3f"),
         c.get("support", _MISSING)]
        for name, c in per_class.items()
    ]
    return _table(["class", "precision", "recall", "F1", "support"], rows,
                  [":---", "---:", "---:", "---:", "---:"])


def _params_table(params: dict) -> str | None:
    if params.get("trainable") is None or params.get("total") is None:
        return None
    return _table(
        ["trainable", "total", "trainable share"],
        [[f"{params['trainable']:,} ({format_count(params['trainable'])})",
          f"{params['total']:,} ({format_count(params['total'])})",
          format_pct(params.get("trainable_pct"))]],
        ["---:", "---:", "---:"],
    )


def _train_table(train: dict) -> str | None:
    rows = []
    if train.get("wall_time_s") is not None:
        segments = train.get("segments") or 1
        resumed = f" (in {segments} segments: the run was interrupted and resumed)" if segments > 1 else ""
        rows.append(["wall time", format_duration(train["wall_time_s"]) + resumed])
    if train.get("epochs") is not None:
        epochs = str(train["epochs"])
        if train.get("best_epoch") is not None:
            epochs += f" (best checkpoint: epoch {train['best_epoch']})"
        rows.append(["epochs", epochs])
    if train.get("peak_memory_mb") is not None:
        kind = _MEMORY_KINDS.get(train.get("memory_kind"), train.get("memory_kind"))
        rows.append(["peak memory", f"{train['peak_memory_mb']:,.0f} MiB" + (f" ({kind})" if kind else "")])
    if train.get("feature_cache") is not None:
        rows.append(["feature cache",
                     "yes: frozen-backbone features computed once and reused every epoch"
                     if train["feature_cache"] else "no"])
    return _facts(rows)


def _speed_table(speed: dict) -> str | None:
    rows = []
    if speed.get("latency_ms") is not None:
        rows.append(["latency (batch 1)", f"{_fmt_speed(speed['latency_ms'])} ms/img"])
    if speed.get("throughput_img_s") is not None:
        at = f" (batch {speed['batch_size']})" if speed.get("batch_size") else ""
        rows.append(["throughput", f"{_fmt_speed(speed['throughput_img_s'])} img/s{at}"])
    if not rows:
        return None
    where = speed.get("device")
    if where and speed.get("threads") and str(where).startswith("cpu"):
        where = f"{where}, {speed['threads']} threads"
    if where:
        rows.append(["device", where])
    if speed.get("input_size"):
        rows.append(["input", " x ".join(str(s) for s in speed["input_size"])
                     + (f", {speed['dtype']}" if speed.get("dtype") else "")])
    return _facts(rows)


def write_report(run_dir: str | Path, metrics: dict) -> Path:
    """Writes ``report.md`` for one run.

    Sections: summary line, run facts, scores (val and test), per-class test scores, parameters,
    training cost, inference speed, and the confusion matrix / training-curve images when
    ``confusion.png`` / ``history.png`` exist in ``run_dir``. Sections without data are omitted.

    Args:
        run_dir: the run directory (created if needed); images are linked relative to it.
        metrics: the run's metrics dict in the ``metrics.json`` layout.

    Returns:
        Path of the written ``report.md``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = section(metrics, "run")
    title = f"# visiontune run `{run['name']}`" if run.get("name") else "# visiontune run"
    blocks = [title, _summary_line(metrics)]

    def add(heading: str, body: str | None, note: str | None = None) -> None:
        if body:
            blocks.append(f"## {heading}\n\n{body}" + (f"\n\n{note}" if note else ""))

    add("Run", _run_facts(run))
    add("Scores", _scores_table(metrics),
        "Macro F1 averages over the classes present in the labels or the predictions of that split.")
    add("Per-class scores (test)", _per_class_table(section(metrics, "test")))
    add("Parameters", _params_table(section(metrics, "params")))
    add("Training cost", _train_table(section(metrics, "train")))
    add("Inference speed", _speed_table(section(metrics, "speed")),
        "Random input, eval mode, `torch.inference_mode`; latency is the median over batch-1 passes.")
    if (run_dir / CONFUSION_PNG).is_file():
        add("Confusion matrix (test)", f"![confusion matrix]({CONFUSION_PNG})",
            "Rows are true classes, columns predicted classes; colours are normalised per row.")
    if (run_dir / HISTORY_PNG).is_file():
        add("Training curves", f"![training history]({HISTORY_PNG})")

    return write_text_atomic(run_dir / REPORT_NAME, "\n\n".join(blocks) + "\n")


def write_run_artifacts(run_dir: str | Path, metrics: dict) -> dict[str, Path]:
    """Draws a run's plots from its metrics and then writes ``report.md`` linking them.

    ``confusion.png`` is drawn from the test confusion matrix and ``history.png`` from the training
    history, each only when that data is present.

    Args:
        run_dir: the run directory.
        metrics: the run's metrics dict in the ``metrics.json`` layout.

    Returns:
        ``{"confusion": ..., "history": ..., "report": ...}`` for the files actually written.
    """
    run_dir = Path(run_dir)
    written: dict[str, Path] = {}
    test, run = section(metrics, "test"), section(metrics, "run")
    classes = run.get("classes") or list(test.get("per_class") or {})
    if test.get("confusion") and classes:
        title = "test set"
        if test.get("accuracy") is not None:
            title = f"test accuracy {100.0 * test['accuracy']:.1f}%"
        if run.get("method"):
            title = f"{run['method']} — {title}"
        written["confusion"] = plot_confusion(test["confusion"], classes, run_dir / CONFUSION_PNG, title=title)
    history = section(metrics, "train").get("history")
    if history:
        written["history"] = plot_history(history, run_dir / HISTORY_PNG)
    written["report"] = write_report(run_dir, metrics)
    return written
