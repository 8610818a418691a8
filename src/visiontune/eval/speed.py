"""Inference latency and throughput of a model on random input, bounded in wall time.

``measure_speed`` runs at the end of every training run, so it must cost a few seconds even for a ViT on
a 2-core CPU, yet stay meaningful for a tiny model on a GPU. Iteration counts therefore adapt: each timed
phase repeats until it has run for ``min_time_s`` (so fast models get many samples and a stable median,
slow ones a single pass), and warm-up passes stop early once they get expensive.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

# Upper bound on timed iterations per phase, so a trivially cheap model cannot spin for long in Python
# overhead when min_time_s is large.
_MAX_ADAPTIVE_ITERS = 10_000


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for queued kernels on ``device``; timing without it measures only the launch."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def _input_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's weights (fp16/bf16 models need matching input), else float32."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _check_model_device(model: nn.Module, device: torch.device) -> None:
    for param in model.parameters():
        if param.device.type != device.type:
            raise ValueError(
                f"model weights are on {param.device} but measure_speed was asked for device={str(device)!r}; "
                f"move the model first (model.to({str(device)!r})) or pass device={str(param.device)!r}"
            )
        return


def _timed_runs(
    step: Callable[[], object],
    sync: Callable[[], None],
    warmup: int,
    iters: int | None,
    min_time_s: float,
) -> list[float]:
    """Runs ``step`` after warm-up and returns the duration in seconds of each timed call."""
    warm_start = time.perf_counter()
    for _ in range(warmup):
        step()
        sync()
        # One warm-up pass absorbs lazy initialisation; more only pay off while they are cheap.
        if time.perf_counter() - warm_start > 0.5 * min_time_s:
            break

    durations: list[float] = []
    phase_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        step()
        sync()
        durations.append(time.perf_counter() - t0)
        if iters is not None:
            if len(durations) >= iters:
                break
        elif time.perf_counter() - phase_start >= min_time_s or len(durations) >= _MAX_ADAPTIVE_ITERS:
            break
    return durations


def measure_speed(
    model: nn.Module,
    input_size: tuple[int, int, int],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    warmup: int = 2,
    iters: int | None = None,
    min_time_s: float = 1.0,
) -> dict:
    """Measures single-image latency and batched throughput of ``model``'s forward pass.

    The model runs in eval mode under ``torch.inference_mode`` on random input of the model's weight
    dtype; every module's train/eval flag is restored afterwards (not just the root's, so a frozen
    backbone kept in eval mode inside a training model stays that way). The model must already be on
    ``device``.

    Args:
        model: module mapping a ``(B, C, H, W)`` batch to outputs.
        input_size: ``(C, H, W)`` of one image.
        batch_size: batch size of the throughput phase.
        device: device the model lives on; CUDA work is synchronised before each clock read.
        warmup: untimed passes before each phase (cut short once they exceed half of ``min_time_s``).
        iters: fixed number of timed passes per phase; ``None`` repeats each phase until it has run for
            ``min_time_s`` seconds.
        min_time_s: minimum duration of each of the two timed phases when ``iters`` is ``None``.

    Returns:
        ``{"latency_ms"`` (median over batch-1 passes, ms per image), ``"throughput_img_s"`` (images per
        second at ``batch_size``), ``"batch_size"``, ``"device"``, ``"threads"`` (torch intra-op
        threads), ``"input_size"``, ``"dtype"``, ``"latency_iters"``, ``"throughput_iters"}``.

    Raises:
        ValueError: for a malformed ``input_size``, non-positive counts, or a model on another device.
    """
    if len(input_size) != 3 or any(int(s) <= 0 for s in input_size):
        raise ValueError(f"input_size must be (channels, height, width) with positive sizes, got {input_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if iters is not None and iters < 1:
        raise ValueError(f"iters must be >= 1 or None (adaptive), got {iters}")
    if min_time_s <= 0 and iters is None:
        raise ValueError(f"min_time_s must be > 0 when iters is None, got {min_time_s}")

    dev = torch.device(device)
    _check_model_device(model, dev)
    dtype = _input_dtype(model)
    sync = _synchronizer(dev)
    modes = [(module, module.training) for module in model.modules()]
    shape = tuple(int(s) for s in input_size)
    try:
        model.eval()
        with torch.inference_mode():
            single = torch.randn((1, *shape), device=dev, dtype=dtype)
            latency = _timed_runs(partial(model, single), sync, warmup, iters, min_time_s)
            del single
            batch = torch.randn((batch_size, *shape), device=dev, dtype=dtype)
            batched = _timed_runs(partial(model, batch), sync, warmup, iters, min_time_s)
            del batch
    finally:
        for module, was_training in modes:
            module.training = was_training

    return {
        "latency_ms": 1000.0 * statistics.median(latency),
        "throughput_img_s": batch_size * len(batched) / sum(batched),
        "batch_size": batch_size,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "input_size": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "latency_iters": len(latency),
        "throughput_iters": len(batched),
    }
