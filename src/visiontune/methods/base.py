"""The method plug-in interface.

A method is one module with a ``Config`` dataclass (a :class:`~visiontune.config.MethodConfig`
subclass) and a :class:`Method` subclass registered with :func:`register_method`, which puts it in
:data:`visiontune.registry.METHODS` and gives it its name. :mod:`visiontune.methods` imports every module
of its package, so adding a method touches no other file (the peft ``tuners/<method>/`` habit). The
training loop, the multi-adapter host (:mod:`visiontune.multi`) and the exporter only talk to this
interface: every capability they use is declared here with a default, so none of them probes a method
with ``hasattr``.

What a method decides:
  * which parameters train (``apply`` freezes/inserts modules; freezing walks module structure, the
    classifier is found through timm's ``get_classifier()``, never through name prefixes);
  * its default learning rates for the body and the head;
  * whether the backbone stays frozen so features can be cached (``feature_cache``);
  * whether it starts from pretrained weights (``pretrained``);
  * what is saved (``trainable_state_dict``) and how to fold itself away for inference (``merge``);
  * when ``feature_cache`` is set, how to fit on cached features instead of the gradient loop (``fit_cached``);
  * task-independent backbone surgery a multi-adapter host can share between tasks (``backbone_key``,
    ``prepare_backbone``), and facts for ``metrics.json`` (``report``).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from typing import Any, Callable, ClassVar, Iterable, TypeVar

import numpy as np
import torch
from torch import nn

from visiontune.backbones.weights import describe_key_problems
from visiontune.config import MethodConfig
from visiontune.distributed import copy_full, full_tensor
from visiontune.errors import WeightsError
from visiontune.registry import METHODS


def find_classifier(model: nn.Module) -> nn.Module | None:
    """The classification head of a timm model (through wrappers exposing ``get_classifier``), or None."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return head if isinstance(head, nn.Module) else None


def classifier_of(model: nn.Module) -> nn.Module:
    """The classification head of a timm model (works through wrappers exposing ``get_classifier``)."""
    head = find_classifier(model)
    if head is None:
        raise TypeError(f"{type(model).__name__} has no get_classifier(); visiontune needs a timm-style model")
    return head


def head_parameter_ids(model: nn.Module) -> set[int]:
    """``id()`` of every parameter of the classification head."""
    return {id(p) for p in classifier_of(model).parameters()}


def running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """BatchNorm running mean / variance / batch count of ``model``, by state-dict name."""
    return {
        f"{mn}.{bn}" if mn else bn: b
        for mn, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for bn, b in m.named_buffers(recurse=False)
        if b is not None
    }


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies, including a bitsandbytes 4-bit tensor's quantization state."""
    n = t.numel() * t.element_size()
    qs = getattr(t, "quant_state", None)
    if qs is not None and hasattr(qs, "as_dict"):
        n += sum(v.numel() * v.element_size() for v in qs.as_dict(packed=True).values() if torch.is_tensor(v))
    return n


def tensors_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors`` (:func:`tensor_bytes`), each tensor counted once however often it is listed."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> torch.Tensor | None:
    """``optim.class_weights``: None for "none"; for "balanced" ``n / (K n_c)`` per class (0 for absent classes)."""
    if mode == "none":
        return None
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(float)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def freeze(module: nn.Module) -> None:
    """Set ``requires_grad=False`` on every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(False)


def shared_copy(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` whose parameters and buffers are the original tensors (modules are new).

    Replacing, adding or removing modules in the copy leaves the original alone; writing into a
    shared tensor in place would change both.
    """
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class Method:
    """Base class of fine-tuning methods.

    Args:
        cfg: the method's own config dataclass instance.
    """

    name: ClassVar[str] = ""
    """Set by :func:`register_method`."""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    default_lr: ClassVar[float] = 1e-3
    default_head_lr: ClassVar[float] = 1e-3
    pretrained: ClassVar[bool] = True
    feature_cache: ClassVar[bool] = False
    starts_as_backbone: ClassVar[bool] = False
    """Before training, the method's model computes the pretrained backbone's own features (adapters whose output
    starts at zero, or nothing added): features taken from the plain backbone may then fit its LP-FT head
    (``train(head_features=...)``, what ``visiontune auto`` shares across folds)."""
    summary: ClassVar[str] = ""

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg
        # The device the run computes on, set by the training loop before apply() (None: wherever the model
        # is). A method that transforms weights does it there: 4-bit quantization of a 7B backbone takes
        # seconds on a GPU and many minutes with the CPU kernels, and the GPU never holds the fp32 weights.
        self.device: torch.device | None = None

    # ------------------------------------------------------------------ config
    @classmethod
    def check_config(cls, cfg: MethodConfig, sections: dict[str, Any]) -> list[str]:
        """Cross-section checks (e.g. a method that needs a ViT backbone); returns problems, never raises."""
        return []

    # ------------------------------------------------------------------ model surgery
    def apply(self, model: nn.Module) -> nn.Module:
        """Prepare ``model`` for training in place and return it (possibly wrapped).

        The default trains everything; subclasses freeze and/or insert adapter modules.
        """
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def apply_on_meta(self, model: nn.Module) -> list[str]:
        """Apply this method to a backbone built on the meta device, to validate a config before a run.

        ``visiontune sweep --dry-run`` builds every run's backbone on ``torch.device("meta")`` (shapes and
        module structure, no weights, no memory: a 7B ViT costs a fraction of a second) and calls this, so a
        method that cannot be placed on that architecture fails here rather than after the data is loaded and
        the first GPU hour is spent. The default is :meth:`apply`: structural surgery (freezing, inserting
        modules, peft injection) works on meta tensors. Methods with a step that needs real weights (4-bit
        quantization) override this to skip that step.

        Returns:
            What could not be checked on the meta device (empty when everything was).
        """
        self.apply(model)
        return []

    def param_groups(self, model: nn.Module, lr: float, head_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups: head vs body, and no weight decay on 1-d params (biases, norms, tokens)."""
        head_ids = head_parameter_ids(model)
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            is_head = id(p) in head_ids
            no_decay = p.ndim <= 1 or n.endswith(".bias") or "token" in n or "pos_embed" in n
            groups.setdefault((is_head, no_decay), []).append(p)
        out = []
        for (is_head, no_decay), params in groups.items():
            out.append(
                {
                    "params": params,
                    "lr": head_lr if is_head else lr,
                    "weight_decay": 0.0 if no_decay else weight_decay,
                    "name": ("head" if is_head else "body") + ("_no_decay" if no_decay else ""),
                }
            )
        return out

    # ------------------------------------------------------------------ saving
    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a run saves: every trained parameter (adapters, unfrozen params, head) and running statistics.

        BatchNorm running means/variances change whenever the model trains, even with frozen weights (LoRA
        on a ResNet), so they are part of what a run learned; without them a reloaded ResNet-18 predicts
        differently from the model that was evaluated.

        Sharded (FSDP) parameters are all-gathered: every process must call it then, and gets the whole tensors.
        """
        out = {n: full_tensor(p).detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        out.update({n: b.detach().cpu().clone() for n, b in running_stats(model).items()})
        return out

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`trainable_state_dict` back into a freshly ``apply``-ed model (or a sharded one: each
        process keeps its shard of every tensor).

        Raises:
            WeightsError: when keys are missing/unexpected or shapes differ (an adapter from another setup).
        """
        params = dict(model.named_parameters())
        stats = running_stats(model)
        tensors = {**params, **stats}
        expected = {n for n, p in params.items() if p.requires_grad}
        unexpected = sorted(set(state) - set(tensors))
        missing = sorted(expected - set(state))
        bad_shape = sorted(n for n in state if n in tensors and tensors[n].shape != state[n].shape)
        if unexpected or missing or bad_shape:
            shapes = [f"{n}: file {tuple(state[n].shape)} vs model {tuple(tensors[n].shape)}" for n in bad_shape]
            raise WeightsError(
                f"adapter weights do not fit this {self.name} model ({describe_key_problems(missing, unexpected, shapes)}); "
                "load them with the same backbone and method settings they were trained with (the run's config.yaml)"
            )
        absent = sorted(set(stats) - set(state))
        if absent:
            warnings.warn(
                f"the saved weights have no BatchNorm running statistics ({len(absent)} tensors, e.g. {absent[0]}): "
                "they were written before visiontune saved them; predictions use the backbone's "
                "own statistics and can differ from the ones reported at training time. Retrain to fix.",
                stacklevel=2,
            )
        with torch.no_grad():
            for n, t in state.items():
                copy_full(tensors[n], t)

    # ------------------------------------------------------------------ cached features
    def fit_cached(
        self, model: nn.Module, train: tuple[torch.Tensor, torch.Tensor, np.ndarray],
        val: tuple[torch.Tensor, torch.Tensor] | None, optim: Any, seed: int,
    ) -> dict[str, Any]:
        """Fit on cached backbone features instead of the gradient loop; called only when ``feature_cache``.

        Args:
            model: the applied model; the fit writes into its classifier.
            train: features, labels and per-row source-image groups of the training split.
            val: features and labels of the validation split, if any.
            optim: the run's ``optim`` section.
            seed: the run's seed.

        Returns:
            Facts about the fit for ``metrics.json``.
        """
        raise NotImplementedError(f"method {self.name!r} sets feature_cache but does not implement fit_cached")

    # ------------------------------------------------------------------ shared backbones
    def backbone_key(self) -> str:
        """Names the task-independent surgery :meth:`prepare_backbone` does ("" = none), so a multi-adapter host
        prepares one shared backbone per key (LoRA's q/k/v split, QLoRA's 4-bit weights)."""
        return ""

    def prepare_backbone(self, model: nn.Module) -> nn.Module:
        """Task-independent surgery on a backbone before :meth:`apply` (idempotent). Default: none."""
        return model

    def report(self) -> dict[str, Any]:
        """Facts about what :meth:`apply` did, for ``metrics.json`` (adapted modules, ranks, ...). Default: none."""
        return {}

    # ------------------------------------------------------------------ inference
    def merge(self, model: nn.Module) -> nn.Module:
        """Return a model for fast inference (adapters folded in where the method allows). Default: as is."""
        return model

    def load_merged(self, backbone: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module | None:
        """The merged inference model of a saved run, built from ``state`` on a fresh ``backbone`` without
        :meth:`apply`, or None: the caller then applies, loads (:meth:`load_trainable_state_dict`) and merges.

        For methods whose training structure needs a heavy package that the merged model does not (LoRA's peft
        layers), so that predicting with, evaluating or exporting a run does not import it. Whatever the saved
        tensors do not fit exactly must give None, never an error: the ordinary path then reports it.
        ``backbone`` may be changed even when None is returned. Default: None.
        """
        return None

    def describe(self) -> str:
        """Short human description used in reports, e.g. ``lora r8 qv``."""
        return self.name


M = TypeVar("M", bound=type[Method])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`Method` subclass in ``METHODS`` under ``name`` and name it.

    The name is written once, here; the method's ``config_cls`` must default its ``name`` field to it
    (checked, so the two cannot drift apart).

    Raises:
        ValueError: ``name`` is taken, or the config class defaults to another name.
    """

    def add(cls: M) -> M:
        default = cls.config_cls().name
        if default != name:
            raise ValueError(
                f"method {name!r}: {cls.config_cls.__name__}.name defaults to {default!r}; "
                f"declare `name: str = {name!r}` in the config class"
            )
        cls.name = name
        return METHODS.register(name)(cls)

    return add
