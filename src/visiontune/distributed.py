"""Data-parallel runs: ``visiontune train``, ``eval``, ``pretrain`` and ``predict`` unchanged under ``torchrun`` / ``accelerate launch``.

When a launcher starts N processes (``WORLD_SIZE`` > 1 in the environment), :func:`setup` creates an
accelerate ``Accelerator``: it joins the process group the launcher describes (gloo on CPU, nccl on
CUDA), picks each process's device (its ``LOCAL_RANK``'s GPU) and wraps the trained module in torch
DDP (:meth:`Dist.wrap`). A single process never reaches this module's collectives: every helper
returns its input unchanged when no launcher is present, so one-process runs behave exactly as before.

What accelerate's own data-loader preparation does not give, written here by hand:

* **The same global batch as one process.** ``optim.batch_size`` stays the *global* batch. Every
  process draws the one-process shuffled order (the same seeded generator, the same ``DataLoader``
  draws, so the same permutation) and takes its contiguous share of each global batch:
  ``ceil(B / N)`` images, the last batch split as evenly as possible. A process whose share is
  short gets zero-weight copies of an image of that batch (so every process runs the same number of
  forward/backward passes, which DDP needs), and each process's loss is its share of the *global*
  batch's mean (:class:`visiontune.train.strategy.DataParallel`), so after DDP's gradient average the step equals the
  one-process step up to float rounding. accelerate's ``even_batches`` instead pads with duplicate
  images that count in the loss, and ``split_batches`` requires B divisible by N.
* **Every evaluation image exactly once.** Evaluation loaders are split into N contiguous, unpadded
  ranges (:func:`shard_eval`); each process scores its range and :func:`gather_in_order` all-gathers
  the variable-length results and concatenates them in rank order, which is the dataset's order.
  Every process then holds the same full predictions, so metrics and the best-epoch choice agree on
  all processes. accelerate's ``gather_for_metrics`` drops padding by count, which relies on the
  padding being at the end of the last batch; contiguous ranges need no padding at all.
* **Whole-batch statistics.** Pretraining's losses are not all per-image means: the teacher centering
  and Sinkhorn-Knopp sum over the batch (:func:`all_reduce`) and KoLeo looks for nearest neighbours in
  it (:func:`gather_rows`). Its loader takes :func:`shard_batches` of the one-process batch stream.

**FSDP** (``run.parallel=fsdp``, ``visiontune train`` only): :meth:`Dist.shard` applies torch's FSDP2
``fully_shard`` to every block and then to the model, so each process keeps ``1/N`` of every parameter,
gradient and AdamW moment (DTensors) and all-gathers a block's parameters around its forward and backward.
torch directly, not accelerate: accelerate 1.15 turns FSDP on only for GPU process groups (its
``MULTI_CPU`` type stays DDP), and it wraps by its own policy where visiontune names the blocks. Every
forward is then a collective, so the padded evaluation loaders give every process the same number of
batches (:class:`ShardedEvalLoader`); gradient accumulation uses ``set_requires_gradient_sync``
(:func:`gradient_sync`); ``clip_grad_norm_`` reduces DTensor gradients' norm over processes by itself.
Whatever is saved goes through :func:`full_tensor` / :func:`full_state` (all-gathered, on the CPU), and
loaded back through :func:`copy_full` / :func:`load_optimizer_state`, so checkpoints and adapter files
are the one-process format: the optimizer's state stays keyed by parameter position, as
``optimizer.state_dict()`` writes it, where torch's ``get_optimizer_state_dict`` would key it by name.

The training loop itself is not here: :func:`visiontune.train.loop.train_one_epoch` is the one loop of one
process and many, and :mod:`visiontune.train.strategy` holds what differs. Why this module is longer than ~500
lines: every helper in it reads the one process-wide context (:func:`current`, which tests replace) or works on
what that context shards; one module keeps that state and its readers together.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm.auto import tqdm

from visiontune.errors import ConfigError

T = TypeVar("T")

RANK_SEED_STRIDE = 1_000_003
"""Process ``r`` draws its augmentations from seed ``run.seed + r * RANK_SEED_STRIDE`` (process 0: ``run.seed``)."""


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun and accelerate launch set for every process besides WORLD_SIZE."""


def launched_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; start with torchrun or "
                          "accelerate launch, which set it") from None


@dataclass
class Dist:
    """This process's place in a data-parallel run."""

    accelerator: Any
    rank: int
    world: int
    device: torch.device
    sharded: bool = False
    """``run.parallel=fsdp``: the trained model is sharded (:meth:`shard`) and evaluation loaders are padded."""

    @property
    def main(self) -> bool:
        """Process 0: the one that writes files and prints."""
        return self.rank == 0

    def rank_seed(self, seed: int) -> int:
        return seed + self.rank * RANK_SEED_STRIDE

    def wrap(self, model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """``model`` in torch DDP (through accelerate): gradients averaged over processes in ``backward``.

        DDP broadcasts process 0's parameters and buffers on construction, so every process starts
        from the same weights even if something random happened differently before.

        Args:
            find_unused_parameters: DDP's option for a forward that leaves some trainable parameters out of
                the graph in some steps (pretraining's head warm-up runs the backbone without gradients).
                Parameters no process used keep ``grad=None``, as in one process, so AdamW skips them.
        """
        from accelerate.utils import DistributedDataParallelKwargs

        acc = self.accelerator
        handler = acc.ddp_handler
        if find_unused_parameters:  # accelerate reads its DDP kwargs from this handler in prepare_model
            acc.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
        try:
            return acc.prepare_model(model, device_placement=False)
        finally:
            acc.ddp_handler = handler

    def shard(self, model: nn.Module, blocks: Sequence[nn.Module]) -> nn.Module:
        """``model`` sharded in place with FSDP2: each of ``blocks``, then the rest as the root unit.

        Every unit, the root included, reshards after its forward, so between forwards every parameter is
        a sharded DTensor (what :func:`full_tensor` and :func:`copy_full` expect), also after an evaluation
        pass that has no backward to reshard the root. Gradients are averaged over processes, as under DDP.

        Args:
            model: the module whose ``forward`` the loop calls (its own ``__call__`` must run, since the root
                unit all-gathers its parameters in a forward pre-hook).
            blocks: submodules run one after another (transformer blocks): one all-gather each, so only one
                block's full parameters are held at a time.
        """
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        for p in model.parameters():  # FSDP2 shards contiguous tensors only; channels-last weights are not
            p.data = p.data.contiguous()
        mesh = init_device_mesh(self.device.type, (self.world,))
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        return fully_shard(model, mesh=mesh, reshard_after_forward=True)

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj`` on every process."""
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over processes (float64)."""
        return all_reduce(torch.tensor(list(values), dtype=torch.float64, device=self.device)).tolist()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


_CURRENT: Dist | None = None


def current() -> Dist | None:
    """The data-parallel context of this process (None in a one-process run)."""
    return _CURRENT


def is_main() -> bool:
    """Whether this process prints and writes (always in a one-process run)."""
    return _CURRENT is None or _CURRENT.main


def setup(device: str, parallel: str = "ddp") -> Dist | None:
    """Join the launcher's process group when there is one (``WORLD_SIZE`` > 1); None otherwise.

    Args:
        device: ``run.device``. ``cpu`` runs every process on the CPU (gloo); ``auto`` / ``cuda`` give
            process ``r`` the GPU of its ``LOCAL_RANK`` (nccl), or the CPU when there is no GPU (auto).
        parallel: ``run.parallel`` (``ddp`` or ``fsdp``, see :attr:`Dist.sharded`); a one-process run
            ignores it, with a warning for ``fsdp``.
    """
    global _CURRENT
    world = launched_world_size()
    if world <= 1:
        if parallel == "fsdp":
            warnings.warn("run.parallel=fsdp in one process: nothing to shard, the run trains as usual; start "
                          "several processes with torchrun to shard the model", stacklevel=2)
        return None
    if _CURRENT is not None:
        _CURRENT.sharded = parallel == "fsdp"
        return _CURRENT
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(
            f"run.device={device!r} under a launcher with {world} processes: each process takes the GPU of its "
            "LOCAL_RANK, so use run.device=cuda (or auto, or cpu); pick GPUs with CUDA_VISIBLE_DEVICES"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is available; use run.device=cpu or auto")
    missing = [k for k in LAUNCHER_VARIABLES if not os.environ.get(k)]
    if missing:  # a WORLD_SIZE left in the shell: joining would wait for processes that never come, or fail deep down
        raise ConfigError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not, so no "
            "launcher started this process; unset WORLD_SIZE for one process, or start with torchrun / accelerate launch"
        )
    from accelerate import Accelerator

    acc = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available())
    dev = acc.device if acc.device.type != "cpu" else torch.device("cpu")
    _CURRENT = Dist(acc, acc.process_index, acc.num_processes, dev, sharded=parallel == "fsdp")
    return _CURRENT


def finish(ok: bool) -> None:
    """End this process's part in a launched run: wait for every process, then leave the process group.

    Called by the CLI after each command. A process that returned from its last collective while
    another was still inside it (``predict``: process 1 hands its results to process 0 and is done)
    would otherwise exit with gloo's threads still running, and the C++ runtime aborts it
    ("terminate called without an active exception", exit -6). After an error (``ok`` False) no
    barrier is entered, since the other processes may never reach it; the group is still left.
    """
    global _CURRENT
    dist = _CURRENT
    if dist is None:
        return
    if ok:
        dist.barrier()
    dist.accelerator.end_training()
    _CURRENT = None


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Element-wise ``sum`` or ``max`` of ``t`` over processes, as a new tensor (``t`` itself without a launcher)."""
    dist = _CURRENT
    if dist is None:
        return t
    out = t.detach().clone()
    torch.distributed.all_reduce(out, op={"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op])
    return out


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's ``x`` concatenated in rank order (``x`` itself without a launcher).

    This process's rows keep their autograd graph; the others' are constants. A loss over the whole
    batch computed from the result on every process (KoLeo's nearest neighbours) then backpropagates
    into each process's own rows only, and DDP's average of the N processes' gradients, each of the
    loss times N, is the one-process gradient.
    """
    dist = _CURRENT
    if dist is None:
        return x
    parts = dist.all_gather(x.detach().cpu())
    parts[dist.rank] = x
    return torch.cat([p.to(x.device) for p in parts])


def share(m: int, rank: int, world: int) -> range:
    """Process ``rank``'s contiguous share of ``m`` items: ``[rank m / world, (rank + 1) m / world)``."""
    return range(rank * m // world, (rank + 1) * m // world)


def my_share(m: int) -> range:
    """This process's contiguous share of ``m`` items (all of them without a launcher)."""
    return range(m) if _CURRENT is None else share(m, _CURRENT.rank, _CURRENT.world)


def check_global_batch(batch: int, world: int, setting: str = "optim.batch_size") -> None:
    """Raise unless the global batch gives every one of ``world`` processes at least one image."""
    if batch < world:
        raise ConfigError(
            f"{setting}={batch} is the global batch, split over {world} processes; it must be at least "
            f"{world}: raise {setting} or start fewer processes"
        )


# ----------------------------------------------------------------------------- evaluation: each image once


class ShardedEvalLoader(DataLoader):
    """A loader over this process's contiguous range of ``total`` images (see :func:`gather_in_order`).

    With ``padded_batches`` set (FSDP, whose every forward is a collective), it yields that many batches
    whatever its range's size: its own, then one-image copies of the dataset's first image, whose outputs
    :func:`gather_in_order` drops.
    """

    total: int
    padded_batches: int = 0

    def __len__(self) -> int:
        return max(super().__len__(), self.padded_batches)

    def __iter__(self) -> Iterator[Any]:
        yield from super().__iter__()
        pad = self.padded_batches - super().__len__()
        if pad > 0:
            dummy = self.collate_fn([self.dataset.dataset[0]])  # type: ignore[attr-defined]
            yield from [dummy] * pad


def shard_eval(loader: DataLoader | None) -> DataLoader | None:
    """This process's contiguous, unpadded range of an evaluation loader (the loader itself without a launcher).

    Process ``r`` of ``N`` gets images ``[r n / N, (r + 1) n / N)``; concatenating the ranges in rank order
    gives back the dataset's order. Under FSDP every process's loader yields as many batches as the
    longest range needs (:class:`ShardedEvalLoader`).
    """
    dist = _CURRENT
    if dist is None or loader is None or isinstance(loader, ShardedEvalLoader):
        return loader
    n = len(loader.dataset)
    out = ShardedEvalLoader(
        Subset(loader.dataset, share(n, dist.rank, dist.world)), batch_size=loader.batch_size, shuffle=False,
        num_workers=loader.num_workers, persistent_workers=loader.num_workers > 0, collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )
    out.total = n
    if dist.sharded:
        bs = int(loader.batch_size or 1)
        out.padded_batches = max(-(-len(share(n, r, dist.world)) // bs) for r in range(dist.world))
    return out


def gather_in_order(loader: DataLoader, *parts: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``torch.cat`` of each list of per-batch tensors; from a :class:`ShardedEvalLoader`, of every process's.

    Each process contributes its range (possibly empty; the outputs of padding batches are dropped); the
    result, the same on every process, has exactly one row per image of the whole dataset, in dataset order.

    Raises:
        RuntimeError: the gathered rows are not the dataset's size (a process scored another range).
    """
    if not isinstance(loader, ShardedEvalLoader):
        return tuple(torch.cat(p) for p in parts)
    dist = _CURRENT
    assert dist is not None, "a ShardedEvalLoader exists only in a data-parallel run"
    own = DataLoader.__len__(loader)  # the batches of this process's range; any after them are padding
    local = [torch.cat(p[:own]) if p[:own] else None for p in parts]
    gathered = dist.all_gather(local)
    out = []
    for j in range(len(parts)):
        pieces = [g[j] for g in gathered if g[j] is not None]
        full = torch.cat(pieces)
        if len(full) != loader.total:
            raise RuntimeError(f"gathered {len(full)} rows from {dist.world} processes for {loader.total} images")
        out.append(full)
    return tuple(out)


def my_items(items: Sequence[T]) -> Sequence[T]:
    """This process's contiguous share of ``items`` (``items`` itself without a launcher); see :func:`in_order`."""
    if _CURRENT is None:
        return items
    r = my_share(len(items))
    return items[r.start:r.stop]


def in_order(results: Iterable[T]) -> Iterator[T]:
    """On process 0, every process's ``results`` in rank order, which is input order for :func:`my_items` shares.

    Process 0 yields its own results as they come (a CSV writer streams them), then the other
    processes' (gathered once its own are done; they are held in memory until then, the images are
    not). The other processes yield nothing: iterating them to the end hands their results to process 0.
    """
    dist = _CURRENT
    if dist is None:
        yield from results
        return
    if dist.main:
        yield from results
        gathered: list[Any] = [None] * dist.world
        torch.distributed.gather_object([], gathered, dst=0)
        for part in gathered[1:]:
            yield from part
    else:
        torch.distributed.gather_object(list(results), None, dst=0)


# ----------------------------------------------------------------------------- FSDP: full tensors in, full tensors out


def _loaded(module: str, name: str) -> type | None:
    """Class ``name`` of ``module`` if that module is imported already, else None.

    A DTensor or an FSDP-sharded module exists only once ``torch.distributed.tensor`` / ``torch.distributed.fsdp``
    has been imported (by :meth:`Dist.shard`), so the checks below ask ``sys.modules`` instead of importing them:
    that import costs ~2 s on a 2-core CPU, and every command that loads a method (``visiontune list methods``,
    ``predict``) would pay it.
    """
    return getattr(sys.modules.get(module), name, None)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a sharded DTensor (without importing ``torch.distributed.tensor``)."""
    cls = _loaded("torch.distributed.tensor", "DTensor")
    return cls is not None and isinstance(t, cls)


def is_fsdp(model: Any) -> bool:
    """Whether ``model`` was sharded with FSDP2's ``fully_shard`` (without importing ``torch.distributed.fsdp``)."""
    cls = _loaded("torch.distributed.fsdp", "FSDPModule")
    return cls is not None and isinstance(model, cls)


def _distribute_like(src: torch.Tensor, dst: Any) -> Any:
    """``src`` (the whole value) as a DTensor sharded like ``dst``: this process's slice, no communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(src, dst.device_mesh, dst.placements, src_data_rank=None)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor's whole value (an all-gather: every process calls it, in the same order); else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def full_state(state: Any) -> Any:
    """``state`` (nested dicts / lists, e.g. ``optimizer.state_dict()``) with every DTensor all-gathered to the CPU.

    Without DTensors it is returned as it is; with them every process must call it (same structure, same order).
    """
    if is_dtensor(state):
        return state.full_tensor().cpu()
    if isinstance(state, dict):
        return {k: full_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(full_state(v) for v in state)
    return state


def copy_full(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy the whole value ``src`` into ``dst`` (a sharded DTensor: this process's shard of ``src``), in place."""
    src = src.to(dtype=dst.dtype, device=dst.device)
    if is_dtensor(dst):  # every process holds all of src: each slices its own shard, no communication
        src = _distribute_like(src, dst)
    dst.copy_(src)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict`` of a one-process state (:func:`full_state`), sharded like its parameters.

    ``load_state_dict`` moves each moment to its parameter's device as a plain tensor; for a sharded
    parameter it becomes that parameter's shard again, as AdamW's DTensor arithmetic needs.
    """
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_dtensor(p):
                continue
            moments = optimizer.state.get(p, {})
            for k, v in moments.items():
                if torch.is_tensor(v) and not is_dtensor(v) and v.shape == p.shape:
                    moments[k] = _distribute_like(v, p)


def without_grad(model: nn.Module) -> contextlib.AbstractContextManager:
    """``torch.inference_mode`` for an evaluation pass of ``model``; ``torch.no_grad`` if it is FSDP-sharded.

    FSDP keeps the buffers it all-gathers parameters into from one forward to the next: allocated under
    inference mode they would be inference tensors, which the next training step may not write into.
    """
    return torch.no_grad() if is_fsdp(model) else torch.inference_mode()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Backward passes inside average gradients over processes only if ``sync`` (else they accumulate locally).

    DDP's ``no_sync``, or FSDP2's ``set_requires_gradient_sync`` (unsharded gradients accumulate until the
    backward that ends the group reduce-scatters them).
    """
    if sync:
        yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


# ----------------------------------------------------------------------------- training: the same global batch


class GlobalBatchShards(Sampler[list[int]]):
    """This process's share of each global batch of the one-process shuffled order.

    The order comes from a ``DataLoader(range(n), batch_size, shuffle=True)`` with a generator seeded
    like the one-process loader's, so it draws the same permutation with ``data.num_workers=0`` (checked by a
    test; with persistent workers the one-process loader draws differently after epoch 1). A short
    share is topped up with ``-(i + 1)`` entries: zero-weight copies of image ``i`` (:class:`_Weighted`).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.order = DataLoader(range(n), batch_size=batch_size, shuffle=True, generator=self.generator)
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[list[int]]:
        # Through tqdm.auto like the one-process loop's batches: its asyncio class opens the DataLoader twice
        # (once in __init__, once in __iter__), so each epoch draws two worker base seeds from the generator
        # before the permutation. Iterating the order loader the same way keeps the same permutation.
        for batch in tqdm(self.order, disable=True):
            idx = batch.tolist()
            m = len(idx)
            mine = [idx[j] for j in share(m, self.rank, self.world)]
            yield mine + [-(idx[0] + 1)] * (-(-m // self.world) - len(mine))


class BatchShares(Sampler[list[int]]):
    """This process's contiguous share of each global batch an (endless) batch sampler yields; no padding.

    For loops that call forward/backward once per global batch whatever its share's size (pretraining):
    with every global batch at least ``world`` long, no share is empty.
    """

    def __init__(self, batches: Iterable[list[int]], rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield [batch[j] for j in share(len(batch), self.rank, self.world)]


def shard_batches(batches: Iterable[list[int]]) -> Iterable[list[int]]:
    """This process's :class:`BatchShares` of ``batches`` (``batches`` itself without a launcher)."""
    dist = _CURRENT
    return batches if dist is None else BatchShares(batches, dist.rank, dist.world)


class _Weighted(Dataset):
    """``(x, y, 1.0)`` for an index ``i >= 0``; ``(x, y, 0.0)`` of image ``-(i + 1)`` for a padding entry."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, float]:
        if index < 0:
            x, y = self.dataset[-index - 1]
            return x, y, 0.0
        x, y = self.dataset[index]
        return x, y, 1.0


class ShardedTrainLoader(DataLoader):
    """Batches of this process's shares (:class:`GlobalBatchShards`) with a weight per image.

    ``order_generator`` drives the shared order (stored in checkpoints); the loader's own
    ``generator`` (seeded per process) only seeds DataLoader workers.
    """

    order_generator: torch.Generator


def shard_train(loader: DataLoader, seed: int, rank_seed: int) -> DataLoader:
    """The data-parallel counterpart of a shuffled training loader (``optim.batch_size`` = the global batch).

    Args:
        loader: the one-process training loader (its dataset, batch size and workers are reused).
        seed: ``run.seed`` (the shared order).
        rank_seed: this process's seed (worker augmentation seeds).
    """
    dist = _CURRENT
    if dist is None:
        return loader
    batch = int(loader.batch_size or 1)
    check_global_batch(batch, dist.world)
    sampler = GlobalBatchShards(len(loader.dataset), batch, seed, dist.rank, dist.world)
    out = ShardedTrainLoader(
        _Weighted(loader.dataset), batch_sampler=sampler, num_workers=loader.num_workers,
        persistent_workers=loader.num_workers > 0, generator=torch.Generator().manual_seed(rank_seed),
    )
    out.order_generator = sampler.generator
    return out
