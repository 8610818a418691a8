"""``visiontune bench-infer``: latency and throughput of a run on every available backend, side by side.

Variants, all on the same run: PyTorch with the adapters merged, PyTorch as trained (adapters kept
separate, eager fp32: the baseline, what a hand-written timm + peft loop evaluates), and with
each installed export backend (onnxruntime, OpenVINO, ...: the registry's) its fp32 and INT8 exports (the
run's ``export/`` when it holds them, else exported for the benchmark into a temporary folder, without the
accuracy check).

For each batch size it times two things: the bare forward pass on a random preprocessed batch, and the
whole predictor on in-memory RGB images of twice the input size (resize + crop + normalise + forward +
soft-max + top-k, i.e. what a caller waits for). Batch 1 is the latency; larger batches give
throughput. Timing reuses the adaptive loop of :mod:`visiontune.eval.speed` (warm-up, then repeat
for at least ``min_time_s`` or ``iters`` passes). With ``rounds`` > 1 the variants take turns
(round 1: every variant, round 2: every variant, ...) and each figure is the median over rounds, so
a burst of load from another process hits every variant alike rather than one of them.

Written by hand: the comparison is specific to visiontune's runs and exports.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from visiontune.data.bands import transform_channels
from visiontune.errors import ConfigError
from visiontune.runtime import autocast_dtype, inference_dtype, resolve_device
from visiontune.eval.speed import _synchronizer, _timed_runs
from visiontune.infer.backends import ExportBackend, all_backends, export_flags, get_backend
from visiontune.infer.export import export_run
from visiontune.infer.predictor import Predictor
from visiontune.runs import load_run

BASELINE = "unmerged"


def _rate(durations: list[float], batch: int) -> tuple[float, float]:
    """(median ms per batch, images per second) of timed passes."""
    return 1000.0 * statistics.median(durations), batch * len(durations) / sum(durations)


def _exports(
    backend: ExportBackend, run_dir: Path, export: str | Path | None, stack: ExitStack, progress: bool,
) -> tuple[dict[str, Path], str]:
    """``{"fp32": folder, "int8": folder}`` of ``backend``'s exports to benchmark, and where they came from."""
    folder = Path(export) if export is not None else run_dir / "export"
    found = {p: folder for p, name in zip(("fp32", "int8"), backend.files) if (folder / name).is_file()}
    if export is not None:
        return found, f"exports in {folder}"
    if len(found) == 2:
        return found, f"the run's exports in {folder}"

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vt-bench-")))
    if progress:
        print(f"bench-infer: no {backend.format} fp32 + INT8 export in {folder}; exporting both for the benchmark (no "
              f"accuracy check; `visiontune export RUN{export_flags(backend, True)}` measures it)", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_run(run_dir, out=tmp / backend.files[0], fmt=backend.format, int8=True, check=False)
    return {"fp32": tmp, "int8": tmp}, (f"{backend.format} exported for this benchmark (fp32 + INT8, calibrated on the "
                                        "run's training images)")


def bench_infer(
    run_dir: str | Path, batch_sizes: Sequence[int] = (1, 32), iters: int | None = None, min_time_s: float = 1.0,
    device: str = "cpu", warmup: int = 2, backends: Sequence[str] | None = None, export: str | Path | None = None,
    rounds: int = 1, progress: bool = False, bf16: bool = False,
) -> list[dict[str, Any]]:
    """Time a run's predictor on each backend and precision at each batch size.

    Args:
        run_dir: a finished run directory.
        batch_sizes: batch sizes to time; 1 is the latency.
        iters: fixed timed passes per measurement; None repeats for ``min_time_s`` seconds.
        min_time_s: duration of each adaptive measurement.
        device: where the PyTorch model runs (export backends run on the CPU).
        warmup: untimed passes before each measurement.
        backends: registered inference backends (``torch``, ``onnxruntime``, ``openvino``; default: every one
            installed).
        export: a folder with the run's exports (default: ``<run>/export``; a backend whose fp32 and INT8
            models are not both there gets them exported into a temporary folder).
        rounds: measurements per variant, taken in turns; figures are medians over rounds.
        progress: say what is being exported.
        bf16: also time the PyTorch model (merged when it merges) under bf16 autocast (variant ``... bf16``;
            ``--precision bf16`` of predict / eval / serve).

    Returns:
        One row per (variant, batch size): ``variant`` (``merged`` / ``unmerged`` / ``as trained`` for
        torch methods with nothing to merge, ``<backend> fp32`` / ``<backend> int8`` for export backends), ``backend``,
        ``precision``, ``batch``, ``forward_ms``, ``forward_img_s``, ``predictor_ms``, ``predictor_img_s``,
        ``iters``, ``speedup`` (forward img/s over the baseline's: the torch model as trained), ``source``.
    """
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise ConfigError(f"batch sizes {list(batch_sizes)} are invalid; give integers >= 1, e.g. 1,32")
    if iters is not None and iters < 1:
        raise ConfigError(f"iters={iters} is invalid; use an integer >= 1 (or leave it out for timed runs)")
    if rounds < 1:
        raise ConfigError(f"rounds={rounds} is invalid; use an integer >= 1")
    if not (math.isfinite(min_time_s) and min_time_s > 0):  # nan would time nothing, inf would never stop
        raise ConfigError(f"--min-time {min_time_s!r} is invalid; use a number of seconds above zero, e.g. 1")
    chosen = [b for b in all_backends() if b.available()] if backends is None else [get_backend(b) for b in backends]
    for b in chosen:
        b.require()
    dev = resolve_device(device)
    run = load_run(run_dir, device=str(dev), merge=False)
    merged = run.method.merge(run.model)
    torch_variants = [("merged", merged), ("unmerged", run.model)] if merged is not run.model else [("as trained", run.model)]
    amp = autocast_dtype(run.config.optim.precision, dev)
    torch_variants = [(name, model, amp) for name, model in torch_variants]
    if bf16:
        torch_variants.insert(1, (f"{torch_variants[0][0]} bf16", torch_variants[0][1], inference_dtype("bf16", "fp32", dev)))
    predictors: list[tuple[str, Predictor, str]] = []
    if any(not b.exports for b in chosen):
        for name, model, dtype in torch_variants:
            predictors.append((name, Predictor(model, run.classes, run.transform, device=dev, batch_size=max(sizes), amp=dtype,
                                               merged=name.startswith("merged"), run_dir=run.run_dir,
                                               method=run.config.method.name),
                               "the run (PyTorch, eager)"))
    with ExitStack() as stack:
        exporting = [b for b in chosen if isinstance(b, ExportBackend)]
        for backend in exporting:
            found, source = _exports(backend, Path(run_dir), export, stack, progress)
            if not found and (backends is not None or len(exporting) == 1):
                raise ConfigError(f"--export {str(export)!r} holds neither {' nor '.join(backend.files)}; pass the "
                                  f"folder `visiontune export{export_flags(backend)}` wrote")
            for precision, where in found.items():
                pred = Predictor.from_export(where, int8=precision == "int8", batch_size=max(sizes), backend=backend)
                predictors.append((f"{backend.name} {precision}", pred, source))
        rng = np.random.default_rng(0)
        timings: dict[tuple[str, int], list[tuple[list[float], list[float]]]] = {}
        for _ in range(rounds):
            for b in sizes:
                for name, pred, _src in predictors:
                    c, h, w = pred.input_size
                    dev_b = pred.device
                    sync = _synchronizer(dev_b)
                    x = torch.randn(b, c, h, w, device=dev_b)
                    fwd = _timed_runs(lambda p=pred, x=x: p.probabilities(x), sync, warmup, iters, min_time_s)
                    bands = transform_channels(pred.transform)  # a multi-band run reads HxWxC arrays, not photos
                    images = [rng.integers(0, 256, (2 * h, 2 * w, bands), dtype=np.uint16) if bands else
                              Image.fromarray(rng.integers(0, 256, (2 * h, 2 * w, 3), dtype=np.uint8)) for _ in range(b)]
                    full = _timed_runs(lambda p=pred, ims=images: p(ims), sync, warmup, iters, min_time_s)
                    timings.setdefault((name, b), []).append((fwd, full))
    rows = []
    for name, pred, src in predictors:
        for b in sizes:
            per_round = [(_rate(f, b), _rate(p, b), min(len(f), len(p))) for f, p in timings[(name, b)]]
            rows.append({
                "variant": name, "backend": pred.backend, "precision": pred.precision, "batch": b,
                "forward_ms": statistics.median(r[0][0] for r in per_round),
                "forward_img_s": statistics.median(r[0][1] for r in per_round),
                "predictor_ms": statistics.median(r[1][0] for r in per_round),
                "predictor_img_s": statistics.median(r[1][1] for r in per_round),
                "iters": min(r[2] for r in per_round), "rounds": rounds, "device": str(pred.device),
                "threads": torch.get_num_threads(), "source": src,
            })
    base_name = BASELINE if any(r["variant"] == BASELINE for r in rows) else "as trained"
    base = {r["batch"]: r for r in rows if r["variant"] == base_name}
    for r in rows:
        r["speedup"] = r["forward_img_s"] / base[r["batch"]]["forward_img_s"] if r["batch"] in base else None
    return rows


def format_bench(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`bench_infer` rows with each variant's speed over the baseline's."""
    lines = [
        "| model | batch | forward ms/batch | forward img/s | x baseline | predictor ms/batch | predictor img/s |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['speedup']:.2f}x" if r.get("speedup") is not None else "n/a"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['forward_ms']:.2f} | {r['forward_img_s']:.1f} | {ratio} | "
                     f"{r['predictor_ms']:.2f} | {r['predictor_img_s']:.1f} |")
    by = {(r["variant"], r["batch"]): r for r in rows}
    notes = []
    for (variant, b), r in by.items():
        if variant == "merged" and ("unmerged", b) in by:
            u = by[("unmerged", b)]
            notes.append(f"batch {b}: merged forward {u['forward_ms'] / r['forward_ms']:.2f}x the speed of unmerged")
    variants = {r["variant"] for r in rows}
    if "as trained" in variants:
        notes.append("this method has nothing to merge (linear, full, Mona ...): one PyTorch variant, also the baseline")
    if rows:
        base = "unmerged" if "unmerged" in variants else "as trained" if "as trained" in variants else None
        if base:
            notes.append(f"x baseline = forward img/s over the PyTorch model as trained ({base}: eager fp32, adapters "
                         "unmerged), the model a hand-written timm + peft loop evaluates")
        if any(v.endswith(" bf16") for v in variants):
            notes.append("... bf16 = the same PyTorch model under bf16 autocast (predict / eval / serve --precision bf16)")
        by_backend: dict[str, set[str]] = {}
        for r in rows:
            if r["device"] == "cpu" and r["source"] != "the run (PyTorch, eager)":
                by_backend.setdefault(r["backend"], set()).add(r["source"])
        for backend, sources in by_backend.items():
            notes.append(f"{backend} models: {'; '.join(sorted(sources))}")
        rounds = rows[0].get("rounds", 1)
        notes.append("ms/batch is the median pass; img/s is all images over all passes' time"
                     + (f"; medians over {rounds} alternating rounds" if rounds > 1 else "")
                     + f"; device {rows[0]['device']}, {rows[0]['threads']} threads")
    return "\n".join(lines + [""] + notes)
