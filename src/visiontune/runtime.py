"""What the training loop, evaluation, inference, serving and ExPLoRA share: the device, autocast,
seeding, data loaders and the learning-rate schedule.

These sit below data, backbones and methods so that every higher layer can use them without importing
the training loop (:mod:`visiontune.train.loop`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import random
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from visiontune.errors import ConfigError
from visiontune.precisions import INFERENCE_PRECISIONS


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device {name!r} is not a device torch knows; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name!r} but no CUDA device is available; use run.device=cpu or auto")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``optim.precision`` (None = full fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def inference_dtype(precision: str, run_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype to predict or evaluate a run in: ``run`` = the run's own ``optim.precision``
    (:func:`autocast_dtype`: fp32 on a CPU), ``fp32``, or ``bf16``.

    bf16 evaluation kept the test accuracy and agreed with fp32 on 99 % of the images while being 2.4x faster on
    an AMX CPU and 1.8x on an AVX-512 BF16 one (``benchmarks/RESULTS.md``, "bf16 on this CPU"); a CPU with
    neither emulates bf16, many times slower, so that case is warned about.

    Raises:
        ConfigError: an unknown precision.
    """
    if precision not in INFERENCE_PRECISIONS:
        raise ConfigError(f"precision {precision!r} is invalid; use one of {', '.join(INFERENCE_PRECISIONS)}")
    if precision == "run":
        return autocast_dtype(run_precision, device)
    if precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        import warnings

        warnings.warn("this CPU has no native bf16 (neither AVX-512 BF16 nor AMX): bf16 is emulated and much slower "
                      "than fp32 here; use --precision fp32", stacklevel=2)
    return None if precision == "fp32" else torch.bfloat16


def precision_report(setting: str, device: torch.device, amp: torch.dtype | None) -> dict[str, Any]:
    """Which precision a run computed in and which kernels that meant (recorded in ``metrics.json``):
    the setting, the autocast dtype used, and on a CPU the vector ISA torch dispatches to and whether
    oneDNN has native bf16 (AVX-512 BF16 or AMX) rather than emulating it.

    On a CPU, ``auto`` still means fp32: bf16 autocast measured 1.8x faster for LoRA evaluation and
    training steps on this project's AVX-512 BF16 machine (no AMX), with equal accuracy when evaluating,
    but a run trained in bf16 lost 2.1 accuracy points in the one seed measured, and on an AMX machine bf16
    training steps were no faster (1.04x) while evaluation was 2.4x (``benchmarks/RESULTS.md``, "bf16 on this
    CPU"); ``optim.precision=bf16`` opts in, and ``--precision bf16`` evaluates or predicts in bf16.
    """
    out: dict[str, Any] = {"setting": setting, "used": "fp32" if amp is None else str(amp).removeprefix("torch.")}
    if device.type == "cpu":
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        out["onednn_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    elif device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, shuffle: bool, seed: int, workers: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=workers,
        persistent_workers=workers > 0, drop_last=False,
    )


def batches(loader: DataLoader, desc: str, progress: bool) -> Iterator[Any]:
    """Iterate ``loader`` under a tqdm bar (shown only when ``progress``)."""
    return iter(tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_ratio: float) -> LambdaLR:
    """Scale every group's lr linearly from ~0 to its peak over ``warmup_steps``, then cosine to ``min_ratio``.

    A multiplicative schedule keeps the head/body lr ratio constant through training, which an
    absolute ``lr_min`` (timm's CosineLRScheduler) would not.
    """
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def train_mode(model: torch.nn.Module) -> None:
    """``model.train()``, except that BatchNorm layers whose affine parameters are frozen keep their running statistics.

    A frozen CNN backbone under LoRA/DoRA/Mona (or a linear head) has BatchNorm layers nothing trains; in train mode
    they would normalise with the statistics of each small batch and overwrite the ImageNet running statistics, so
    the features the probe head was fitted on drift while the adapters learn (measured: LoRA conv r8 on
    EfficientNet-Lite0, flowers 10/class, ended at 34.7 % test against the probe's 52.7 %). As detectron2 and
    timm's ``freeze_batch_norm_2d`` do for frozen backbones, such layers stay in eval mode. BatchNorm layers that
    train (full fine-tuning, from scratch, BitFit's biases) train as usual.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def optimizer_step(
    optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, params: Any, clip_grad: float | None
) -> None:
    """One optimizer step after accumulated backward passes: unscale (fp16), clip, step, zero, schedule.

    The training loop (:func:`visiontune.train.loop.train_one_epoch`) ends every accumulation group with it.
    """
    if scaler:
        scaler.unscale_(optimizer)
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (unchanged when None or 0) inside, restored on leaving."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and its feature flags from ``/proc/cpuinfo`` (the platform's name and no flags where
    there is no such file): the one reader of it, for exports, benchmarks, ``doctor`` and the demo."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return model, flags
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    model = found.group(1).strip() if found else model
    found = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    return model, set(found.group(1).split()) if found else set()


def cpu_info() -> dict[str, Any]:
    """The CPU and the vector extensions that decide which integer / bf16 kernels run (recorded with exports
    and benchmarks): VNNI (``avx512_vnni`` / ``avx_vnni``) is what makes INT8 matrix products fast on x86."""
    model, flags = cpu_model_and_flags()
    info: dict[str, Any] = {"cpu": model, "isa": [f for f in _ISA if f in flags], "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
                            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                            "torch": torch.__version__.split("+")[0], "torch_threads": torch.get_num_threads()}
    if importlib.util.find_spec("onnxruntime") is not None:
        info["onnxruntime"] = importlib.metadata.version("onnxruntime")  # not imported: that takes a second
    return info
