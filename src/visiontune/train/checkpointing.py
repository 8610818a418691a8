"""Checkpointing of the training loop: what an epoch's checkpoint holds, and how a resumed run picks it up.

A checkpoint holds the trained state, the optimizer and schedule, the history and best epoch so far, every
random generator the run draws from (Python, numpy, torch and the loader's shuffling order) and the config and
data split it was made with, as safetensors + JSON (:mod:`visiontune.checkpoint`, never a pickle). Resuming
from it draws the same numbers an uninterrupted run would have drawn.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import visiontune.distributed as distributed
from visiontune.checkpoint import checkpoint_path, save_checkpoint
from visiontune.config import Config
from visiontune.methods import Method
from visiontune.train.strategy import OneProcess


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain data + a byte tensor (what a checkpoint can hold unpickled)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned, so a resumed run draws the same numbers as an uninterrupted one."""
    py, npy = state["python"], state["numpy"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss_next"]))
    np.random.set_state((str(npy["name"]), np.asarray(npy["keys"], dtype=np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(state["torch"])


@dataclass
class Progress:
    """Where the epoch loop stands: what a checkpoint saves and a resume restores."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"score": -float("inf"), "epoch": 0, "state": None})
    start_epoch: int = 1
    earlier_wall: float = 0.0
    """Wall time of the earlier segments of a resumed run (seconds)."""
    segments: int = 1
    """Segments of the run: 1, plus one per resume."""


@dataclass
class TrainCheckpoint:
    """The run directory's checkpoint of one training run (``checkpoint/last.safetensors``).

    Attributes:
        run_dir: the run directory.
        cfg: the resolved config (stored, so that a resume can check it).
        split: the data split's identity (stored likewise).
        head_init: how the first segment started the head (kept across resumes).
        started: ``time.perf_counter()`` when this segment of the run began.
    """

    run_dir: Path
    cfg: Config
    split: dict[str, Any] | None
    head_init: dict[str, Any]
    started: float

    @property
    def path(self) -> Path:
        return checkpoint_path(self.run_dir)

    def restore(self, ck: dict[str, Any], method: Method, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any, order_rng: torch.Generator) -> Progress:
        """Load a checkpoint (read and checked by the run's start-up) into the model, optimizer, schedule and RNGs."""
        method.load_trainable_state_dict(model, ck["model"])
        distributed.load_optimizer_state(optimizer, ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        order_rng.set_state(ck["loader_rng"])
        return Progress(ck["history"], ck["best"], ck["epoch"] + 1, float(ck.get("wall_time_s", 0.0)),
                        int(ck.get("segments", 1)) + 1)

    def save(self, strategy: OneProcess, epoch: int, progress: Progress, method: Method, model: nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: Any, order_rng: torch.Generator) -> None:
        """Write the checkpoint after ``epoch`` (process 0 writes; under FSDP every process first takes part in
        gathering the whole state)."""
        state = strategy.collect(lambda: {"model": method.trainable_state_dict(model),
                                          "optimizer": distributed.full_state(optimizer.state_dict())})
        if state is None:
            return
        save_checkpoint(self.path, {
            **state, "scheduler": scheduler.state_dict(), "epoch": epoch, "history": progress.history,
            "best": progress.best, "rng": rng_state(), "loader_rng": order_rng.get_state(), "config": self.cfg.to_dict(),
            "split": self.split, "wall_time_s": progress.earlier_wall + time.perf_counter() - self.started,
            "segments": progress.segments, "head_init": self.head_init,
        }, kind="train", progress=f"epoch {epoch} of {self.cfg.optim.epochs}")
