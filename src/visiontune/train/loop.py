"""The training loop: flat functions returning metrics dicts (the timm ``train.py`` / nanoGPT habit).

``train(cfg)`` runs data -> backbone -> method -> fit -> evaluate -> report and writes the run
directory. Methods plug in through :class:`visiontune.methods.Method`; nothing here knows about a
particular method beyond the interface (``feature_cache`` selects the cached-features path).

There is one loop for one process and for many (``torchrun`` / ``accelerate launch``, DDP or FSDP):
:func:`train_one_epoch` (the steps of an epoch) inside :func:`_fit_loop` (the epochs), which reads
set-up (:func:`_set_up_fit`), the loop, and checkpointing (:mod:`visiontune.train.checkpointing`). What
differs between one process, DDP and FSDP is the strategy object the loop is handed
(:mod:`visiontune.train.strategy`); the run start-up (processes, run directory) is
:func:`visiontune.train.strategy.launch` and :func:`visiontune.rundir.start_run`, shared with ``pretrain``.

Why this module is longer than ~500 lines: ``train()``, the epoch loop, the step loop and the head's start
(LP-FT) stay together because tests and ``visiontune auto`` replace ``train_one_epoch``, ``optimizer_step``,
``_fit_loop``, ``_fit_cached`` and ``_view_features`` on this module to observe or interrupt a run; everything
else moved out (evaluation passes: :mod:`~visiontune.train.evaluation`; checkpoints:
:mod:`~visiontune.train.checkpointing`; processes: :mod:`~visiontune.train.strategy`; run directories:
:mod:`visiontune.rundir` / :mod:`visiontune.runs`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from visiontune.config import Config
from visiontune.errors import ConfigError, TrainingPaused, TrainingStopped
from visiontune.methods import Method
from visiontune.methods.base import class_weights
from visiontune.registry import METHODS
from visiontune.runtime import (
    autocast, autocast_dtype, batches as _batches, make_loader, optimizer_step, precision_report, resolve_device,
    seed_everything, torch_threads, train_mode, warmup_cosine,
)
from visiontune.train.tblog import ScalarLogger, require_tensorboard
from visiontune.atomic import write_json_atomic
from visiontune.backbones import backbone_identity, build_transform, input_size
from visiontune.checkpoint import checkpoint_path, load_checkpoint
from visiontune.data import describe_splits, load_records, make_splits
from visiontune.data.cache import image_dataset
from visiontune.data.splits import split_identity
from visiontune.eval import PeakMemory, count_parameters, measure_speed
from visiontune.eval.metrics import load_metric_functions
from visiontune.methods.base import classifier_of
from visiontune.methods.baselines import fit_probe_head
from visiontune.rundir import read_json, start_run
from visiontune.runs import TRAIN_RUNS, build_model, default_run_name, finish_run, with_band_statistics
from visiontune.train.cache import PrefixCache, build_prefix_cache
from visiontune.train.checkpointing import Progress, TrainCheckpoint
from visiontune.train.evaluation import (
    eval_loader as _eval_loader, evaluate_loader, extract_features, predict_logits, view_features as _view_features,
)
from visiontune.train.speed import channels_last_if_convnet, fast_forward, maybe_compile
from visiontune.train.strategy import OneProcess, current_strategy, launch

__all__ = [
    "RunResult", "autocast", "autocast_dtype", "evaluate_loader", "extract_features", "predict_logits", "resolve_config",
    "resolve_device", "score_checkpoint", "train", "train_one_epoch",
]


@dataclass
class RunResult:
    """What :func:`train` returns: the run directory and its metrics (also in ``metrics.json``)."""

    run_dir: Path
    metrics: dict[str, Any]

    @property
    def accuracy(self) -> float:
        return float(self.metrics["test"]["accuracy"])


# ----------------------------------------------------------------------------- the steps of an epoch


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: Config,
    device: torch.device,
    amp: torch.dtype | None,
    desc: str = "train",
    class_weight: torch.Tensor | None = None,
    stop: Callable[[], bool] | None = None,
    strategy: OneProcess | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` with gradient accumulation and clipping; returns {"train_loss", "lr"}.

    The one step loop of every run, in one process or many: ``strategy`` (default: this process's,
    :func:`~visiontune.train.strategy.current_strategy`) says how a batch is read, what its loss is, when gradients
    are averaged over processes and whether any process asked to stop. Under a launcher every process runs the same
    number of micro-batches and the step equals the one-process step up to float rounding.

    Args:
        class_weight: [K] (see :func:`class_weights`) weights each example's loss by its class.
        stop: asked after every optimizer step (under a launcher by every process; any True stops all); when it
            answers True, :class:`~visiontune.errors.TrainingStopped` is raised.
    """
    strategy = strategy or current_strategy(device)
    train_mode(model)
    accum = cfg.optim.grad_accum
    trainable = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    weight = None if class_weight is None else class_weight.to(device)
    total, count = 0.0, 0.0
    optimizer.zero_grad(set_to_none=True)
    n_batches = len(loader)
    for i, batch in enumerate(_batches(loader, desc, cfg.run.progress and strategy.main)):
        x, y, w = strategy.split(batch)
        step = (i + 1) % accum == 0 or i + 1 == n_batches
        with strategy.sync(model, step):
            with autocast(device, amp):
                logits = model(x)
            out = strategy.loss(logits, y, w, weight, cfg.optim.label_smoothing)
            if not out.finite:
                raise FloatingPointError(
                    f"training loss became {out.value} at batch {i}; lower optim.lr (now "
                    f"{optimizer.param_groups[0]['lr']:.2e}) or use optim.precision=fp32"
                )
            # The last group may be shorter than grad_accum: scale by its real length so every step averages.
            group = min(accum, n_batches - (i // accum) * accum)
            scaled = out.loss / group
            (scaler.scale(scaled) if scaler else scaled).backward()
        total += out.value * out.weight
        count += out.weight
        if step:
            optimizer_step(optimizer, scheduler, scaler, trainable, cfg.optim.clip_grad)
            if stop is not None and strategy.any(stop()):
                raise TrainingStopped(f"training stopped by the caller at batch {i + 1} of {n_batches} ({desc})")
    return {"train_loss": total / max(1, count), "lr": optimizer.param_groups[0]["lr"]}


# ----------------------------------------------------------------------------- main entry


def resolve_config(cfg: Config, method: Method, device: torch.device | None = None) -> Config:
    """Fill method-dependent defaults so config.yaml records what actually ran."""
    optim = dataclasses.replace(
        cfg.optim,
        lr=cfg.optim.lr if cfg.optim.lr is not None else method.default_lr,
        head_lr=cfg.optim.head_lr if cfg.optim.head_lr is not None else method.default_head_lr,
    )
    backbone = cfg.backbone if method.pretrained else dataclasses.replace(cfg.backbone, weights="none")
    run = cfg.run
    if run.name is None:
        run = dataclasses.replace(run, name=default_run_name(cfg))
    return dataclasses.replace(cfg, optim=optim, backbone=backbone, run=run)


def train(
    cfg: Config, splits: dict[str, Any] | None = None, stop: Callable[[], bool] | None = None, pause_after: int | None = None,
    head_features: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RunResult:
    """Fine-tune ``cfg.backbone`` on ``cfg.data`` with ``cfg.method``; evaluate; write the run directory.

    Args:
        cfg: the run's configuration.
        splits: explicit ``{"train", "val", "test"}`` :class:`~visiontune.data.ImageRecords` instead of the split
            ``cfg.data`` describes (``visiontune auto`` trains each candidate on cross-validation folds this way).
        stop: asked after every optimizer step of gradient training (under torchrun, every process asks and any
            True stops all); True raises :class:`~visiontune.errors.TrainingStopped` and leaves the last epoch's
            checkpoint in the run directory (``visiontune auto`` stops a fold this way when its budget runs out).
        pause_after: stop gradient training once epoch ``pause_after`` of the ``optim.epochs`` schedule is
            checkpointed, raising :class:`~visiontune.errors.TrainingPaused`; ``run.resume=true`` continues the same
            schedule (the learning-rate curve is the whole run's), and :func:`score_checkpoint` scores the model as
            it stands (``visiontune auto`` compares candidates a third of the way into a fold this way).
        head_features: the pretrained backbone's pooled features and labels of ``splits["train"]`` (clean views, in
            order), already computed by the caller. The LP-FT head (``optim.head_init=probe``) is fitted on them
            instead of a feature pass when that pass would compute the same: the method starts as the backbone
            (:attr:`~visiontune.methods.base.Method.starts_as_backbone`), one view, no validation split, fp32
            (``visiontune auto`` computes every labeled image's features once and shares them with its folds).

    An existing run directory is used only as :meth:`visiontune.rundir.RunKind.prepare` allows (resume a checkpoint of
    the same configuration, replace with ``run.overwrite=true``, ...); a resumed run that is already
    finished returns its stored metrics.

    Returns:
        The run directory and metrics (``metrics.json``; also ``report.md``, ``config.yaml``,
        ``labels.json``, ``adapter.safetensors``, plots and ``checkpoint/``).
    """
    with torch_threads(cfg.run.threads):  # run.threads for this run; the caller's thread count afterwards
        return _train(cfg, splits, stop, pause_after, head_features)


def score_checkpoint(cfg: Config, run_dir: str | Path, records: Any, progress: bool = False) -> dict[str, Any]:
    """Metrics on ``records`` of the model a paused or stopped run's checkpoint holds (its best epoch so far when
    the run validates, else its last), as a resume would rebuild it: the run's backbone and method, the
    checkpoint's trainable state. Nothing in the file is executed (:func:`~visiontune.checkpoint.load_checkpoint`).

    Raises:
        CheckpointError: ``run_dir`` holds no readable checkpoint.
    """
    method: Method = METHODS.get(cfg.method.name)(cfg.method)
    device = resolve_device(cfg.run.device)
    method.device = device
    cfg = resolve_config(cfg, method, device)
    ck = load_checkpoint(checkpoint_path(run_dir), "train")
    classes = list(records.classes)
    model, _ = _build(cfg, method, len(classes), device)
    best = ck.get("best") or {}
    method.load_trainable_state_dict(model, best["state"] if best.get("state") is not None else ck["model"])
    model.eval()
    tf = build_transform(model, train=False)
    loader = _eval_loader(records, tf, cfg, cache=False)
    amp = autocast_dtype(cfg.optim.precision, device)
    return evaluate_loader(fast_forward(method.merge(model)), loader, device, classes, amp, progress)


def _train(
    cfg: Config, splits: dict[str, Any] | None, stop: Callable[[], bool] | None, pause_after: int | None = None,
    head_features: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RunResult:
    method: Method = METHODS.get(cfg.method.name)(cfg.method)
    # Under torchrun / accelerate launch: join the process group; process 0 alone prints and writes.
    strategy, cfg = launch(cfg, cfg.run.parallel)
    device = strategy.device
    method.device = device  # e.g. 4-bit quantization on the GPU the run trains on
    cfg = resolve_config(cfg, method, device)
    if cfg.run.tensorboard:
        require_tensorboard()  # fails before the run directory is touched
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    amp = autocast_dtype(cfg.optim.precision, device)

    if splits is None:
        records = load_records(cfg.data.dataset, root=cfg.data.root, limits=cfg.data.image_limits(), channels=cfg.data.channels)
        splits = make_splits(records, cfg.data)
    cfg = with_band_statistics(cfg, splits["train"])  # multi-band: per-band mean/std of the training split, kept in config.yaml
    classes = list(splits["train"].classes)
    if len(splits["test"]) == 0:
        raise ConfigError("the test split is empty: lower data.train_per_class / data.val_per_class, or add test rows")
    split = split_identity(splits)
    # The run directory's rules (visiontune.rundir): process 0 decides, every process follows; config.yaml written.
    begin = start_run(TRAIN_RUNS, cfg, split, strategy)
    run_dir = begin.run_dir
    if begin.finished is not None:
        return RunResult(run_dir=run_dir, metrics=begin.finished)
    # A fresh start writes into an empty directory; a resumed run keeps what it wrote (the same config up to
    # NEUTRAL_KEYS, checked) and only replaces a file that does not read back.
    writes = strategy.main
    if writes and (begin.checkpoint is None or read_json(run_dir / "labels.json")[1]):
        write_json_atomic(run_dir / "labels.json", classes)
    tb = ScalarLogger(run_dir / "tensorboard" if cfg.run.tensorboard and writes else None)
    if cfg.run.progress:
        print(f"[visiontune] run {run_dir}\n{describe_splits(splits)}")

    model, channels_last = _build(cfg, method, len(classes), device)
    identity = backbone_identity(cfg.backbone)
    params = count_parameters(model)

    # Transforms come from the model: its preprocessing metadata records backbone.img_size (create_backbone).
    eval_tf = build_transform(model, train=False)
    train_tf = build_transform(model, train=True, crop_scale=cfg.data.crop_scale) if cfg.data.augment else eval_tf
    val_loader = strategy.eval_loader(_eval_loader(splits["val"], eval_tf, cfg) if len(splits["val"]) else None)

    start = time.perf_counter()
    history: list[dict[str, Any]] = []
    train_info: dict[str, Any] = {"feature_cache": method.feature_cache, "channels_last": channels_last}
    with PeakMemory(device) as mem:
        if method.feature_cache:
            train_info.update(_fit_cached(method, model, splits, cfg, device, amp, eval_tf, train_tf, val_loader, strategy))
            history = train_info.pop("history")
            best_epoch = len(history)
        else:
            run = _Run(cfg, method, strategy, amp, run_dir, split, begin.checkpoint, start)
            history, best_epoch, loop_info = _fit_loop(run, model, splits, train_tf, eval_tf, val_loader, tb, stop,
                                                       pause_after, head_features)
            train_info.update(loop_info)
    # Merging, the test pass and saving read whole parameters: under FSDP a plain copy.
    model = strategy.unshard(model, method, lambda: _build(cfg, method, len(classes), device)[0])
    # A resumed run reports its whole training time: the earlier segments' (from the checkpoint) plus this one's.
    wall = time.perf_counter() - start + train_info.pop("earlier_wall_time_s", 0.0)

    # Test images are read once: no decoded-image cache, only its gray-aware transform path (same pixels).
    test_loader = strategy.eval_loader(_eval_loader(splits["test"], eval_tf, cfg, cache=False))
    # scikit-learn's metrics take ~1 s to import on a small CPU: a one-off of the process (unless a validation
    # split already needed them), done before the test pass's timer, not counted as evaluation time.
    load_metric_functions()
    eval_start = time.perf_counter()
    infer_model = fast_forward(method.merge(model))
    merge_s = time.perf_counter() - eval_start
    test_metrics = evaluate_loader(infer_model, test_loader, device, classes, amp, cfg.run.progress)
    eval_s = time.perf_counter() - eval_start - merge_s
    tb.log(len(history), {f"test/{k}": test_metrics[k] for k in ("accuracy", "f1_weighted", "f1_macro")})
    tb.close()
    val_metrics = evaluate_loader(infer_model, val_loader, device, classes, amp) if val_loader is not None else None
    size = input_size(model)
    speed = None
    if cfg.run.measure_speed and writes:
        speed = measure_speed(infer_model, (cfg.data.input_bands(), size, size), batch_size=min(32, cfg.optim.eval_batch_size), device=str(device))

    metrics = {
        "run": {
            "name": run_dir.name, "method": method.name, "method_detail": method.describe(),
            "backbone": cfg.backbone.name, "weights": cfg.backbone.weights, "backbone_identity": identity,
            "dataset": cfg.data.dataset, "classes": classes, "train_size": len(splits["train"]),
            "val_size": len(splits["val"]), "test_size": len(splits["test"]), "seed": cfg.run.seed,
            "device": str(device), "img_size": size, "split": split,
            "precision": precision_report(cfg.optim.precision, device, amp), **strategy.report(),
        },
        "params": params,
        "train": {
            "wall_time_s": wall, "epochs": len(history), "best_epoch": best_epoch, "peak_memory_mb": mem.peak_mb,
            "peak_memory_delta_mb": mem.delta_mb, "memory_kind": mem.kind, "history": history, **train_info,
        },
        "method": method.report() if hasattr(method, "report") else {},
        "val": val_metrics,
        "test": test_metrics,
        "speed": speed,
        # One-off merge (like loading a model), then the test pass; throughput excludes the merge.
        "eval_time": {"merge_s": merge_s, "test_s": eval_s, "test_images_per_s": len(splits["test"]) / max(eval_s, 1e-9)},
    }
    if writes:
        finish_run(run_dir, method, model, identity, metrics, plots=cfg.run.plots)
    if cfg.run.progress:
        print(
            f"[visiontune] {method.describe()}: test accuracy {test_metrics['accuracy']:.4f}, weighted F1 "
            f"{test_metrics['f1_weighted']:.4f}, trainable {params['trainable']:,} ({params['trainable_pct']:.2f}%), "
            f"{wall:.1f}s -> {run_dir / 'report.md'}"
        )
    return RunResult(run_dir=run_dir, metrics=metrics)


def _build(cfg: Config, method: Method, num_classes: int, device: torch.device) -> tuple[nn.Module, bool]:
    """The run's model on ``device``, and whether its convolutions were made channels-last."""
    model = build_model(cfg, method, num_classes).to(device)
    return model, channels_last_if_convnet(model)  # speed: NHWC convolutions (visiontune.train.speed)


def _fit_cached(
    method: Method, model: nn.Module, splits: dict[str, Any], cfg: Config, device: torch.device,
    amp: torch.dtype | None, eval_tf: Any, train_tf: Any, val_loader: DataLoader | None, strategy: OneProcess,
) -> dict[str, Any]:
    """Frozen backbone: compute features once per image (and per cached augmented view), fit the head."""

    fast = fast_forward(model)  # same features, last ViT block at the class token only
    views = getattr(method.cfg, "views", 1)
    t0 = time.perf_counter()
    seed_everything(cfg.run.seed, cfg.run.deterministic)  # see _reseed_note
    xs, ys, groups = _view_features(fast, splits["train"], cfg, device, amp, eval_tf, train_tf, views)
    val = extract_features(fast, val_loader, device, amp, False) if val_loader is not None else None
    feat_time = time.perf_counter() - t0
    t1 = time.perf_counter()
    info = method.fit_cached(model, (xs, ys, groups), val, cfg.optim, cfg.run.seed)
    strategy.keep_main_state(method, model)  # every process fitted on the same gathered features: process 0's head
    info.update(feature_time_s=feat_time, head_fit_time_s=time.perf_counter() - t1, cached_views=views)
    return info


# ----------------------------------------------------------------------------- the epochs


@dataclass
class _Run:
    """One run as the fitting functions see it (set by :func:`_train`)."""

    cfg: Config
    method: Method
    strategy: OneProcess
    amp: torch.dtype | None
    run_dir: Path
    split: dict[str, Any] | None
    resume: dict[str, Any] | None
    """A checkpoint loaded (and checked against ``cfg``) by the run's start-up, to continue from."""
    started: float
    """``time.perf_counter()`` when this segment of the run began (for the wall time in checkpoints)."""

    @property
    def device(self) -> torch.device:
        return self.strategy.device


@dataclass
class _Fit:
    """What the epoch loop trains with (:func:`_set_up_fit`)."""

    train_model: nn.Module
    val_model: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader | None
    prefix: PrefixCache | None
    order_rng: torch.Generator
    """The generator that decides the batch order (stored in checkpoints)."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    class_weight: torch.Tensor | None
    info: dict[str, Any]
    head_init: dict[str, Any]
    """How the first segment of the run started the head (kept across resumes)."""


def _set_up_fit(
    run: _Run, model: nn.Module, splits: dict[str, Any], train_tf: Any, eval_tf: Any, val_loader: DataLoader | None,
    head_features: tuple[torch.Tensor, torch.Tensor] | None,
) -> _Fit:
    """Loaders, the head's start (LP-FT), the frozen-prefix cache, the strategy's model, optimizer and schedule."""
    cfg, method, strategy, device, amp = run.cfg, run.method, run.strategy, run.device, run.amp
    if cfg.backbone.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    train_set = image_dataset(splits["train"], train_tf, cfg.data.cache, limits=cfg.data.image_limits())
    train_loader = make_loader(train_set, cfg.optim.batch_size, True, cfg.run.seed, cfg.data.num_workers)
    info: dict[str, Any] = {"head_init": "zero"}
    if cfg.optim.head_init == "probe" and method.pretrained and run.resume is None:
        shared = head_features if method.starts_as_backbone else None
        info = _probe_head_init(model, splits, cfg, device, amp, eval_tf, train_tf, val_loader, shared)
    if run.resume is not None:
        info = dict(run.resume.get("head_init") or info)  # how the first segment started the head
    head_init = dict(info)
    # ---- speed (visiontune.train.cache): blocks below the first trained one run once, not every epoch.
    prefix, info["prefix_cache"] = build_prefix_cache(  # a sharded model (fsdp) has no prefix outside it
        model, "none" if strategy.shards_model else cfg.run.prefix_cache, cfg.run.prefix_views, cfg.data.augment,
        train_set, val_loader, cfg.optim.eval_batch_size, device, lambda: autocast(device, amp), cfg.run.progress,
    )
    train_model = val_model = fast_forward(model)
    if prefix is not None and prefix.train_views is not None:
        train_loader, train_model = prefix.train_loader(cfg.optim.batch_size, cfg.run.seed), prefix.suffix
    if prefix is not None and prefix.val is not None:
        val_loader, val_model = prefix.val_loader(cfg.optim.eval_batch_size), prefix.suffix
    # ---- end speed
    # optim.batch_size is the global batch: under a launcher each process takes its share of the one-process batches.
    train_loader = strategy.train_loader(train_loader, cfg.run.seed)
    val_loader = strategy.eval_loader(val_loader)
    train_model, val_model = strategy.prepare(model, train_model, val_model, info)
    train_model = maybe_compile(train_model, cfg.run.compile)
    order_rng = getattr(train_loader, "order_generator", train_loader.generator)
    groups = method.param_groups(model, cfg.optim.lr, cfg.optim.head_lr, cfg.optim.weight_decay)
    if not groups:
        raise ConfigError(f"method {method.name!r} left no trainable parameters")
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(train_loader) / cfg.optim.grad_accum)
    scheduler = warmup_cosine(
        optimizer, steps_per_epoch * cfg.optim.epochs, round(cfg.optim.warmup_epochs * steps_per_epoch), cfg.optim.min_lr_ratio
    )
    weights = class_weights(splits["train"].labels, len(splits["train"].classes), cfg.optim.class_weights)
    return _Fit(train_model, val_model, train_loader, val_loader, prefix, order_rng, optimizer, scheduler, weights,
                info, head_init)


def _fit_loop(
    run: _Run, model: nn.Module, splits: dict[str, Any], train_tf: Any, eval_tf: Any, val_loader: DataLoader | None,
    tb: ScalarLogger | None = None, stop: Callable[[], bool] | None = None, pause_after: int | None = None,
    head_features: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[list[dict[str, Any]], int, dict[str, Any]]:
    """Gradient training of the trainable parameters, with per-epoch validation, best-epoch selection and resume.

    The one epoch loop of every run (one process, DDP, FSDP): set-up (:func:`_set_up_fit`), then the epochs, each
    checkpointed (:class:`~visiontune.train.checkpointing.TrainCheckpoint`). ``stop`` and ``pause_after``: see
    :func:`train`. Returns (history, best epoch, info).
    """
    cfg, method, strategy, device, amp = run.cfg, run.method, run.strategy, run.device, run.amp
    fit = _set_up_fit(run, model, splits, train_tf, eval_tf, val_loader, head_features)
    info, val_loader = fit.info, fit.val_loader
    ckpt = TrainCheckpoint(run.run_dir, cfg, run.split, fit.head_init, run.started)
    progress = Progress()
    if val_loader is not None and run.resume is None and info.get("head_init") == "probe":
        # Epoch 0 competes too: the probe-initialised head before any fine-tuning. A fine-tune that does not
        # beat it on validation falls back to it, instead of to its least bad epoch.
        vl, vy = predict_logits(fit.val_model, val_loader, device, amp)
        info["epoch0_val_accuracy"] = float((vl.argmax(1) == vy).float().mean())
        progress.best = {
            "score": info["epoch0_val_accuracy"] - 1e-6 * float(F.cross_entropy(vl, vy)),
            "epoch": 0, "state": method.trainable_state_dict(model),
        }
    if run.resume is not None:
        progress = ckpt.restore(run.resume, method, model, fit.optimizer, fit.scheduler, fit.order_rng)
        info.update(resumed_after_epoch=progress.start_epoch - 1, earlier_wall_time_s=progress.earlier_wall)
        if cfg.run.progress:
            print(f"[visiontune] resumed from {ckpt.path} at epoch {progress.start_epoch}")
    info["segments"] = progress.segments
    if run.resume is None:
        # _reseed_note: seed again right before the random augmentations. A module imported lazily since
        # train() seeded can draw from the global RNGs (sklearn imports rich, which calls random.getrandbits),
        # so without this a run's result depended on what the process had imported before it (the first
        # run of a sweep differed from the same run later in the sweep, or in a fresh worker process).
        seed_everything(strategy.rank_seed(cfg.run.seed), cfg.run.deterministic)
    elif not strategy.main:  # the checkpoint holds process 0's random state
        seed_everything(strategy.rank_seed(cfg.run.seed) + progress.start_epoch, cfg.run.deterministic)
    history, best = progress.history, progress.best
    bar = tqdm(range(progress.start_epoch, cfg.optim.epochs + 1), desc="epochs", disable=not cfg.run.progress,
               dynamic_ncols=True)
    for epoch in bar:
        row: dict[str, Any] = {"epoch": epoch}
        if fit.prefix is not None:
            fit.prefix.set_epoch(epoch)
        row.update(train_one_epoch(fit.train_model, fit.train_loader, fit.optimizer, fit.scheduler, cfg, device, amp,
                                   f"epoch {epoch}", fit.class_weight, stop, strategy))
        if val_loader is not None:
            vl, vy = predict_logits(fit.val_model, val_loader, device, amp)
            row["val_accuracy"] = float((vl.argmax(1) == vy).float().mean())
            row["val_loss"] = float(F.cross_entropy(vl, vy))
            # Best epoch: highest val accuracy, ties broken by lower val loss.
            score = row["val_accuracy"] - 1e-6 * row["val_loss"]
            if score > best["score"]:
                best = progress.best = {"score": score, "epoch": epoch, "state": method.trainable_state_dict(model)}
        history.append(row)
        if tb is not None:
            tb.log(epoch, row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", **({"val_acc": f"{row['val_accuracy']:.3f}"} if "val_accuracy" in row else {}))
        ckpt.save(strategy, epoch, progress, method, model, fit.optimizer, fit.scheduler, fit.order_rng)
        if pause_after is not None and epoch == pause_after and epoch < cfg.optim.epochs:
            strategy.barrier()  # the checkpoint is on disk before any process reports the pause
            raise TrainingPaused(f"paused after epoch {epoch} of {cfg.optim.epochs}, as asked", run.run_dir)
    if best["state"] is not None:
        method.load_trainable_state_dict(model, best["state"])
        info["epoch0_is_probe_head"] = info.get("head_init") == "probe"
        return history, int(best["epoch"]), info
    return history, len(history), info


# ----------------------------------------------------------------------------- the head's start


def _probe_head_init(
    model: nn.Module, splits: dict[str, Any], cfg: Config, device: torch.device, amp: torch.dtype | None,
    eval_tf: Any, train_tf: Any, val_loader: DataLoader | None, shared: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """LP-FT: fit the head as a linear probe on the (frozen) starting features.

    Fine-tuning then starts from a good head instead of spending its few-shot budget, and its large
    early gradients, on a random one, which distorts pretrained features (Kumar et al., ICLR 2022).
    With ``optim.head_init_views`` > 1 the probe also sees augmented views of each training image, as the
    fine-tuning that follows does. ``shared``: the starting features of the training images, computed by the
    caller; used instead of a feature pass when there is nothing else to compute (one view, no validation split).
    """

    t0 = time.perf_counter()
    fast = fast_forward(model)
    views = cfg.optim.head_init_views if cfg.data.augment else 1  # without augmentation every view is the clean one
    # The caller's features are fp32 clean views: they stand in for this pass only where it computes the same.
    reuse = (shared is not None and views == 1 and val_loader is None and amp is None
             and len(shared[1]) == len(splits["train"]))
    if reuse:
        x, y = shared
        train = (x, y, np.arange(len(y)))
    else:
        train = _view_features(fast, splits["train"], cfg, device, amp, eval_tf, train_tf, views, "probe head init")
    val = extract_features(fast, val_loader, device, amp) if val_loader is not None else None
    info = fit_probe_head(classifier_of(model), train, val, balanced=cfg.optim.class_weights == "balanced")
    return {"head_init": "probe", "head_init_c": info["c"], "head_init_views": views, "head_init_time_s": time.perf_counter() - t0,
            "head_init_features": "shared" if reuse else "computed"}
