"""The extended-pretraining loop: DINOv2 self-distillation on ExPLoRA's partially unfrozen backbone.

``pretrain(cfg)`` builds student and EMA teacher from ``backbone.*`` (LoRA + unfrozen blocks + norms,
see :mod:`visiontune.pretrain.model`), fresh heads, multi-crop data from unlabeled images, and runs
``optim.steps`` optimizer steps. Per step: the teacher sees the two global crops; the student sees
them with iBOT masks plus the local crops; loss = DINO (every student view vs the teacher's other
global views) + iBOT (masked patches) + KoLeo (student class tokens); AdamW step; teacher EMA.
The run directory (:mod:`visiontune.pretrain.runs`) gets the merged backbone, its lineage, the history and
``checkpoint/`` (safetensors + JSON, never a pickle: :mod:`visiontune.checkpoint`); every file is written
atomically. The run's start-up is a fine-tuning run's: :func:`visiontune.train.strategy.launch` (processes,
device) and :func:`visiontune.rundir.start_run` (the run directory's rules, :class:`visiontune.rundir.RunKind`).

The loop is written here (a flat function, like :mod:`visiontune.train.loop`) because no library
runs ExPLoRA; DINOv2's own trainer needs xFormers, FSDP and CUDA.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader
from tqdm.auto import tqdm

import visiontune.distributed as distributed
from visiontune.atomic import write_json_atomic
from visiontune.checkpoint import CheckpointError, checkpoint_path, legacy_checkpoint, legacy_message, load_checkpoint, save_checkpoint
from visiontune.errors import ConfigError
from visiontune.pretrain.config import PretrainConfig, load_pretrain_config, resolve_unfrozen
from visiontune.pretrain.crops import (
    CropDataset, MultiCrop, StreamSampler, UnlabeledImages, band_statistics, collate_crops, load_unlabeled,
)
from visiontune.pretrain.heads import SSLHeads
from visiontune.pretrain.losses import (
    TeacherCentering, cosine_schedule, ema_update, ibot_patch_loss, koleo_loss, pairwise_dino_loss, teacher_temperature,
)
from visiontune.pretrain.masking import sample_masks
from visiontune.pretrain.model import (
    apply_explora, check_vit, enable_multicrop, export_backbone, install_mask_hook, make_teacher, masked, patch_size,
    replace_patch_embed, tokens, trained_pairs,
)
from visiontune.pretrain.runs import (
    BACKBONE_FILE, LINEAGE_FILE, LINEAGE_FORMAT, PRETRAIN_RUNS, PretrainResult, load_backbone, plot_history, pool_identity,
)
from visiontune.rundir import start_run
from visiontune.runtime import autocast, autocast_dtype, seed_everything, torch_threads, warmup_cosine
from visiontune.backbones import backbone_identity, create_backbone, data_config, input_size
from visiontune.backbones.weights import file_sha256, save_safetensors_atomic
from visiontune.methods.targets import find_blocks
from visiontune.train.strategy import launch

__all__ = [  # what visiontune.pretrain offers, some of it from visiontune.pretrain.runs
    "BACKBONE_FILE", "LINEAGE_FILE", "PretrainResult", "StudentStep", "build_student", "export_checkpoint", "load_backbone",
    "plot_history", "pretrain",
]

# ----------------------------------------------------------------------------- pieces


def _crop_sizes(cfg: PretrainConfig, model: nn.Module) -> tuple[int, int]:
    ps = patch_size(model)
    g = int(cfg.crops.global_size or input_size(model))  # the student's own size: backbone.img_size when set
    loc = cfg.crops.local_size or max(ps, int(round(g * 7 / 16 / ps)) * ps)
    bad = [f"crops.{k}={v}" for k, v in (("global_size", g), ("local_size", loc)) if v % ps]
    if bad:
        raise ConfigError(
            f"{' and '.join(bad)} must be a multiple of the patch size {ps} of {cfg.backbone.name}; e.g. "
            f"{(g // ps) * ps} and {max(ps, (int(loc) // ps) * ps)}"
        )
    return g, int(loc)


def _param_groups(named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float, tag: str) -> list[dict[str, Any]]:
    decay = [p for n, p in named if p.requires_grad and not (p.ndim <= 1 or n.endswith(".bias") or "token" in n or "pos_embed" in n)]
    no_decay = [p for n, p in named if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias") or "token" in n or "pos_embed" in n)]
    return [g for g in ({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": tag},
                        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{tag}_no_decay"}) if g["params"]]


def _trained_state(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().cpu().clone() for n in names}


def _load_trained(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


class StudentStep(nn.Module):
    """The student's part of a step (backbone on masked global and local crops, then the head) as one module.

    One module with one ``forward`` is what DDP wraps: it averages the gradients of the backbone and the
    heads together, and finds the parameters a step leaves out (the backbone during the head warm-up,
    the mask token without iBOT).
    """

    def __init__(self, student: nn.Module, heads: SSLHeads, autocast: Callable[[], Any]):
        super().__init__()
        self.student, self.heads, self.autocast = student, heads, autocast

    def forward(
        self, glob: torch.Tensor, local: torch.Tensor | None, masks: torch.Tensor | None, mask_flat: torch.Tensor,
        train_backbone: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(global class tokens ``[2B, D]``, local class tokens ``[L B, D]``, head outputs of both + masked patches)."""
        with torch.set_grad_enabled(train_backbone), self.autocast():
            with masked(self.student, masks, self.heads.mask_token):
                s_cls, s_patch = tokens(self.student, glob)
            s_local = tokens(self.student, local)[0] if local is not None else s_cls[:0]
        with self.autocast():
            s_out = self.heads.head(torch.cat([s_cls, s_local, s_patch[mask_flat]])).float()
        return s_cls, s_local, s_out


def build_student(cfg: PretrainConfig, device: torch.device | str = "cpu") -> tuple[nn.Module, SSLHeads, Any]:
    """The student backbone after ExPLoRA's surgery (multi-crop and mask hook on) and fresh SSL heads.

    Seeded by ``run.seed``, so the same config rebuilds identical LoRA and head initialisations (resume, export).

    Returns:
        (student, heads, :class:`~visiontune.pretrain.model.ExploraSurgery`).
    """
    torch.manual_seed(cfg.run.seed)
    student = create_backbone(cfg.backbone, num_classes=0)
    check_vit(student, cfg.backbone.name)
    if cfg.data.channels is not None:
        replace_patch_embed(student, cfg.data.channels)
    unfrozen = resolve_unfrozen(cfg.explora.unfrozen, len(find_blocks(student).names))
    surgery = apply_explora(student, unfrozen, cfg.explora.rank, cfg.explora.alpha, list(cfg.explora.targets),
                            cfg.explora.dropout, cfg.explora.norms, new_patch_embed=cfg.data.channels is not None,
                            label=cfg.backbone.name)
    enable_multicrop(student)
    install_mask_hook(student)
    student.to(device).train()
    ssl = cfg.ssl
    heads = SSLHeads(student.num_features, ssl.prototypes, ssl.head_hidden_dim, ssl.head_bottleneck_dim,
                     ssl.head_layers).to(device).train()
    return student, heads, surgery


def export_checkpoint(run_dir: str | Path, network: str = "teacher", out: str | Path | None = None) -> Path:
    """Write the backbone of a pretraining checkpoint (e.g. of an unfinished or interrupted run) as a file.

    Args:
        run_dir: a pretraining run directory (with ``config.yaml`` and ``checkpoint/last.safetensors``).
        network: ``teacher`` or ``student``.
        out: output path; default ``<run_dir>/<network>-step<N>.safetensors``.

    Returns:
        The written file; load it with ``backbone.weights=<path>``.
    """
    run_dir = Path(run_dir)
    if network not in ("teacher", "student"):
        raise ConfigError(f"network={network!r} is not teacher or student")
    ck_path = checkpoint_path(run_dir)
    if not ck_path.is_file():
        legacy = legacy_checkpoint(run_dir)
        if legacy is not None:
            raise CheckpointError(legacy_message(legacy))
        raise ConfigError(f"{str(run_dir)!r} has no {ck_path.relative_to(run_dir)}; pass a pretraining run directory")
    cfg = load_pretrain_config(run_dir / "config.yaml")
    student, _, _ = build_student(cfg)
    ck = load_checkpoint(ck_path, "pretrain")
    _load_trained(student, ck[network])
    state = {k: v.detach().cpu().contiguous() for k, v in export_backbone(student).state_dict().items()}
    path = Path(out) if out else run_dir / f"{network}-step{ck['step']}.safetensors"
    save_safetensors_atomic(state, path, metadata={"visiontune_pretrain": cfg.recipe_name(), "arch": cfg.backbone.name,
                                                   "network": network, "steps": str(ck["step"])})
    return path


# ----------------------------------------------------------------------------- main entry


def pretrain(cfg: PretrainConfig, callback: Callable[[int, dict[str, Any]], None] | None = None) -> PretrainResult:
    """Run ExPLoRA extended pretraining and write the new backbone with its lineage.

    ``run.threads`` applies during the run only; torch's thread count is restored afterwards.

    Args:
        cfg: the pretraining config (:func:`visiontune.pretrain.load_pretrain_config`).
        callback: called after every step (and after its checkpoint, if one was due) with the step
            number (1-based) and its history row; an exception raised there stops the run after a
            checkpoint is written, so it can be resumed with ``run.resume=true``.

    Returns:
        The run directory, the backbone file, its lineage record and the per-step history.
    """
    with torch_threads(cfg.run.threads):
        return _pretrain(cfg, callback)


def _pretrain(cfg: PretrainConfig, callback: Callable[[int, dict[str, Any]], None] | None) -> PretrainResult:
    """The body of :func:`pretrain` (which only scopes the thread count around it).

    Under ``torchrun`` / ``accelerate launch`` (:mod:`visiontune.distributed`) ``optim.batch_size`` stays the
    global batch: each process takes a contiguous share of every batch of the one-process stream (the
    crops, seeded per image, and the iBOT masks, drawn for the whole batch, are the same), DDP averages
    the gradients of the student and heads, the teacher centering sums over processes, each loss term
    is the process's share of the global mean times N, and KoLeo's nearest neighbours are found in the
    whole batch (:func:`visiontune.distributed.gather_rows`). Process 0 alone writes the run directory.
    """
    strategy, cfg = launch(cfg)
    device = strategy.device
    seed = cfg.run.seed
    seed_everything(seed, True)
    amp = autocast_dtype(cfg.optim.precision, device)
    ssl, steps, batch = cfg.ssl, cfg.optim.steps, cfg.optim.batch_size

    pool: UnlabeledImages = load_unlabeled(cfg.data.dataset, cfg.data.root, cfg.data.channels, cfg.data.exclude_eval_of,
                                           cfg.data.max_images, seed)
    if len(pool) < batch:
        raise ConfigError(f"optim.batch_size={batch} is larger than the {len(pool)} pretraining images; lower it")
    distributed.check_global_batch(batch, strategy.world)
    pool_id = pool_identity(pool)
    # The run directory's rules (visiontune.rundir): process 0 decides, every process follows; config.yaml written.
    begin = start_run(PRETRAIN_RUNS, cfg, pool_id, strategy)
    writes = strategy.main
    run_dir = begin.run_dir
    if begin.finished is not None:
        return begin.finished

    # ---- networks (seeded so that a resumed run rebuilds identical LoRA / head initialisations)
    student, heads, surgery = build_student(cfg, device)
    identity = backbone_identity(cfg.backbone)
    channels = cfg.data.channels
    teacher = make_teacher(student)
    teacher_head = copy.deepcopy(heads.head).requires_grad_(False).eval()
    center_dino = TeacherCentering(ssl.prototypes, ssl.center_momentum, ssl.centering).to(device)
    center_ibot = TeacherCentering(ssl.prototypes, ssl.center_momentum, ssl.centering).to(device)
    trained_names = [n for n, p in student.named_parameters() if p.requires_grad]
    t_params, s_params = trained_pairs(student, teacher)
    step_model: nn.Module = StudentStep(student, heads, lambda: autocast(device, amp))
    # Under a launcher, DDP: steps can leave parameters out of one process's graph: the backbone during the head
    # warm-up, the mask token when none of that process's crops is masked (its share of the batch's masks can be empty).
    step_model = strategy.wrap(step_model, find_unused_parameters=True)

    # ---- data
    gsize, lsize = _crop_sizes(cfg, student)
    if channels is None:
        dcfg = data_config(student, gsize)
        mean, std = list(dcfg["mean"]), list(dcfg["std"])
    elif cfg.data.band_mean is not None and cfg.data.band_std is not None:
        mean, std = list(cfg.data.band_mean), list(cfg.data.band_std)
    else:
        m_, s_ = band_statistics([str(i) for i in pool.items], channels, seed=seed)
        mean, std = cfg.data.band_mean or m_, cfg.data.band_std or s_
    transform = MultiCrop(gsize, lsize, cfg.crops.local_number, cfg.crops.global_scale, cfg.crops.local_scale, mean, std,
                          photometric=cfg.crops.photometric, multiband=channels is not None)
    dataset = CropDataset(pool, transform, seed, channels)
    grid = (gsize // patch_size(student), gsize // patch_size(student))

    # ---- optimisation
    lr = cfg.optim.resolved_lr()
    head_lr = cfg.optim.head_lr or lr
    groups = _param_groups(list(student.named_parameters()), lr, cfg.optim.weight_decay, "backbone")
    groups += _param_groups(list(heads.named_parameters()), head_lr, cfg.optim.weight_decay, "heads")
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    scheduler = warmup_cosine(optimizer, steps, round(cfg.optim.warmup * steps), cfg.optim.min_lr_ratio)
    temp_warmup = round(ssl.teacher_temp_warmup * steps)
    freeze_last = round(ssl.freeze_last_layer * steps)
    n_local = cfg.crops.local_number
    use_ibot = ssl.ibot_weight > 0

    # ---- resume
    ckpt_path = checkpoint_path(run_dir)
    start, history, wall_before, cpu_before = 0, [], 0.0, 0.0
    if begin.checkpoint is not None:
        ck = begin.checkpoint
        if ck["trained_names"] != trained_names:
            raise ConfigError(f"checkpoint {ckpt_path} was written by a different setup (trained parameters differ); "
                              "resume with the config in its run directory, or start a new run.name")
        _load_trained(student, ck["student"])
        _load_trained(teacher, ck["teacher"])
        heads.load_state_dict(ck["heads"])
        teacher_head.load_state_dict(ck["teacher_head"])
        center_dino.load_state_dict(ck["center_dino"])
        center_ibot.load_state_dict(ck["center_ibot"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["torch_rng"])
        start, history, wall_before, cpu_before = ck["step"], ck["history"], ck["wall_time_s"], ck.get("cpu_time_s", 0.0)
        if cfg.run.progress:
            print(f"[visiontune] resumed {run_dir} at step {start}/{steps}")
    if not strategy.main:
        # Crops and masks are seeded per image and step; what still draws from torch's generator (LoRA
        # dropout) draws per process, as in a fine-tuning run (the checkpoint holds process 0's state).
        seed_everything(strategy.rank_seed(seed) + start, True)

    saved = {"step": start}

    def checkpoint(step: int, wall: float) -> None:
        saved["step"] = step
        cpu = cpu_before + time.process_time() - cpu0
        save_checkpoint(ckpt_path, {
            "step": step, "trained_names": trained_names, "student": _trained_state(student, trained_names),
            "teacher": _trained_state(teacher, trained_names), "heads": heads.state_dict(),
            "teacher_head": teacher_head.state_dict(), "center_dino": center_dino.state_dict(),
            "center_ibot": center_ibot.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "history": history,
            "wall_time_s": wall, "cpu_time_s": cpu, "config": cfg.to_dict(), "pool": pool_id,
        }, kind="pretrain", progress=f"step {step} of {steps}")

    stream = BatchSampler(StreamSampler(len(pool), seed, start * batch), batch, drop_last=False)
    loader = DataLoader(dataset, batch_sampler=distributed.shard_batches(stream), num_workers=cfg.data.num_workers,
                        collate_fn=collate_crops, persistent_workers=False)
    # Under a launcher: this process's rows of each global batch (crop 1 of its images, then crop 2).
    mine = distributed.my_share(batch)
    rows = torch.tensor([*mine, *(batch + j for j in mine)])
    world = strategy.world
    share_weight = len(mine) / batch  # this process's share of every per-image mean
    if cfg.run.progress:
        print(f"[visiontune] {cfg.recipe_name()} on {cfg.backbone.name}: {len(pool)} unlabeled images"
              f"{f' ({pool.excluded} held out)' if pool.excluded else ''}, {steps} steps x {batch} images, "
              f"crops 2x{gsize} + {n_local}x{lsize}, trainable backbone {surgery.trainable:,}/{surgery.total:,} -> {run_dir}")
    t0, cpu0 = time.perf_counter(), time.process_time()
    bar = tqdm(total=steps, initial=start, desc="pretrain", disable=not cfg.run.progress, dynamic_ncols=True)
    batches = iter(loader)
    try:
        for step in range(start, steps):
            crops = next(batches)
            t_step = time.perf_counter()
            temp = teacher_temperature(step, temp_warmup, ssl.warmup_teacher_temp, ssl.teacher_temp)
            momentum = cosine_schedule(ssl.teacher_momentum, ssl.final_teacher_momentum, step, steps)
            glob = torch.cat(crops[:2]).to(device, non_blocking=True)
            n_img = glob.shape[0]
            # The masks of the whole global batch (the one-process draw); this process takes its images' rows.
            all_masks = (sample_masks(2 * batch, grid, ssl.mask_probability, tuple(ssl.mask_ratio),
                                      np.random.default_rng([seed, 5, step])) if use_ibot
                         else torch.zeros(2 * batch, *grid, dtype=torch.bool))
            masks, n_masked = all_masks[rows], int(all_masks.sum())
            mask_flat = masks.flatten(1).to(device)
            # ---- teacher: both global crops, unmasked
            with torch.no_grad(), autocast(device, amp):
                t_cls, t_patch = tokens(teacher, glob)
                t_out = teacher_head(torch.cat([t_cls, t_patch[mask_flat]])).float()
            t_probs = center_dino(t_out[:n_img], temp)
            t_patch_probs = center_ibot(t_out[n_img:], temp) if n_masked else t_out[n_img:]
            # ---- student: masked global crops + local crops
            train_backbone = step >= ssl.head_warmup_steps
            s_cls, s_local, s_out = step_model(glob, torch.cat(crops[2:]).to(device, non_blocking=True) if n_local else None,
                                               masks if use_ibot else None, mask_flat, train_backbone)
            s_views = list(s_out[:n_img].chunk(2)) + (list(s_out[n_img : n_img + len(s_local)].chunk(n_local)) if n_local else [])
            dino_sum, pairs = pairwise_dino_loss(s_views, list(t_probs.chunk(2)), ssl.student_temp)
            dino = dino_sum / pairs
            koleo = (sum(koleo_loss(distributed.gather_rows(c)) for c in s_cls.float().chunk(2)) if ssl.koleo_weight > 0
                     else dino.new_zeros(()))
            image_index = mask_flat.nonzero()[:, 0]
            ibot = ibot_patch_loss(s_out[n_img + len(s_local) :], t_patch_probs, image_index, n_img, ssl.student_temp)
            with torch.no_grad():  # the global batch's figures: per-image means summed over the processes' shares
                log_p = torch.log(t_probs + 1e-12)
                sums = distributed.all_reduce(torch.cat([
                    t_probs.sum(dim=0), -(t_probs * log_p).sum()[None], torch.stack([dino, ibot]) * share_weight,
                ]).double())
                dino_value, ibot_value = sums[-2:].tolist()
                loss_value = ssl.dino_weight * dino_value + ssl.koleo_weight * float(koleo) + ssl.ibot_weight * ibot_value
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"pretraining loss became {loss_value} at step {step + 1}; lower optim.lr "
                                         f"(now {optimizer.param_groups[0]['lr']:.2e}) or use optim.precision=fp32")
            # Per-image terms: this process's share of the global mean; KoLeo: the whole batch's (gradient into this
            # process's rows). Times N, which DDP's gradient average divides back out.
            loss = world * (share_weight * (ssl.dino_weight * dino + ssl.ibot_weight * ibot) + ssl.koleo_weight * koleo)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step < freeze_last:
                # DINO keeps the prototypes still at first: moving them and the features at once destabilises.
                for p in heads.head.last_layer_parameters():
                    p.grad = None
            if cfg.optim.clip_grad:
                for module in (student, heads):
                    nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], cfg.optim.clip_grad)
            optimizer.step()
            scheduler.step()
            ema_update(t_params, s_params, momentum)
            ema_update(teacher_head.parameters(), heads.head.parameters(), momentum)
            with torch.no_grad():
                t_all = distributed.gather_rows(F.normalize(t_cls.float(), dim=-1))
                spread = float(t_all.std(dim=0).mean() * math.sqrt(t_cls.shape[-1]))
                mean_p = sums[:-3] / (2 * batch)
                entropy = float(-(mean_p * torch.log(mean_p + 1e-12)).sum())
                sample_entropy = float(sums[-3] / (2 * batch))
            row = {"step": step + 1, "loss": loss_value, "dino": dino_value, "ibot": ibot_value, "koleo": float(koleo.detach()),
                   "lr": optimizer.param_groups[0]["lr"], "teacher_temp": temp, "momentum": momentum,
                   "masked_patches": n_masked, "teacher_feat_std": spread, "teacher_entropy": entropy,
                   "teacher_sample_entropy": sample_entropy,
                   "backbone_trained": train_backbone, "step_time_s": time.perf_counter() - t_step}
            history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", dino=f"{row['dino']:.3f}", ibot=f"{row['ibot']:.3f}")
            if writes and ((step + 1) % cfg.run.checkpoint_every == 0 or step + 1 == steps):
                checkpoint(step + 1, wall_before + time.perf_counter() - t0)
            if callback is not None:
                callback(step + 1, row)
    except BaseException:
        # Ctrl-C or a failing callback: keep every finished step resumable.
        if writes and len(history) != saved["step"]:
            checkpoint(len(history), wall_before + time.perf_counter() - t0)
        raise
    finally:
        bar.close()
    wall = wall_before + time.perf_counter() - t0
    cpu = cpu_before + time.process_time() - cpu0

    if not writes:  # process 0 writes the backbone and its lineage; every process returns them
        return PretrainResult(run_dir=run_dir, backbone=run_dir / BACKBONE_FILE, lineage=strategy.broadcast(None),
                              history=history)

    # ---- the new backbone: LoRA merged, plain timm state dict, lineage beside it
    source = teacher if cfg.run.save == "teacher" else student
    merged = export_backbone(source)
    state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    out = run_dir / BACKBONE_FILE
    save_safetensors_atomic(state, out, metadata={
        "visiontune_pretrain": cfg.recipe_name(), "arch": cfg.backbone.name, "base_weights": str(identity["weights"]),
        "steps": str(len(history)),
    })
    img_size = int(cfg.backbone.img_size or gsize)
    lineage = {
        "format": LINEAGE_FORMAT,
        "kind": "explora",
        "recipe": cfg.recipe_name(),
        "backbone": {"name": cfg.backbone.name, "img_size": img_size, "in_chans": channels or 3,
                     "file": BACKBONE_FILE, "sha256": file_sha256(out), "network": cfg.run.save},
        "base": identity,
        "data": {
            "dataset": cfg.data.dataset, "source": pool.source, "images": len(pool), "held_out": pool.excluded,
            "exclude_eval_of": cfg.data.exclude_eval_of, "excluded": pool.excluded_from,
            "mean": mean, "std": std, "channels": channels or 3, "pool": pool_id,
        },
        "training": {
            "steps": len(history), "batch_size": batch, "images_seen": len(history) * batch,
            "epochs": len(history) * batch / len(pool), "crops": f"2x{gsize} + {n_local}x{lsize}",
            "wall_time_s": wall, "cpu_time_s": cpu, "device": str(device),
            "final": {k: history[-1][k] for k in ("loss", "dino", "ibot", "koleo", "teacher_feat_std")} if history else {},
        },
        "explora": {
            "unfrozen_blocks_1based": [i + 1 for i in surgery.unfrozen_blocks], "lora_blocks_1based": [i + 1 for i in surgery.lora_blocks],
            "lora_modules": len(surgery.lora_modules), "rank": cfg.explora.rank, "targets": list(cfg.explora.targets),
            "norm_layers": len(surgery.norm_modules), "new_patch_embed": surgery.new_patch_embed,
            "trainable_backbone_params": surgery.trainable, "backbone_params": surgery.total,
            "head_params": sum(p.numel() for p in heads.parameters() if p.requires_grad),
        },
        "config": cfg.to_dict(),
        "use": f"backbone.name={cfg.backbone.name} backbone.weights={out} backbone.img_size={img_size}"
               + (f" data.channels={channels}" if channels is not None else ""),
    }
    write_json_atomic(run_dir / "history.json", history, indent=None)
    if history and cfg.run.plot:
        plot_history(history, run_dir / "loss.png", title=f"{cfg.recipe_name()} on {Path(cfg.data.dataset).name}")
    write_json_atomic(run_dir / LINEAGE_FILE, lineage)  # last: its presence marks a finished run
    if cfg.run.progress:
        print(f"[visiontune] new backbone {out} ({len(history)} steps, {wall:.0f}s); fine-tune it with {lineage['use']}")
    strategy.broadcast(lineage)  # the other processes return it too
    return PretrainResult(run_dir=run_dir, backbone=out, lineage=lineage, history=history)
