"""Sweep figures: accuracy against trainable parameters and against training time, per-class F1 bars.

Written by hand because they plot the sweep's own grouping (one series per method × target, one point
per rank, error bars = std over seeds): ``visiontune.eval.plot_comparison`` labels every run with its
full name, which piles up unreadably once a grid has a dozen LoRA variants at similar sizes. Here
each series gets one legend entry (outside the axes) and its points only a short rank tag.
Figures use ``matplotlib.figure.Figure`` (Agg, no global backend change), like ``visiontune.eval.plots``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from visiontune.atomic import atomic_write
from visiontune.eval.plots import _short

_MARKERS = "osD^v<>pPX*h"
_TAG_OFFSETS = [(4, 4), (4, -10), (-16, 4), (-16, -10)]


def _save(fig: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_sweep_scatter(groups: Sequence[dict[str, Any]], x_key: str, path: str | Path, xlabel: str, title: str) -> Path:
    """Test accuracy (mean ± std over seeds) against ``x_key`` on a log axis, one line per series.

    Args:
        groups: one dict per configuration with ``series`` (legend label), ``rank`` (or None), ``method``,
            ``acc_mean``/``acc_std`` (fractions) and the ``x_key`` value; configurations of one series
            are joined by a line in x order (e.g. LoRA ranks 8 → 16 → 64).
        x_key: the field plotted on x (``trainable`` or ``time_mean``).
        path: output PNG file.
        xlabel: x-axis label.
        title: figure title.

    Returns:
        The written path.

    Raises:
        ValueError: if no configuration has a positive ``x_key`` value.
    """
    import matplotlib
    from matplotlib.figure import Figure

    points = [g for g in groups if g.get(x_key) and g[x_key] > 0 and g.get("acc_mean") is not None]
    if not points:
        raise ValueError(f"no configuration has a positive {x_key!r} and a test accuracy; nothing to plot")
    series = list(dict.fromkeys(g["series"] for g in points))
    methods = list(dict.fromkeys(g["method"] for g in points))
    cmap = "tab10" if len(series) <= 10 else "tab20"
    fig = Figure(figsize=(8.2, 4.6))
    ax = fig.add_subplot()
    palette = matplotlib.colormaps[cmap]
    colours = [palette(i % palette.N) for i in range(len(series))]
    for i, name in enumerate(series):
        # Joined in rank order (8 -> 16 -> 64), which is x order for parameters but not for time.
        mine = sorted((g for g in points if g["series"] == name),
                      key=lambda g: (g["rank"] if g.get("rank") is not None else 0, g[x_key]))
        xs = [g[x_key] for g in mine]
        ys = [100.0 * g["acc_mean"] for g in mine]
        errs = [100.0 * (g.get("acc_std") or 0.0) for g in mine]
        marker = _MARKERS[methods.index(mine[0]["method"]) % len(_MARKERS)]
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, color=colours[i], marker=marker, markersize=6,
                    linestyle="-" if len(mine) > 1 else "none", linewidth=1.2, capsize=3, label=name, zorder=3)
        for g, x, y in zip(mine, xs, ys):
            if g.get("rank") is not None:
                # Series alternate the side of their tags, so tags of neighbouring series rarely collide.
                ax.annotate(f"r{g['rank']}", (x, y), textcoords="offset points", xytext=_TAG_OFFSETS[i % 4],
                            fontsize=7, color=colours[i])
    probe = [g for g in points if g["method"] == "linear"]
    if probe:
        # The study's reference: what the frozen features give; anything below this line lost to the probe.
        ax.axhline(100.0 * probe[0]["acc_mean"], color="0.4", linestyle="--", linewidth=0.8, zorder=1)
    ax.set_xscale("log")
    if x_key == "time_mean":  # seconds read better as 2, 5, 10, 20 ... than as 2x10^0 minor ticks
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.08, y=0.1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              title="dashed: linear probe" if probe else None, title_fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_per_class_f1(
    classes: list[str], bars: dict[str, tuple[list[float], list[float]]], path: str | Path, title: str = ""
) -> Path:
    """Grouped bars of per-class F1 (mean, with std over seeds as error bars) for a few configurations.

    Args:
        classes: class names in index order.
        bars: label -> (F1 means per class, F1 stds per class); e.g. the best configuration and the probe.
        path: output PNG file.
        title: figure title.

    Returns:
        The written path.
    """
    import numpy as np
    from matplotlib.figure import Figure

    n, k = len(classes), max(1, len(bars))
    width = 0.8 / k
    fig = Figure(figsize=(max(5.0, 0.9 * n * k + 2.0), 3.8))
    ax = fig.add_subplot()
    x = np.arange(n)
    for i, (label, (means, stds)) in enumerate(bars.items()):
        ax.bar(x + (i - (k - 1) / 2) * width, means, width, yerr=stds if any(stds) else None, capsize=3,
               label=label, color=f"C{i}")
    labels = [_short(c) for c in classes]
    rotate = n > 6 or max(len(c) for c in labels) > 8
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("test F1")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return _save(fig, path)
