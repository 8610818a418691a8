"""Several task adapters over one backbone in memory: each task has its own head and label set.

Design (generic over methods, no per-method code): the host keeps one frozen backbone. A task model
is ``copy.deepcopy(backbone, memo)`` where the memo maps every backbone parameter and buffer to
itself, so the copy gets new *modules* but the *same* frozen tensors; the task's method then runs
its ordinary ``apply`` on the copy (inserting its adapter modules, a new head) and loads its adapter
file with ``load_trainable_state_dict``, exactly as :func:`visiontune.runs.load_run` does. Anything
the task loads is first made private to it, so a method that trains backbone weights (``full``)
still works - it just shares nothing.

Methods declare task-independent backbone surgery through two members of the
:class:`~visiontune.methods.Method` interface: ``backbone_key() -> str`` and ``prepare_backbone(model) -> model``
(LoRA's qkv split, QLoRA's NF4 quantization). The host runs that surgery once per distinct key on a shared
copy and builds every task with that key from it, so ten QLoRA tasks share one 4-bit backbone. Methods that
keep the defaults (key ``""``: linear probe, Mona, full) use the plain backbone.

Each call names its task; tasks are separate module trees over shared tensors, so there is no
"active adapter" state to switch and calls for different tasks can interleave freely. Adapters stay
unmerged (merging would write into the shared weights).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from visiontune.errors import ConfigError, WeightsError
from visiontune.precisions import HOST_PRECISIONS
from visiontune.methods.base import Method, shared_copy, tensors_bytes
from visiontune.data.bands import BandSpec
from visiontune.backbones import backbone_identity, build_transform, create_backbone, set_band_preprocessing
from visiontune.config import load_config
from visiontune.registry import METHODS
from visiontune.runs import ADAPTER_FILE, check_identity, read_adapter, run_labels
from visiontune.runtime import autocast, inference_dtype


def _storage_ptrs(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in itertools.chain(module.parameters(), module.buffers()) if t.numel()}


def _make_private(model: nn.Module, keys: list[str], shared: set[int]) -> None:
    """Replace each named parameter/buffer that is a shared backbone tensor by a private copy."""
    for key in keys:
        owner_name, _, attr = key.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            continue  # unknown key: load_trainable_state_dict reports it with a clear message
        if attr in owner._parameters and owner._parameters[attr] is not None and id(owner._parameters[attr]) in shared:
            p = owner._parameters[attr]
            owner._parameters[attr] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        elif attr in owner._buffers and owner._buffers[attr] is not None and id(owner._buffers[attr]) in shared:
            owner._buffers[attr] = owner._buffers[attr].clone()


@dataclass
class Task:
    """One task of an :class:`AdapterHost`: its model (sharing the backbone), method and labels."""

    name: str
    model: nn.Module
    method: Method
    classes: list[str]
    backbone_key: str
    shared_tensors: int
    private_bytes: int
    source: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def check_host_precision(precision: str) -> None:
    """Raises ConfigError unless ``precision`` is one of :data:`HOST_PRECISIONS`."""
    if precision not in HOST_PRECISIONS:
        raise ConfigError(f"precision {precision!r} is invalid for an adapter host; use {' or '.join(HOST_PRECISIONS)}")


class TaskHost:
    """What the service needs of an adapter host: named tasks (``self.tasks``), each with its label names,
    and the ``precision`` its models compute in. :class:`AdapterHost` (PyTorch, one shared backbone) and
    :class:`visiontune.infer.backends.ExportHost` (onnxruntime exports) both build on it."""

    tasks: dict[str, Any]
    precision: str

    def _task(self, name: str) -> Any:
        if name not in self.tasks:
            raise KeyError(f"no task {name!r}; loaded tasks: {', '.join(self.tasks) or 'none'}")
        return self.tasks[name]

    def classes(self, name: str) -> list[str]:
        """Label names of a task, in logit order."""
        return list(self._task(name).classes)


class AdapterHost(TaskHost):
    """One frozen backbone, several task adapters; every call names the task.

    Args:
        backbone: a timm model (any head; each task gets its own).
        identity: the backbone identity (``visiontune.backbones.backbone_identity``); adapters trained on
            another backbone are refused.
        device: where the backbone and tasks live.
        transform: eval transform for raw images (optional; :meth:`from_runs` sets it).

    Example::

        host = AdapterHost.from_runs({"cows": "runs/a", "solar": "runs/b"})
        host.predict("solar", batch)   # -> list of labels of the solar task
    """

    def __init__(
        self, backbone: nn.Module, identity: dict[str, Any], device: str | torch.device = "cpu",
        transform: Callable[[Any], torch.Tensor] | None = None, precision: str = "fp32",
    ):
        check_host_precision(precision)
        self.device = torch.device(device)
        self.precision = precision
        # Every task computes in this precision (bf16: autocast, see visiontune.runtime.inference_dtype).
        self.amp = inference_dtype(precision, "fp32", self.device)
        self.identity = dict(identity)
        self.transform = transform
        backbone.requires_grad_(False)
        self._bases: dict[str, nn.Module] = {"": backbone.to(self.device).eval()}
        self.tasks: dict[str, Task] = {}
        # For a random-init backbone (weights=none): (run.seed, number of classes) it was drawn with (see from_runs).
        self.random_init: tuple[int, int] | None = None
        # Multi-band runs: the bands and statistics every task's preprocessing uses (None: photos).
        self.band_spec: BandSpec | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_runs(cls, runs: dict[str, str | Path], device: str | torch.device = "cpu", precision: str = "fp32") -> AdapterHost:
        """A host for finished run directories (``{task name: run dir}``), built on the first run's backbone.

        ``precision``: ``fp32`` (default) or ``bf16`` autocast for every task.

        Raises:
            ConfigError: no runs, or a path that is not a run directory. WeightsError: a run trained on
                another backbone (name, weights hash or image size differ).
        """
        if not runs:
            raise ConfigError("AdapterHost.from_runs needs at least one {task name: run directory}")
        first_name, first_dir = next(iter(runs.items()))
        cfg = load_config(_config_path(first_dir))
        classes = run_labels(first_dir)
        identity = backbone_identity(cfg.backbone)
        with torch.random.fork_rng(devices=[]):
            if identity.get("weights") == "none":
                # A random-init backbone is only reproducible from the run's seed: train() seeds torch with
                # run.seed and builds the backbone (head size included) before drawing any other torch number.
                torch.manual_seed(cfg.run.seed)
            backbone = create_backbone(cfg.backbone, num_classes=len(classes))
        set_band_preprocessing(backbone, cfg.data.band_spec())
        transform = build_transform(backbone, train=False)  # the backbone records backbone.img_size
        host = cls(backbone, identity, device=device, transform=transform, precision=precision)
        host.band_spec = cfg.data.band_spec()
        if identity.get("weights") == "none":
            host.random_init = (cfg.run.seed, len(classes))
        for name, run_dir in runs.items():
            host.add_run(name, run_dir)
        return host

    def add_run(self, name: str, run_dir: str | Path) -> Task:
        """Add the task of a finished run directory (refused if trained on another backbone)."""
        run_dir = Path(run_dir)
        cfg = load_config(_config_path(run_dir))
        state, meta = read_adapter(run_dir / ADAPTER_FILE)
        classes = run_labels(run_dir, meta)
        check_identity(meta.get("backbone_identity", {}), self.identity, f"task {name!r} ({run_dir / ADAPTER_FILE})")
        if self.identity.get("weights") == "none" and (cfg.run.seed, len(classes)) != self.random_init:
            raise WeightsError(
                f"task {name!r} ({run_dir}) was trained on a random-init backbone (backbone.weights=none) drawn with "
                f"run.seed={cfg.run.seed} and {len(classes)} classes, but this host's backbone was drawn with "
                f"(run.seed, classes)={self.random_init}; timm's random init depends on both, so only such runs can "
                "share a host; train with pretrained weights to host any mix"
            )
        if cfg.data.band_spec() != self.band_spec:
            raise WeightsError(
                f"task {name!r} ({run_dir}) reads {cfg.data.channels or 'RGB'} bands (data.bands={cfg.data.bands}) with its "
                "own per-band statistics, unlike this host's first run; the tasks of one host share one preprocessing, "
                "so serve it from its own host"
            )
        method = METHODS.get(cfg.method.name)(cfg.method)
        return self.add(name, method, state, classes, source=str(run_dir))

    def add(
        self, name: str, method: Method, state: dict[str, torch.Tensor], classes: list[str], source: str | None = None,
    ) -> Task:
        """Add a task from a method instance, its trainable state dict and its labels.

        Raises:
            ValueError: duplicate task name. WeightsError: the state does not fit (from the method).
        """
        if name in self.tasks:
            raise ValueError(f"task {name!r} is already loaded; remove it first or pick another name")
        key, base = self._base_for(method)
        model = shared_copy(base)
        if not hasattr(model, "reset_classifier"):
            raise TypeError(f"{type(model).__name__} has no reset_classifier(); the host needs a timm model")
        model.reset_classifier(len(classes))
        model = method.apply(model)
        shared = {id(t) for t in itertools.chain(base.parameters(), base.buffers())}
        _make_private(model, list(state), shared)
        method.load_trainable_state_dict(model, state)
        base.requires_grad_(False)  # an apply that unfreezes (full) must not leave the shared tensors trainable
        model = model.to(self.device).eval()
        base_ptrs = _storage_ptrs(base)
        own = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.untyped_storage().data_ptr() not in base_ptrs]
        task = Task(
            name=name, model=model, method=method, classes=list(classes), backbone_key=key,
            shared_tensors=len(_storage_ptrs(model) & base_ptrs),
            private_bytes=tensors_bytes(own), source=source,
            info=method.report(),
        )
        self.tasks[name] = task
        return task

    def _base_for(self, method: Method) -> tuple[str, nn.Module]:
        key = method.backbone_key()
        if key not in self._bases:
            base = shared_copy(self._bases[""])
            base = method.prepare_backbone(base)
            base.requires_grad_(False)
            self._bases[key] = base.to(self.device).eval()
        return key, self._bases[key]

    def remove(self, name: str) -> None:
        """Drop a task (its private tensors are freed; the backbone stays)."""
        self._task(name)
        del self.tasks[name]

    # ------------------------------------------------------------------ inference
    def transform_for(self, name: str) -> Callable[[Any], torch.Tensor] | None:
        """The preprocessing of task ``name``: the shared backbone's, the same for every task."""
        self._task(name)
        return self.transform

    @torch.inference_mode()
    def logits(self, name: str, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes of the task] for a batch of preprocessed images [B, 3, H, W] (on CPU)."""
        with autocast(self.device, self.amp):
            return self._task(name).model(images.to(self.device)).float().cpu()

    def predict(self, name: str, images: torch.Tensor) -> list[str]:
        """Predicted label of each image for task ``name``."""
        classes = self._task(name).classes
        return [classes[i] for i in self.logits(name, images).argmax(1).tolist()]

    def memory(self) -> dict[str, Any]:
        """Bytes of each prepared backbone and each task's private tensors (adapters + head); 4-bit weights
        count with their quantization state (:func:`~visiontune.methods.base.tensor_bytes`)."""
        return {
            "backbones": {
                k or "plain": tensors_bytes(itertools.chain(b.parameters(), b.buffers())) for k, b in self._bases.items()
            },
            "tasks": {n: t.private_bytes for n, t in self.tasks.items()},
        }


def _config_path(run_dir: str | Path) -> Path:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a visiontune run directory (no config.yaml); pass runs/<name>")
    return path
