"""``visiontune bench-infer``: latency and throughput of a run's predictor, merged vs unmerged.

For each batch size it times two things on the same model: the bare forward pass on a random
preprocessed batch (what merging changes), and the whole predictor on in-memory RGB images of twice
the input size (resize + crop + normalise + forward + soft-max + top-k, i.e. what a caller waits for).
Batch 1 is the latency; larger batches give throughput. Timing reuses the adaptive loop of
:mod:`visiontune.eval.speed` (warm-up, then repeat for at least ``min_time_s`` or ``iters`` passes).

Written by hand: the comparison (merged vs adapters kept separate) is specific to visiontune's runs.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from visiontune.errors import ConfigError


def _rate(durations: list[float], batch: int) -> tuple[float, float]:
    """(median ms per batch, images per second) of timed passes."""
    return 1000.0 * statistics.median(durations), batch * len(durations) / sum(durations)


def bench_infer(
    run_dir: str | Path, batch_sizes: Sequence[int] = (1, 32), iters: int | None = None, min_time_s: float = 1.0,
    device: str = "cpu", warmup: int = 2,
) -> list[dict[str, Any]]:
    """Time a run's predictor (merged and unmerged) at each batch size.

    Args:
        run_dir: a finished run directory.
        batch_sizes: batch sizes to time; 1 is the latency.
        iters: fixed timed passes per measurement; None repeats for ``min_time_s`` seconds.
        min_time_s: duration of each adaptive measurement.
        device: where the model runs.
        warmup: untimed passes before each measurement.

    Returns:
        One row per (variant, batch size): ``variant`` (``merged`` / ``unmerged`` / ``as trained`` for
        methods with nothing to merge), ``batch``, ``forward_ms``, ``forward_img_s``, ``predictor_ms``,
        ``predictor_img_s``, ``iters``.
    """
    from visiontune.eval.speed import _synchronizer, _timed_runs
    from visiontune.infer.predictor import Predictor
    from visiontune.runs import load_run
    from visiontune.train.loop import autocast_dtype, resolve_device

    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise ConfigError(f"batch sizes {list(batch_sizes)} are invalid; give integers >= 1, e.g. 1,32")
    if iters is not None and iters < 1:
        raise ConfigError(f"iters={iters} is invalid; use an integer >= 1 (or leave it out for timed runs)")
    dev = resolve_device(device)
    run = load_run(run_dir, device=str(dev), merge=False)
    merged = run.method.merge(run.model)
    variants = [("merged", merged), ("unmerged", run.model)] if merged is not run.model else [("as trained", run.model)]
    amp = autocast_dtype(run.config.optim.precision, dev)
    sync = _synchronizer(dev)
    rng = np.random.default_rng(0)
    rows = []
    for name, model in variants:
        pred = Predictor(model, run.classes, run.transform, device=dev, batch_size=max(sizes), amp=amp,
                         merged=name == "merged", run_dir=run.run_dir, method=run.config.method.name)
        c, h, w = pred.input_size
        for b in sizes:
            x = torch.randn(b, c, h, w, device=dev)
            fwd = _timed_runs(lambda p=pred, x=x: p.probabilities(x), sync, warmup, iters, min_time_s)
            images = [Image.fromarray(rng.integers(0, 256, (2 * h, 2 * w, 3), dtype=np.uint8)) for _ in range(b)]
            full = _timed_runs(lambda p=pred, ims=images: p(ims), sync, warmup, iters, min_time_s)
            f_ms, f_rate = _rate(fwd, b)
            p_ms, p_rate = _rate(full, b)
            rows.append({"variant": name, "batch": b, "forward_ms": f_ms, "forward_img_s": f_rate,
                         "predictor_ms": p_ms, "predictor_img_s": p_rate, "iters": min(len(fwd), len(full)),
                         "device": str(dev), "threads": torch.get_num_threads()})
    return rows


def format_bench(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`bench_infer` rows, plus the merged/unmerged ratio when both exist."""
    lines = [
        "| model | batch | forward ms/batch | forward img/s | predictor ms/batch | predictor img/s |",
        "|:---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['batch']} | {r['forward_ms']:.2f} | {r['forward_img_s']:.1f} | "
                     f"{r['predictor_ms']:.2f} | {r['predictor_img_s']:.1f} |")
    by = {(r["variant"], r["batch"]): r for r in rows}
    notes = []
    for (variant, b), r in by.items():
        if variant == "merged" and ("unmerged", b) in by:
            u = by[("unmerged", b)]
            notes.append(f"batch {b}: merged forward {u['forward_ms'] / r['forward_ms']:.2f}x the speed of unmerged")
    if rows and rows[0]["variant"] == "as trained":
        notes.append("this method has nothing to merge (linear, full, Mona ...): one variant")
    if rows:
        notes.append(f"ms/batch is the median pass; img/s is all images over all passes' time; "
                     f"device {rows[0]['device']}, {rows[0]['threads']} threads")
    return "\n".join(lines + [""] + notes)
