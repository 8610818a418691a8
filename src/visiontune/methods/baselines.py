"""Baseline methods: ``linear`` (frozen features + linear head), ``full`` (everything trains),
``scratch`` (everything trains from random init, e.g. ResNet-18 / ViT-S as in the DINOv3 cow study).

The linear probe never runs the backbone during head training: features of every image (and of
``views - 1`` extra augmented views per training image) are computed once, then a multinomial
logistic regression is fitted on them. By default that fit is L-BFGS logistic regression with the L2
strength chosen on the validation split, or by stratified k-fold cross-validation on the training
features when there is no validation split (so the default holds across datasets instead of being
tuned to one). ``solver=adamw`` trains the head with the run's optimiser settings instead.
The fit minimises scikit-learn's ``LogisticRegression`` objective with scipy's L-BFGS-B, all CV folds
and every C as stacked problems (:mod:`visiontune.methods.logreg`, which says why); written here is the
C selection over grouped folds (scikit-learn's ``StratifiedGroupKFold``; views of one image never
straddle folds) and folding the feature standardisation back into a plain ``nn.Linear`` head, so
inference needs neither library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from visiontune.config import MethodConfig, OptimConfig
from visiontune.methods.base import Method, class_weights, classifier_of, freeze, register_method
from visiontune.methods.logreg import fit_path
from visiontune.runtime import warmup_cosine

_C_GRID = [10.0**e for e in np.arange(-3.0, 2.01, 0.5)]


@dataclass
class LinearConfig(MethodConfig):
    """Options of the linear probe."""

    name: str = "linear"
    views: int = field(default=1, metadata={"help": "cached views per training image: 1 = the eval view only; >1 adds augmented views"})
    solver: Literal["lbfgs", "adamw"] = field(
        default="lbfgs", metadata={"help": "lbfgs: logistic regression to convergence (C chosen by val/CV); adamw: optim.* settings"}
    )
    c: float | None = field(default=None, metadata={"help": "inverse L2 strength as in scikit-learn; null = choose by validation/CV"})
    max_iter: int = field(default=300, metadata={"help": "L-BFGS iterations per fit"})

    def problems(self) -> list[str]:
        out = []
        if self.views < 1:
            out.append(f"method.views={self.views} must be >= 1")
        if self.c is not None and self.c <= 0:
            out.append(f"method.c={self.c} must be > 0 (or null to choose it by validation)")
        if self.max_iter < 1:
            out.append(f"method.max_iter={self.max_iter} must be >= 1")
        return out


def _accuracy(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, balanced: bool = False) -> float:
    """Accuracy, or with ``balanced`` the mean per-class recall (what a class-weighted fit optimises)."""
    hit = ((x @ w.T + b).argmax(1) == y).float()
    if not balanced:
        return float(hit.mean())
    return float(np.mean([float(hit[y == c].mean()) for c in torch.unique(y).tolist()]))


def choose_c(
    x: torch.Tensor, y: torch.Tensor, groups: np.ndarray, num_classes: int, max_iter: int,
    val: tuple[torch.Tensor, torch.Tensor] | None, max_rows: int = 5000, balanced: bool = False,
) -> tuple[float, dict[str, float], tuple[torch.Tensor, torch.Tensor] | None]:
    """Pick C from a log grid by validation accuracy, or by grouped stratified k-fold CV on the train set.

    Views of one image share a group so they never straddle folds. Above ``max_rows`` rows, C is chosen
    on a stratified subsample of images (the final fit still uses everything). Ties go to the smaller
    C (stronger regularisation), the safer choice with few labels. Every C's fits run as one stacked
    L-BFGS problem (:mod:`visiontune.methods.logreg`) together with the fit on all of ``x`` when that
    fits in ``max_rows``, so the head at the chosen C comes with it.

    Returns:
        (C, accuracy per C as {"0.01": acc}, (W, b) fitted on all of ``x`` at C or None when not fitted).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    xn, yn = x.numpy(), y.numpy()
    if val is not None and len(val[1]) > 0:
        path = [heads[0] for heads in fit_path(xn, yn, [np.arange(len(yn))], num_classes, _C_GRID, max_iter, balanced=balanced)]
        accs = np.array([_accuracy(w, b, *val, balanced=balanced) for w, b in path])
    else:
        subsample = len(yn) > max_rows
        if subsample:
            rng = np.random.default_rng(0)
            keep_groups = rng.permutation(np.unique(groups))[: max(1, max_rows * len(np.unique(groups)) // len(yn))]
            mask = np.isin(groups, keep_groups)
            xn, yn, groups = xn[mask], yn[mask], groups[mask]
        first = np.unique(groups, return_index=True)[1]
        per_class = np.bincount(yn[first], minlength=num_classes)
        k = int(min(5, per_class[per_class > 0].min()))
        if k < 2:
            return 1.0, {}, None
        folds = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=0).split(xn, yn, groups))
        subsets = [tr for tr, _ in folds] + ([] if subsample else [np.arange(len(yn))])
        path_all = fit_path(xn, yn, subsets, num_classes, _C_GRID, max_iter, balanced=balanced)
        xt, yt = torch.from_numpy(xn), torch.from_numpy(yn)
        accs = np.array(
            [[_accuracy(w, b, xt[te], yt[te], balanced) for (w, b), (_, te) in zip(heads, folds)] for heads in path_all]
        ).mean(1)
        path = None if subsample else [heads[-1] for heads in path_all]
    best = accs.max()
    i = int(np.flatnonzero(accs >= best - 1e-9)[0])  # the grid ascends: the first is the smallest C
    return _C_GRID[i], {f"{c:g}": float(a) for c, a in zip(_C_GRID, accs)}, None if path is None else path[i]


def _linear_head(model: nn.Module) -> nn.Linear:
    head = classifier_of(model)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"a probe head needs an nn.Linear classifier, got {type(head).__name__}")
    return head


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    return x.mean(0), x.std(0).clamp_min(1e-6)


def _write_head(head: nn.Linear, w: torch.Tensor, b: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor) -> None:
    """Fold the feature standardisation into the head so inference is a plain Linear on raw features."""
    w_raw = w / sd
    with torch.no_grad():
        head.weight.copy_(w_raw.to(head.weight.dtype))
        head.bias.copy_((b - w_raw @ mu).to(head.bias.dtype))


def fit_probe_head(
    head: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor, np.ndarray],
    val: tuple[torch.Tensor, torch.Tensor] | None,
    c: float | None = None,
    max_iter: int = 300,
    balanced: bool = False,
) -> dict[str, Any]:
    """Fit ``head`` (an ``nn.Linear``) as a logistic regression on features; C by val or grouped CV when None.

    Used by the ``linear`` method and, as the LP-FT head initialisation (``optim.head_init=probe``),
    before gradient fine-tuning.

    Args:
        head: the classifier to overwrite.
        train: (features [N, D], labels [N], group id per row = source image index).
        val: optional (features, labels) for choosing C and reporting.
        c: fixed inverse L2 strength, or None to choose it.
        max_iter: L-BFGS iterations per fit.
        balanced: class-balanced loss (``optim.class_weights=balanced``); C is then chosen by balanced accuracy.

    Returns:
        Info for metrics.json: chosen C, its scores, how it was chosen, and a one-row history.
    """
    if not isinstance(head, nn.Linear):
        raise TypeError(f"a probe head needs an nn.Linear classifier, got {type(head).__name__}")
    x, y, groups = train
    mu, sd = _moments(x)
    xs = (x.double() - mu) / sd
    vs = None if val is None or len(val[1]) == 0 else ((val[0].double() - mu) / sd, val[1])
    num_classes = head.out_features
    scores: dict[str, float] = {}
    fitted = None
    if c is None:
        c, scores, fitted = choose_c(xs, y, groups, num_classes, max_iter, vs, balanced=balanced)
        how = "val" if vs is not None else "cv"
    else:
        how = "fixed"
    w, b = fitted or fit_path(xs.numpy(), y.numpy(), [np.arange(len(y))], num_classes, [c], max_iter, balanced=balanced)[0][0]
    with torch.no_grad():
        loss = float(F.cross_entropy(xs @ w.T + b, y))
    history: list[dict[str, Any]] = [{"epoch": 1, "train_loss": loss, "lr": None}]
    if vs is not None:
        history[0]["val_accuracy"] = _accuracy(w, b, *vs)
    _write_head(head, w, b, mu, sd)
    return {"solver": "lbfgs", "c": c, "c_scores": scores, "c_selected_by": how, "class_weights": "balanced" if balanced else "none",
            "history": history}


@register_method("linear")
class Linear(Method):
    """Frozen backbone; linear head fitted on cached pooled features (computed once per image/view)."""

    config_cls = LinearConfig
    default_lr = 1e-3
    default_head_lr = 1e-3
    feature_cache = True
    summary = "frozen backbone, linear head on cached features"
    cfg: LinearConfig

    def apply(self, model: nn.Module) -> nn.Module:
        freeze(model)
        for p in classifier_of(model).parameters():
            p.requires_grad_(True)
        if self.cfg.solver == "lbfgs":
            # Import the solver's libraries with the model setup (a one-off ~1-2 s on this CPU for scikit-learn's
            # model_selection and scipy.optimize), so the timed training is the fit, as in a script that imports first.
            import scipy.optimize  # noqa: F401
            import sklearn.model_selection  # noqa: F401
        return model

    def fit_cached(
        self,
        model: nn.Module,
        train: tuple[torch.Tensor, torch.Tensor, np.ndarray],
        val: tuple[torch.Tensor, torch.Tensor] | None,
        optim: OptimConfig,
        seed: int,
    ) -> dict[str, Any]:
        """Fit the head on cached features and write it into ``model``'s classifier.

        Args:
            model: the backbone with its (frozen) body; only its classifier changes.
            train: (features [N, D], labels [N], group id per row = source image index).
            val: optional (features, labels) for choosing C / reporting.
            optim: run optimiser settings (used by ``solver=adamw``).
            seed: seed for the adamw solver's batch order.

        Returns:
            Info for metrics.json: solver, chosen C and its scores, history.
        """
        if self.cfg.solver == "lbfgs":
            return fit_probe_head(
                classifier_of(model), train, val, self.cfg.c, self.cfg.max_iter, balanced=optim.class_weights == "balanced"
            )
        head = _linear_head(model)
        x, y, _ = train
        mu, sd = _moments(x)
        xs = (x.double() - mu) / sd
        vs = None if val is None or len(val[1]) == 0 else ((val[0].double() - mu) / sd, val[1])
        w, b, history = self._fit_adamw(xs, y, vs, head.out_features, optim, seed)
        _write_head(head, w, b, mu, sd)
        return {"solver": "adamw", "history": history}

    def _fit_adamw(self, x, y, val, num_classes, optim: OptimConfig, seed: int):
        gen = torch.Generator().manual_seed(seed)
        weight = class_weights(y.numpy(), num_classes, optim.class_weights)
        weight = None if weight is None else weight.double()
        lin = nn.Linear(x.shape[1], num_classes).double()
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
        lr = optim.head_lr or self.default_head_lr
        opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=optim.weight_decay)
        steps_per_epoch = math.ceil(len(y) / optim.batch_size)
        sched = warmup_cosine(opt, steps_per_epoch * optim.epochs, int(optim.warmup_epochs * steps_per_epoch), optim.min_lr_ratio)
        history = []
        for epoch in range(1, optim.epochs + 1):
            perm = torch.randperm(len(y), generator=gen)
            total = 0.0
            for i in range(0, len(y), optim.batch_size):
                idx = perm[i : i + optim.batch_size]
                loss = F.cross_entropy(lin(x[idx]), y[idx], label_smoothing=optim.label_smoothing, weight=weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            row = {"epoch": epoch, "train_loss": total / len(y), "lr": opt.param_groups[0]["lr"]}
            if val is not None:
                with torch.no_grad():
                    row["val_accuracy"] = _accuracy(lin.weight, lin.bias, *val)
            history.append(row)
        return lin.weight.detach(), lin.bias.detach(), history

    def describe(self) -> str:
        return "linear probe" + (f" ({self.cfg.views} views)" if self.cfg.views > 1 else "")


@dataclass
class FullConfig(MethodConfig):
    """Options of full fine-tuning (none beyond optim.*)."""

    name: str = "full"


@register_method("full")
class Full(Method):
    """Every parameter trains, from the pretrained weights."""

    config_cls = FullConfig
    starts_as_backbone = True  # the pretrained weights, nothing added
    # Small body lr keeps pretrained features; the fresh head needs a normal one.
    default_lr = 3e-5
    default_head_lr = 1e-3
    summary = "all parameters trained from pretrained weights"


@dataclass
class ScratchConfig(MethodConfig):
    """Options of training from scratch (none beyond optim.*)."""

    name: str = "scratch"


@register_method("scratch")
class Scratch(Method):
    """Every parameter trains from random initialisation (backbone.weights is ignored and recorded as none)."""

    config_cls = ScratchConfig
    default_lr = 1e-3
    default_head_lr = 1e-3
    pretrained = False
    summary = "all parameters trained from random init"
