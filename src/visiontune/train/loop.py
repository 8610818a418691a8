"""The training loop: flat functions returning metrics dicts (the timm ``train.py`` / nanoGPT habit).

``train(cfg)`` runs data -> backbone -> method -> fit -> evaluate -> report and writes the run
directory. Methods plug in through :class:`visiontune.methods.Method`; nothing here knows about a
particular method beyond the interface (``feature_cache`` selects the cached-features path).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import visiontune.distributed as distributed
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
from visiontune.backbones import backbone_identity, build_transform
from visiontune.checkpoint import CheckpointError, checkpoint_path, checkpoint_progress, legacy_message, load_checkpoint, save_checkpoint
from visiontune.data import describe_splits, load_records, make_splits
from visiontune.data.cache import image_dataset
from visiontune.data.splits import split_differences, split_identity
from visiontune.eval import PeakMemory, compute_metrics, count_parameters, measure_speed
from visiontune.eval.metrics import load_metric_functions
from visiontune.methods.base import classifier_of
from visiontune.methods.baselines import fit_probe_head
from visiontune.methods.targets import find_blocks
from visiontune.rundir import (
    RunDirState, claim_run_dir, clear_run_dir, read_json, read_yaml_mapping, refuse_changes, refuse_reuse,
)
from visiontune.runs import (
    METRICS_FILE, build_model, config_changes, finish_run, finished_run_changes, inspect_run, with_band_statistics,
)
from visiontune.train.cache import build_prefix_cache
from visiontune.train.speed import channels_last_if_convnet, fast_forward, maybe_compile


@dataclass
class RunResult:
    """What :func:`train` returns: the run directory and its metrics (also in ``metrics.json``)."""

    run_dir: Path
    metrics: dict[str, Any]

    @property
    def accuracy(self) -> float:
        return float(self.metrics["test"]["accuracy"])


# ----------------------------------------------------------------------------- building blocks


def predict_logits(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: torch.dtype | None = None, progress: bool = False,
    desc: str = "eval",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every batch in ``loader`` (model in eval mode, no augmentation)."""
    was_training = model.training
    model.eval()
    outs, labels = [], []
    with distributed.without_grad(model):
        for x, y in _batches(loader, desc, progress):
            with autocast(device, amp):
                outs.append(model(x.to(device, non_blocking=True)).float().cpu())
            labels.append(y)
    model.train(was_training)
    # Under a launcher each process scored its range of the images (distributed.shard_eval): all of them, once.
    return distributed.gather_in_order(loader, outs, labels)


def evaluate_loader(
    model: nn.Module, loader: DataLoader, device: torch.device, classes: list[str], amp: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics dict (accuracy, F1s, per-class, confusion) of ``model`` on ``loader``."""

    logits, labels = predict_logits(model, loader, device, amp, progress)
    return compute_metrics(labels.numpy(), logits.argmax(1).numpy(), classes)


@torch.inference_mode()
def extract_features(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: torch.dtype | None = None, progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logits features (timm ``forward_head(pre_logits=True)``) and labels for ``loader``."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for x, y in _batches(loader, desc, progress):
        with autocast(device, amp):
            f = model.forward_head(model.forward_features(x.to(device, non_blocking=True)), pre_logits=True)
        feats.append(f.float().cpu())
        labels.append(y)
    model.train(was_training)
    return distributed.gather_in_order(loader, feats, labels)


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
) -> dict[str, float]:
    """One pass over ``loader`` with gradient accumulation and clipping; returns {"train_loss", "lr"}.

    ``class_weight`` ([K], see :func:`class_weights`) weights each example's loss by its class. ``stop`` is asked
    after every optimizer step; when it answers True, :class:`~visiontune.errors.TrainingStopped` is raised.
    """
    train_mode(model)
    accum = cfg.optim.grad_accum
    trainable = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    total, count = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    n_batches = len(loader)
    for i, (x, y) in enumerate(_batches(loader, desc, cfg.run.progress)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x)
        loss = F.cross_entropy(
            logits.float(), y, label_smoothing=cfg.optim.label_smoothing,
            weight=None if class_weight is None else class_weight.to(device),
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss.item()} at batch {i}; lower optim.lr (now {optimizer.param_groups[0]['lr']:.2e}) "
                "or use optim.precision=fp32"
            )
        # The last group may be shorter than grad_accum: scale by its real length so every step averages.
        group = min(accum, n_batches - (i // accum) * accum)
        scaled = loss / group
        (scaler.scale(scaled) if scaler else scaled).backward()
        total += float(loss.detach()) * len(y)
        count += len(y)
        if (i + 1) % accum == 0 or i + 1 == n_batches:
            optimizer_step(optimizer, scheduler, scaler, trainable, cfg.optim.clip_grad)
            if stop is not None and stop():
                raise TrainingStopped(f"training stopped by the caller at batch {i + 1} of {n_batches} ({desc})")
    return {"train_loss": total / max(1, count), "lr": optimizer.param_groups[0]["lr"]}


# ----------------------------------------------------------------------------- run directory


def default_run_name(cfg: Config) -> str:
    ds = Path(cfg.data.dataset).stem if os.sep in cfg.data.dataset else cfg.data.dataset
    return f"{ds}-{cfg.backbone.name}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class RunStart:
    """How :func:`prepare_run_dir` lets a run start: fresh, from a checkpoint, or already finished."""

    run_dir: Path
    checkpoint: dict[str, Any] | None = None
    finished: dict[str, Any] | None = None
    note: str | None = None


def prepare_run_dir(cfg: Config, split: dict[str, Any]) -> RunStart:
    """Decide, by reading only, whether and how this run may use its directory; then empty it if starting fresh.

    The rules are in :mod:`visiontune.rundir`. A resume (from a checkpoint, or of a finished run) is
    refused unless the stored resolved config matches ``cfg`` except :data:`visiontune.runs.NEUTRAL_KEYS`
    and the stored data split matches ``split``. Nothing is written into an existing directory before
    these checks pass; a fresh start then begins from an empty directory (``run.overwrite=true``
    deletes the old one, and says so).

    Args:
        cfg: the resolved config (:func:`resolve_config`).
        split: :func:`visiontune.data.splits.split_identity` of this run's split.

    Raises:
        ConfigError: the directory holds a run this config may not touch, or another configuration.
        CheckpointError: the checkpoint is unreadable, or an old pickle (never loaded).
    """

    run_dir = Path(cfg.run.dir) / (cfg.run.name or default_run_name(cfg))
    state = inspect_run(run_dir)
    progress = checkpoint_progress(state.checkpoint) if state.checkpoint else ""
    refuse_reuse(state, cfg.run.resume, cfg.run.overwrite, "run", progress)
    start = _decide_start(cfg, split, state)
    claim_run_dir(state)  # every check passed: the folder is this run's (marked before anything is written)
    return start


def _decide_start(cfg: Config, split: dict[str, Any], state: RunDirState) -> RunStart:
    run_dir = state.path
    if cfg.run.overwrite:
        return RunStart(run_dir, note=clear_run_dir(state))
    if state.kind == "finished":  # with run.resume=true: nothing left to do if it is the same run
        refuse_changes(finished_run_changes(run_dir, cfg, split), run_dir)
        metrics, _ = read_json(run_dir / METRICS_FILE)
        return RunStart(run_dir, finished=metrics, note=f"{run_dir} is already finished; nothing to resume")
    if state.kind == "partial":  # with run.resume=true
        if state.checkpoint is None:
            raise CheckpointError(legacy_message(state.legacy))
        ck = load_checkpoint(state.checkpoint, "train")
        refuse_changes(config_changes(ck.get("config") or {}, cfg) + split_differences(ck.get("split"), split), run_dir)
        return RunStart(run_dir, checkpoint=ck)
    if state.kind == "started":  # with run.resume=true, but no checkpoint: start over, if it is the same run
        stored, _ = read_yaml_mapping(run_dir / "config.yaml")
        if stored is not None:
            refuse_changes(config_changes(stored, cfg), run_dir)
        return RunStart(run_dir, note=clear_run_dir(state))
    return RunStart(run_dir)


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


# ----------------------------------------------------------------------------- checkpoint


def _rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain data + a byte tensor (what a checkpoint can hold unpickled)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`_rng_state` returned, so a resumed run draws the same numbers as an uninterrupted one."""
    py, npy = state["python"], state["numpy"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss_next"]))
    np.random.set_state((str(npy["name"]), np.asarray(npy["keys"], dtype=np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(state["torch"])


# ----------------------------------------------------------------------------- main entry


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

    An existing run directory is used only as :func:`prepare_run_dir` allows (resume a checkpoint of
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
    tf = build_transform(model, cfg.backbone.img_size, train=False)
    loader = _eval_loader(records, tf, cfg, cache=False)
    amp = autocast_dtype(cfg.optim.precision, device)
    return evaluate_loader(fast_forward(method.merge(model)), loader, device, classes, amp, progress)


def _train(
    cfg: Config, splits: dict[str, Any] | None, stop: Callable[[], bool] | None, pause_after: int | None = None,
    head_features: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RunResult:
    method: Method = METHODS.get(cfg.method.name)(cfg.method)
    # Under torchrun / accelerate launch: join the process group; process 0 alone prints and writes.
    dist = distributed.setup(cfg.run.device, cfg.run.parallel)
    device = dist.device if dist is not None else resolve_device(cfg.run.device)
    if dist is not None and not dist.main:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, progress=False))
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
    if dist is None:
        begin = prepare_run_dir(cfg, split)
    else:  # process 0 checks (and empties) the directory; the others follow its decision
        begin = dist.broadcast(prepare_run_dir(cfg, split) if dist.main else None)
    run_dir = begin.run_dir
    if begin.note and cfg.run.progress:
        print(f"[visiontune] {begin.note}")
    if begin.finished is not None:
        return RunResult(run_dir=run_dir, metrics=begin.finished)
    # A fresh start writes into an empty directory; a resumed run keeps what it wrote (the same config up to
    # NEUTRAL_KEYS, checked) and only replaces a file that does not read back.
    writes = distributed.is_main()
    if writes and (begin.checkpoint is None or read_yaml_mapping(run_dir / "config.yaml")[1]):
        cfg.dump(run_dir / "config.yaml")
    if writes and (begin.checkpoint is None or read_json(run_dir / "labels.json")[1]):
        write_json_atomic(run_dir / "labels.json", classes)
    tb = ScalarLogger(run_dir / "tensorboard" if cfg.run.tensorboard and writes else None)
    if cfg.run.progress:
        print(f"[visiontune] run {run_dir}\n{describe_splits(splits)}")

    model, channels_last = _build(cfg, method, len(classes), device)
    identity = backbone_identity(cfg.backbone)
    params = count_parameters(model)

    eval_tf = build_transform(model, cfg.backbone.img_size, train=False)
    train_tf = build_transform(model, cfg.backbone.img_size, train=True, crop_scale=cfg.data.crop_scale) if cfg.data.augment else eval_tf
    ebs = cfg.optim.eval_batch_size
    val_loader = (
        _eval_loader(splits["val"], eval_tf, cfg) if len(splits["val"]) else None
    )
    val_loader = distributed.shard_eval(val_loader)

    start = time.perf_counter()
    history: list[dict[str, Any]] = []
    train_info: dict[str, Any] = {"feature_cache": method.feature_cache, "channels_last": channels_last}
    with PeakMemory(device) as mem:
        if method.feature_cache:
            train_info.update(_fit_cached(method, model, splits, cfg, device, amp, eval_tf, train_tf, val_loader))
            history = train_info.pop("history")
            best_epoch = len(history)
        else:
            history, best_epoch, loop_info = _fit_loop(
                method, model, splits, cfg, device, amp, train_tf, val_loader, run_dir, tb, begin.checkpoint, split, start,
                stop, pause_after, head_features,
            )
            train_info.update(loop_info)
    if distributed.is_fsdp(model):  # merging, the test pass and saving read whole parameters: a plain copy
        model = _unsharded(model, method, lambda: _build(cfg, method, len(classes), device)[0])
    # A resumed run reports its whole training time: the earlier segments' (from the checkpoint) plus this one's.
    wall = time.perf_counter() - start + train_info.pop("earlier_wall_time_s", 0.0)

    # Test images are read once: no decoded-image cache, only its gray-aware transform path (same pixels).
    test_loader = _eval_loader(splits["test"], eval_tf, cfg, cache=False)
    test_loader = distributed.shard_eval(test_loader)
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
    speed = None
    if cfg.run.measure_speed and writes:
        size = eval_tf_size(model, cfg.backbone.img_size)
        speed = measure_speed(infer_model, (cfg.data.input_bands(), size, size), batch_size=min(32, ebs), device=str(device))

    metrics = {
        "run": {
            "name": run_dir.name, "method": method.name, "method_detail": method.describe(),
            "backbone": cfg.backbone.name, "weights": cfg.backbone.weights, "backbone_identity": identity,
            "dataset": cfg.data.dataset, "classes": classes, "train_size": len(splits["train"]),
            "val_size": len(splits["val"]), "test_size": len(splits["test"]), "seed": cfg.run.seed,
            "device": str(device), "img_size": eval_tf_size(model, cfg.backbone.img_size), "split": split,
            "precision": precision_report(cfg.optim.precision, device, amp),
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
    if dist is not None:
        metrics["run"]["processes"] = dist.world
    if writes:
        finish_run(run_dir, method, model, identity, metrics, plots=cfg.run.plots)
    if cfg.run.progress:
        print(
            f"[visiontune] {method.describe()}: test accuracy {test_metrics['accuracy']:.4f}, weighted F1 "
            f"{test_metrics['f1_weighted']:.4f}, trainable {params['trainable']:,} ({params['trainable_pct']:.2f}%), "
            f"{wall:.1f}s -> {run_dir / 'report.md'}"
        )
    return RunResult(run_dir=run_dir, metrics=metrics)


def _eval_loader(records: Any, tf: Any, cfg: Config, cache: bool | None = None) -> DataLoader:
    """``records`` in order, for a forward pass only (features, validation, scoring): ``optim.eval_batch_size``
    batches through ``tf``, the decoded-image cache as ``data.cache`` says unless ``cache`` is given."""
    ds = image_dataset(records, tf, cfg.data.cache if cache is None else cache, limits=cfg.data.image_limits())
    return make_loader(ds, cfg.optim.eval_batch_size, False, 0, cfg.data.num_workers)


def _build(cfg: Config, method: Method, num_classes: int, device: torch.device) -> tuple[nn.Module, bool]:
    """The run's model on ``device``, and whether its convolutions were made channels-last."""
    model = build_model(cfg, method, num_classes).to(device)
    return model, channels_last_if_convnet(model)  # speed: NHWC convolutions (visiontune.train.speed)


def eval_tf_size(model: nn.Module, img_size: int | None) -> int:
    """The square input size the model is evaluated at."""
    if img_size:
        return int(img_size)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def _view_features(
    fast: nn.Module, records: Any, cfg: Config, device: torch.device, amp: torch.dtype | None,
    eval_tf: Any, train_tf: Any, views: int, what: str = "features",
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Features of ``records`` for a head fitted on cached features: (features, labels, source image per row).

    View 0 is the clean eval view; views 1.. are augmented (``train_tf``: random crop/flip), each computed once,
    so a head fitted on them has seen what training with augmentation feeds it.
    """
    xs, ys = [], []
    for v in range(views):
        loader = _eval_loader(records, eval_tf if v == 0 else train_tf, cfg)
        loader = distributed.shard_eval(loader)  # under a launcher each process extracts its share of the features
        f, y = extract_features(fast, loader, device, amp, cfg.run.progress, f"{what} view {v + 1}/{views}")
        xs.append(f)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys), np.tile(np.arange(len(records)), views)


def _fit_cached(
    method: Method, model: nn.Module, splits: dict[str, Any], cfg: Config, device: torch.device,
    amp: torch.dtype | None, eval_tf: Any, train_tf: Any, val_loader: DataLoader | None,
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
    dist = distributed.current()
    if dist is not None:  # every process fitted on the same gathered features; keep process 0's head to be sure
        method.load_trainable_state_dict(model, dist.broadcast(method.trainable_state_dict(model)))
    info.update(feature_time_s=feat_time, head_fit_time_s=time.perf_counter() - t1, cached_views=views)
    return info


def _fit_loop(
    method: Method, model: nn.Module, splits: dict[str, Any], cfg: Config, device: torch.device,
    amp: torch.dtype | None, train_tf: Any, val_loader: DataLoader | None, run_dir: Path,
    tb: ScalarLogger | None = None, resume: dict[str, Any] | None = None, split: dict[str, Any] | None = None,
    started: float | None = None, stop: Callable[[], bool] | None = None, pause_after: int | None = None,
    head_features: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[list[dict[str, Any]], int, dict[str, Any]]:
    """Gradient training of the trainable parameters, with per-epoch validation, best-epoch selection and resume.

    Args:
        resume: a checkpoint loaded (and checked against ``cfg``) by :func:`prepare_run_dir`, to continue from.
        split: the split's identity, stored in every checkpoint so that a resume can check it.
        started: ``time.perf_counter()`` when this segment of the run began (for the wall time in checkpoints).
    """

    if cfg.backbone.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    train_set = image_dataset(splits["train"], train_tf, cfg.data.cache, limits=cfg.data.image_limits())
    train_loader = make_loader(train_set, cfg.optim.batch_size, True, cfg.run.seed, cfg.data.num_workers)
    info: dict[str, Any] = {"head_init": "zero"}
    ckpt_path = checkpoint_path(run_dir)
    resuming = resume is not None
    started = time.perf_counter() if started is None else started
    earlier_wall, segments = 0.0, 1
    if cfg.optim.head_init == "probe" and method.pretrained and not resuming:
        shared = head_features if method.starts_as_backbone else None
        info = _probe_head_init(model, splits, cfg, device, amp, train_tf, val_loader, shared)
    if resume is not None:
        info = dict(resume.get("head_init") or info)  # how the first segment started the head
    head_init = dict(info)
    # ---- speed (visiontune.train.cache): blocks below the first trained one run once, not every epoch.
    dist = distributed.current()
    sharded = dist is not None and dist.sharded  # run.parallel=fsdp; its config check refuses prefix_cache=views
    prefix, info["prefix_cache"] = build_prefix_cache(
        model, "none" if sharded else cfg.run.prefix_cache, cfg.run.prefix_views, cfg.data.augment, train_set, val_loader,
        cfg.optim.eval_batch_size, device, lambda: autocast(device, amp), cfg.run.progress,
    )
    train_model = val_model = fast_forward(model)
    if prefix is not None and prefix.train_views is not None:
        train_loader, train_model = prefix.train_loader(cfg.optim.batch_size, cfg.run.seed), prefix.suffix
    if prefix is not None and prefix.val is not None:
        val_loader, val_model = prefix.val_loader(cfg.optim.eval_batch_size), prefix.suffix
    # ---- end speed
    if dist is not None:
        # optim.batch_size is the global batch: each process takes its share of the one-process batches.
        train_loader = distributed.shard_train(train_loader, cfg.run.seed, dist.rank_seed(cfg.run.seed))
        val_loader = distributed.shard_eval(val_loader)
        if sharded:  # the model itself: its own forward must run for the root unit to gather its parameters
            blocks = _blocks(model)
            train_model = val_model = dist.shard(model, blocks)
            info["fsdp_units"] = len(blocks) + 1
        else:
            train_model = dist.wrap(train_model)
    train_model = maybe_compile(train_model, cfg.run.compile)
    order_rng = getattr(train_loader, "order_generator", train_loader.generator)  # what decides the batch order
    groups = method.param_groups(model, cfg.optim.lr, cfg.optim.head_lr, cfg.optim.weight_decay)
    if not groups:
        raise ConfigError(f"method {method.name!r} left no trainable parameters")
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(train_loader) / cfg.optim.grad_accum)
    scheduler = warmup_cosine(
        optimizer, steps_per_epoch * cfg.optim.epochs, round(cfg.optim.warmup_epochs * steps_per_epoch), cfg.optim.min_lr_ratio
    )
    weights = class_weights(splits["train"].labels, len(splits["train"].classes), cfg.optim.class_weights)
    history: list[dict[str, Any]] = []
    best = {"score": -math.inf, "epoch": 0, "state": None}
    if val_loader is not None and not resuming and info.get("head_init") == "probe":
        # Epoch 0 competes too: the probe-initialised head before any fine-tuning. A fine-tune that does not
        # beat it on validation falls back to it, instead of to its least bad epoch.
        vl, vy = predict_logits(val_model, val_loader, device, amp)
        info["epoch0_val_accuracy"] = float((vl.argmax(1) == vy).float().mean())
        best = {
            "score": info["epoch0_val_accuracy"] - 1e-6 * float(F.cross_entropy(vl, vy)),
            "epoch": 0, "state": method.trainable_state_dict(model),
        }
    start_epoch = 1
    if resume is not None:
        ck = resume
        method.load_trainable_state_dict(model, ck["model"])
        distributed.load_optimizer_state(optimizer, ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        history, best, start_epoch = ck["history"], ck["best"], ck["epoch"] + 1
        _set_rng_state(ck["rng"])
        order_rng.set_state(ck["loader_rng"])
        earlier_wall, segments = float(ck.get("wall_time_s", 0.0)), int(ck.get("segments", 1)) + 1
        info.update(resumed_after_epoch=start_epoch - 1, earlier_wall_time_s=earlier_wall)
        if cfg.run.progress:
            print(f"[visiontune] resumed from {ckpt_path} at epoch {start_epoch}")
    info["segments"] = segments
    if not resuming:
        # _reseed_note: seed again right before the random augmentations. A module imported lazily since
        # train() seeded can draw from the global RNGs (sklearn imports rich, which calls random.getrandbits),
        # so without this a run's result depended on what the process had imported before it (the first
        # run of a sweep differed from the same run later in the sweep, or in a fresh worker process).
        seed_everything(cfg.run.seed if dist is None else dist.rank_seed(cfg.run.seed), cfg.run.deterministic)
    elif dist is not None and not dist.main:  # the checkpoint holds process 0's random state
        seed_everything(dist.rank_seed(cfg.run.seed) + start_epoch, cfg.run.deterministic)
    bar = tqdm(range(start_epoch, cfg.optim.epochs + 1), desc="epochs", disable=not cfg.run.progress, dynamic_ncols=True)
    for epoch in bar:
        row: dict[str, Any] = {"epoch": epoch}
        if prefix is not None:
            prefix.set_epoch(epoch)
        if dist is None:
            row.update(train_one_epoch(
                train_model, train_loader, optimizer, scheduler, cfg, device, amp, f"epoch {epoch}", weights, stop
            ))
        else:
            row.update(distributed.train_one_epoch_sharded(
                train_model, train_loader, optimizer, scheduler, cfg, device, lambda: autocast(device, amp),
                f"epoch {epoch}", weights, stop,
            ))
        if val_loader is not None:
            vl, vy = predict_logits(val_model, val_loader, device, amp)
            row["val_accuracy"] = float((vl.argmax(1) == vy).float().mean())
            row["val_loss"] = float(F.cross_entropy(vl, vy))
            # Best epoch: highest val accuracy, ties broken by lower val loss.
            score = row["val_accuracy"] - 1e-6 * row["val_loss"]
            if score > best["score"]:
                best = {"score": score, "epoch": epoch, "state": method.trainable_state_dict(model)}
        history.append(row)
        if tb is not None:
            tb.log(epoch, row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", **({"val_acc": f"{row['val_accuracy']:.3f}"} if "val_accuracy" in row else {}))
        # Process 0 writes the checkpoint; under FSDP every process first takes part in gathering the whole state.
        if sharded or distributed.is_main():
            state = {"model": method.trainable_state_dict(model), "optimizer": distributed.full_state(optimizer.state_dict())}
            if distributed.is_main():
                save_checkpoint(ckpt_path, {
                    **state, "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history, "best": best,
                    "rng": _rng_state(), "loader_rng": order_rng.get_state(), "config": cfg.to_dict(), "split": split,
                    "wall_time_s": earlier_wall + time.perf_counter() - started, "segments": segments, "head_init": head_init,
                }, kind="train", progress=f"epoch {epoch} of {cfg.optim.epochs}")
        if pause_after is not None and epoch == pause_after and epoch < cfg.optim.epochs:
            if dist is not None:
                dist.barrier()  # the checkpoint is on disk before any process reports the pause
            raise TrainingPaused(f"paused after epoch {epoch} of {cfg.optim.epochs}, as asked", run_dir)
    if best["state"] is not None:
        method.load_trainable_state_dict(model, best["state"])
        info["epoch0_is_probe_head"] = info.get("head_init") == "probe"
        return history, int(best["epoch"]), info
    return history, len(history), info


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP shards one by one (:func:`~visiontune.methods.targets.find_blocks`).

    Raises:
        ConfigError: the backbone's block layout is not one visiontune recognises.
    """
    layout = find_blocks(model)
    if layout is None:
        raise ConfigError(f"run.parallel=fsdp shards a backbone block by block, and {type(model).__name__} has no "
                          "block layout visiontune recognises; use run.parallel=ddp")
    return [model.get_submodule(n) for n in layout.names]


def _unsharded(model: nn.Module, method: Method, build: Callable[[], nn.Module]) -> nn.Module:
    """A plain model equal to the FSDP-sharded ``model`` on every process: ``build()`` with its trained state.

    ``build`` rebuilds the run's model (same seed and weights, so the same frozen parameters); the trained
    ones are all-gathered into it. Each process then holds the whole model, as predict and serve do.
    """
    state = method.trainable_state_dict(model)  # a collective: every process gathers the whole tensors
    plain = build()
    method.load_trainable_state_dict(plain, state)
    return plain


def _probe_head_init(
    model: nn.Module, splits: dict[str, Any], cfg: Config, device: torch.device, amp: torch.dtype | None,
    train_tf: Any, val_loader: DataLoader | None, shared: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """LP-FT: fit the head as a linear probe on the (frozen) starting features.

    Fine-tuning then starts from a good head instead of spending its few-shot budget, and its large
    early gradients, on a random one, which distorts pretrained features (Kumar et al., ICLR 2022).
    With ``optim.head_init_views`` > 1 the probe also sees augmented views of each training image, as the
    fine-tuning that follows does. ``shared``: the starting features of the training images, computed by the
    caller; used instead of a feature pass when there is nothing else to compute (one view, no validation split).
    """

    t0 = time.perf_counter()
    tf = build_transform(model, cfg.backbone.img_size, train=False)
    fast = fast_forward(model)
    views = cfg.optim.head_init_views if cfg.data.augment else 1  # without augmentation every view is the clean one
    # The caller's features are fp32 clean views: they stand in for this pass only where it computes the same.
    reuse = (shared is not None and views == 1 and val_loader is None and amp is None
             and len(shared[1]) == len(splits["train"]))
    if reuse:
        x, y = shared
        train = (x, y, np.arange(len(y)))
    else:
        train = _view_features(fast, splits["train"], cfg, device, amp, tf, train_tf, views, "probe head init")
    val = extract_features(fast, val_loader, device, amp) if val_loader is not None else None
    info = fit_probe_head(classifier_of(model), train, val, balanced=cfg.optim.class_weights == "balanced")
    return {"head_init": "probe", "head_init_c": info["c"], "head_init_views": views, "head_init_time_s": time.perf_counter() - t0,
            "head_init_features": "shared" if reuse else "computed"}
