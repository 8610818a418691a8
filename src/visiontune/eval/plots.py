"""PNG plots for run reports: confusion matrix, training curves, method comparison.

Figures are built on ``matplotlib.figure.Figure`` directly instead of ``pyplot``: that renders with the
Agg canvas without touching the global backend (so importing visiontune never changes a notebook's
backend, and no display is needed) and keeps no figure alive in pyplot's registry.
matplotlib is imported inside the functions because it costs ~0.5 s and most callers never plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from visiontune.atomic import atomic_write
from visiontune.eval.summary import summarize_run

_MAX_LABEL_CHARS = 18


def _short(label: str) -> str:
    """Shortens a long tick label in the middle, because class names often differ only at the end."""
    label = str(label)
    if len(label) <= _MAX_LABEL_CHARS:
        return label
    head = (_MAX_LABEL_CHARS - 1) // 2
    return label[:head] + "…" + label[-(_MAX_LABEL_CHARS - 1 - head):]


def _save(fig, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_confusion(
    confusion: Sequence[Sequence[int]], classes: list[str], path: str | Path, title: str = ""
) -> Path:
    """Draws a confusion matrix with colours normalised per true class and the raw counts written in.

    Row normalisation makes a rare class's errors as visible as a common one's; the counts keep the
    absolute numbers. Figure and font sizes scale with the number of classes, and tick labels rotate
    when they would collide, so 2 to ~20 classes stay readable.

    Args:
        confusion: square matrix, rows = true class, columns = predicted class (as ``compute_metrics``).
        classes: class names in index order.
        path: output PNG file; parent folders are created.
        title: optional figure title.

    Returns:
        The written path.

    Raises:
        ValueError: if the matrix is not square or does not match the number of classes.
    """
    from matplotlib.figure import Figure

    cm = np.asarray(confusion, dtype=np.int64)
    n = len(classes)
    if cm.ndim != 2 or cm.shape != (n, n):
        raise ValueError(f"confusion must be a {n}x{n} matrix for {n} classes, got shape {cm.shape}")
    row_sums = cm.sum(axis=1, keepdims=True)
    # A class with no samples gets an all-zero (white) row instead of a division by zero.
    normalised = np.divide(cm, row_sums, out=np.zeros(cm.shape, dtype=float), where=row_sums > 0)

    side = max(4.0, 0.55 * n + 2.5)
    # Cells keep a roughly constant size in inches as the figure grows, so the font can too.
    font = 10.0 if n <= 8 else 8.5
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.set_label("fraction of true class")

    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=font,
                # Zeros in grey keep the eye on the cells that hold samples.
                color="white" if normalised[i, j] > 0.6 else "black" if cm[i, j] else "0.6",
            )

    labels = [_short(c) for c in classes]
    rotate = n > 6 or max(len(label) for label in labels) > 4
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=45 if rotate else 0, ha="right" if rotate else "center", fontsize=font)
    ax.set_yticklabels(labels, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_history(history: list[dict], path: str | Path) -> Path:
    """Plots training loss, validation accuracy (if recorded) and learning rate against epoch.

    Args:
        history: one dict per epoch with ``"epoch"``, ``"train_loss"``, optional ``"val_accuracy"``
            (a fraction in 0..1) and ``"lr"``.
        path: output PNG file; parent folders are created.

    Returns:
        The written path.

    Raises:
        ValueError: if ``history`` is empty or an entry lacks ``"epoch"``/``"train_loss"``.
    """
    from matplotlib.figure import Figure

    if not history:
        raise ValueError("history is empty: nothing to plot (did training run for at least one epoch?)")
    for k, item in enumerate(history):
        missing = [key for key in ("epoch", "train_loss") if item.get(key) is None]
        if missing:
            raise ValueError(f"history[{k}] lacks {missing}; every entry needs 'epoch' and 'train_loss': {item}")

    epochs = [item["epoch"] for item in history]
    val = [(item["epoch"], item["val_accuracy"]) for item in history if item.get("val_accuracy") is not None]
    lr = [(item["epoch"], item["lr"]) for item in history if item.get("lr") is not None]
    panels = 1 + bool(val) + bool(lr)

    fig = Figure(figsize=(4.2 * panels, 3.3))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    ax.plot(epochs, [item["train_loss"] for item in history], marker="o", markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    k = 1
    if val:
        ax = axes[k]
        xs, ys = zip(*val)
        pct = [100.0 * y for y in ys]
        ax.plot(xs, pct, marker="o", markersize=3, color="tab:green")
        best = int(np.argmax(pct))
        ax.plot([xs[best]], [pct[best]], marker="*", markersize=12, color="tab:red", linestyle="none",
                label=f"best {pct[best]:.1f}% (epoch {xs[best]})")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val accuracy (%)")
        ax.set_title("validation accuracy")
        ax.grid(alpha=0.3)
        k += 1
    if lr:
        ax = axes[k]
        xs, ys = zip(*lr)
        ax.plot(xs, ys, marker="o", markersize=3, color="tab:orange")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_xlabel("epoch")
        ax.set_ylabel("learning rate")
        ax.set_title("learning rate")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_comparison(rows: list[dict], path: str | Path) -> Path:
    """Scatter of test accuracy against trainable parameters (log scale), one labelled point per run.

    Args:
        rows: runs' metrics dicts in the ``metrics.json`` layout (e.g. from ``load_run_metrics``).
        path: output PNG file; parent folders are created.

    Returns:
        The written path.

    Raises:
        ValueError: if no row has both a trainable-parameter count and a test accuracy.
    """
    from matplotlib.figure import Figure

    summaries = [summarize_run(row) for row in rows]
    for s in summaries:
        s["method"] = s["method"] or s["name"] or "run"
    points = [s for s in summaries if s["trainable"] and s["test_accuracy"] is not None]
    if not points:
        raise ValueError(
            f"none of the {len(rows)} runs has both params.trainable > 0 and test.accuracy; "
            "pass metrics dicts as written to metrics.json"
        )
    several_backbones = len({s["backbone"] for s in points}) > 1
    methods = list(dict.fromkeys(s["method"] for s in points))
    palette = [f"C{i % 10}" for i in range(len(methods))]
    colour = dict(zip(methods, palette))

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for method in methods:
        mine = [s for s in points if s["method"] == method]
        ax.scatter([s["trainable"] for s in mine], [100.0 * s["test_accuracy"] for s in mine],
                   color=colour[method], label=method, s=40, zorder=3)
    for s in points:
        label = f"{s['method']} / {s['backbone']}" if several_backbones else str(s["method"])
        ax.annotate(label, (s["trainable"], 100.0 * s["test_accuracy"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)  # room for the labels of points at the edges
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs trainable parameters")
    ax.grid(alpha=0.3, which="both")
    if len(methods) > 1:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)
