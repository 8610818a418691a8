"""How the one training loop runs in one process or in many: a small strategy object (Lightning Fabric's habit).

:func:`visiontune.train.loop.train_one_epoch` and the epoch loop around it are written once; what differs
between one process, DDP and FSDP lives here, behind the same methods:

==============================  ===================  =========================  ==========================
                                :class:`OneProcess`  :class:`DataParallel`      :class:`FullyShardedDP`
==============================  ===================  =========================  ==========================
training / evaluation loaders   as they are          this process's share of    same, evaluation padded
                                                     every global batch         to equal batch counts
model                           as it is             torch DDP                  FSDP2, block by block
a micro-batch's loss            mean cross-entropy   share of the global mean   same
                                                     times N (see below)
gradient sync                   (none)               the group's last           same
                                                     micro-batch only
checkpoint state                this process's       process 0's                gathered by all, kept by 0
==============================  ===================  =========================  ==========================

The data-parallel loss: each process's loss is the sum of its weighted per-image losses divided by the *global*
batch's weight total (one small all-reduce per micro-batch) times N, which DDP's (or FSDP's) gradient average
divides back out, so a step equals the one-process step up to float rounding (:mod:`visiontune.distributed`
explains the shares and their zero-weight padding). The one-process loss stays ``F.cross_entropy``'s own mean,
so one-process runs give exactly the numbers they gave before the loops were merged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import visiontune.distributed as distributed
from visiontune.distributed import Dist
from visiontune.errors import ConfigError
from visiontune.methods import Method
from visiontune.methods.targets import find_blocks
from visiontune.runtime import resolve_device

C = TypeVar("C")


@dataclass
class StepLoss:
    """One micro-batch's loss as the loop needs it.

    Attributes:
        loss: what ``backward`` takes (before dividing by the accumulation group's length).
        value: the loss of the micro-batch (the global one's under data parallelism), for the epoch's mean.
        weight: how many images ``value`` averages over (the global micro-batch's, padding excluded).
        finite: whether ``value`` is finite (on every process alike).
    """

    loss: torch.Tensor
    value: float
    weight: float
    finite: bool


class OneProcess:
    """One process, one device: everything passes through unchanged."""

    world = 1
    main = True
    shards_model = False
    """Whether the trained model itself is sharded (FSDP): the frozen-prefix cache stays off then."""

    def __init__(self, device: torch.device):
        self.device = device

    def rank_seed(self, seed: int) -> int:
        """This process's seed for random augmentations."""
        return seed

    # ---- set-up
    def train_loader(self, loader: DataLoader, seed: int) -> DataLoader:
        """This process's training loader (``optim.batch_size`` stays the global batch)."""
        return loader

    def eval_loader(self, loader: DataLoader | None) -> DataLoader | None:
        """This process's range of an evaluation loader (every image scored once over all processes)."""
        return loader

    def prepare(self, model: nn.Module, train_model: nn.Module, val_model: nn.Module,
                info: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
        """The modules the loop trains and validates with (``model``: the whole model, ``train_model`` /
        ``val_model``: what runs forward, e.g. the suffix after a cached frozen prefix)."""
        return train_model, val_model

    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """``module`` with its gradients averaged over processes (pretraining's student step)."""
        return module

    def unshard(self, model: nn.Module, method: Method, build: Callable[[], nn.Module]) -> nn.Module:
        """A plain model with the trained state, for merging, the test pass and saving."""
        return model

    # ---- the step
    def split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(images, labels, per-image weights or None) of a batch, on the device."""
        x, y = batch
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), None

    def sync(self, model: nn.Module, step: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: average gradients over processes only if ``step``."""
        return contextlib.nullcontext()

    def loss(self, logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, class_weight: torch.Tensor | None,
             label_smoothing: float) -> StepLoss:
        """The micro-batch's cross-entropy (``class_weight``: [K] weights by class, or None)."""
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing, weight=class_weight)
        value = float(loss.detach())
        return StepLoss(loss, value, len(y), math.isfinite(value))

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is True on any."""
        return flag

    # ---- agreeing and checkpointing
    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj`` on every process."""
        return obj

    def barrier(self) -> None:
        """Wait until every process gets here."""

    def keep_main_state(self, method: Method, model: nn.Module) -> None:
        """Give every process process 0's trained state (after a fit each process ran on the same data)."""

    def collect(self, state: Callable[[], Any]) -> Any:
        """``state()`` on the process that writes (process 0), None on the others; under FSDP every process takes
        part in gathering it."""
        return state()

    def report(self) -> dict[str, Any]:
        """What ``metrics.json``'s ``run`` section says about the processes."""
        return {}


class DataParallel(OneProcess):
    """Several processes under a launcher, each holding the whole model (torch DDP, through accelerate)."""

    def __init__(self, dist: Dist):
        super().__init__(dist.device)
        self.dist = dist
        self.world, self.main = dist.world, dist.main

    def rank_seed(self, seed: int) -> int:
        return self.dist.rank_seed(seed)

    def train_loader(self, loader: DataLoader, seed: int) -> DataLoader:
        return distributed.shard_train(loader, seed, self.dist.rank_seed(seed))

    def eval_loader(self, loader: DataLoader | None) -> DataLoader | None:
        return distributed.shard_eval(loader)

    def prepare(self, model: nn.Module, train_model: nn.Module, val_model: nn.Module,
                info: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
        return self.dist.wrap(train_model), val_model

    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        return self.dist.wrap(module, find_unused_parameters)

    def split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x, y, w = batch
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, y, torch.as_tensor(w, dtype=torch.float32, device=self.device)

    def sync(self, model: nn.Module, step: bool) -> contextlib.AbstractContextManager:
        return distributed.gradient_sync(model, step)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, class_weight: torch.Tensor | None,
             label_smoothing: float) -> StepLoss:
        assert w is not None
        per = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing, weight=class_weight, reduction="none")
        # F.cross_entropy's mean divides by the summed class weights of the batch (the count without them).
        den_local = (w * (class_weight[y] if class_weight is not None else 1.0)).sum()
        num_local = (w * per).sum()
        num, den, real = self.dist.sum([float(num_local.detach()), float(den_local), float(w.sum())])
        finite = bool(torch.isfinite(torch.tensor(num))) and den > 0
        return StepLoss(num_local * self.dist.world / den, num / den if den else float("nan"), real, finite)

    def any(self, flag: bool) -> bool:
        return self.dist.sum([float(bool(flag))])[0] > 0

    def broadcast(self, obj: Any) -> Any:
        return self.dist.broadcast(obj)

    def barrier(self) -> None:
        self.dist.barrier()

    def keep_main_state(self, method: Method, model: nn.Module) -> None:
        method.load_trainable_state_dict(model, self.dist.broadcast(method.trainable_state_dict(model)))

    def collect(self, state: Callable[[], Any]) -> Any:
        return state() if self.main else None

    def report(self) -> dict[str, Any]:
        return {"processes": self.world}


class FullyShardedDP(DataParallel):
    """Several processes, each holding ``1/N`` of every parameter, gradient and AdamW moment (torch FSDP2)."""

    shards_model = True

    def prepare(self, model: nn.Module, train_model: nn.Module, val_model: nn.Module,
                info: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
        # The model itself: its own forward must run for the root unit to gather its parameters.
        blocks = fsdp_blocks(model)
        sharded = self.dist.shard(model, blocks)
        info["fsdp_units"] = len(blocks) + 1
        return sharded, sharded

    def unshard(self, model: nn.Module, method: Method, build: Callable[[], nn.Module]) -> nn.Module:
        """A plain model equal to the sharded ``model`` on every process: ``build()`` with its trained state.

        ``build`` rebuilds the run's model (same seed and weights, so the same frozen parameters); the trained
        ones are all-gathered into it. Each process then holds the whole model, as predict and serve do.
        """
        state = method.trainable_state_dict(model)  # a collective: every process gathers the whole tensors
        plain = build()
        method.load_trainable_state_dict(plain, state)
        return plain

    def collect(self, state: Callable[[], Any]) -> Any:
        whole = state()  # a collective: every process all-gathers the sharded tensors
        return whole if self.main else None


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP shards one by one (:func:`~visiontune.methods.targets.find_blocks`).

    Raises:
        ConfigError: the backbone's block layout is not one visiontune recognises.
    """
    layout = find_blocks(model)
    if layout is None:
        raise ConfigError(f"run.parallel=fsdp shards a backbone block by block, and {type(model).__name__} has no "
                          "block layout visiontune recognises; use run.parallel=ddp")
    return [model.get_submodule(n) for n in layout.names]


def launch(cfg: C, parallel: str = "ddp") -> tuple[OneProcess, C]:
    """The run start-up's first step, the same for training and pretraining: join the launcher's process group when
    there is one (:func:`visiontune.distributed.setup`), pick the strategy, and turn progress output off on every
    process but process 0.

    Args:
        cfg: the run's config (its ``run.device`` and ``run.progress`` are read).
        parallel: ``run.parallel`` (``ddp`` or ``fsdp``).

    Returns:
        (the strategy, ``cfg`` with ``run.progress=false`` on processes other than 0).
    """
    dist = distributed.setup(cfg.run.device, parallel)
    strategy = OneProcess(resolve_device(cfg.run.device)) if dist is None else current_strategy()
    if not strategy.main:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, progress=False))
    return strategy, cfg


def current_strategy(device: torch.device | None = None) -> OneProcess:
    """The strategy of this process: from the launcher's process group (:func:`visiontune.distributed.current`), or
    one process on ``device`` (the CPU when None)."""
    dist = distributed.current()
    if dist is None:
        return OneProcess(device or torch.device("cpu"))
    return FullyShardedDP(dist) if dist.sharded else DataParallel(dist)
