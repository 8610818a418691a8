"""A prior on each fine-tuning candidate's accuracy gain over the linear probe, learned on the meta-benchmark.

The meta-benchmark (``benchmarks/meta/``) holds, per task (a dataset sub-sampled to some shots per class, a seed)
and backbone, the test accuracy of the probe and of each fine-tuning kind, and the meta-features ``auto`` computes
cheaply before any fine-tuning (:func:`visiontune.auto.cheap.meta_features`). From it, one small model per
backbone and candidate kind predicts the gain ``test[kind] - test[probe]`` from those meta-features (after Auto-sklearn
2.0's meta-feature policy and ZAP's zero-shot selection; Quick-Tune meta-learns the same kind of predictor):

* **Model.** Per group and kind, the best by leave-one-dataset-out error of three, simplest first
  (:data:`MODELS`): the mean gain, scikit-learn's :class:`~sklearn.linear_model.BayesianRidge` on log2 shots per
  class, and BayesianRidge on every standardized feature (a linear model with its regularization learned by
  evidence maximization: on a few hundred rows from a dozen datasets anything more flexible fits the datasets, not
  the features). Features a model does not read neither widen its sd nor count as missing.
* **Its uncertainty** is *not* the model's own predictive variance, which is computed as if tasks were independent:
  tasks of one dataset share its images and its quirks. It is the root mean square of **leave-one-dataset-out**
  residuals: for each dataset, the model is refitted on every other dataset and predicts that dataset's tasks; each
  dataset weighs the same (the mean of its squared residuals), so a dataset cut into many tasks does not dominate.
* **Keys.** A model per backbone key (``dinov2-112``: ``vit_small_patch14_dinov2`` at 112 px; ``lite0-224``:
  ``tf_efficientnet_lite0`` at 224 px), else per backbone family (``family transformer`` / ``family cnn``), else
  ``pooled`` over every backbone; a group needs tasks of at least :data:`MIN_DATASETS` datasets.
* **Outside the fitted range** (a feature beyond the [min, max] the model saw), the sd is multiplied by one plus the
  largest excess in units of that feature's standard deviation; a feature the task lacks is imputed with the fitted
  mean and the sd multiplied by :data:`MISSING_WIDEN`. The report names both.
* **Kinds.** An ``auto`` :class:`~visiontune.auto.candidates.Candidate` maps to ``lora`` (LoRA on whole depth),
  ``lora_lastk`` (LoRA with ``method.blocks=last:k``), ``dora``, ``mona`` or ``full`` by its overrides
  (:func:`candidate_kind`), the cheap nearest prototype to ``prototype`` (:data:`MODELED`); anything else (and a
  kind with no fitted model) gets a flat prior: the folds alone.

It ships as a small JSON file beside this module (``prior.json``; :func:`default_prior`), never a pickle: reading it
runs no code. It holds the coefficients, scalers, fitted ranges, leave-one-dataset-out sd and row counts of every
model, the meta-features of the tasks it was fitted on (for the report's nearest tasks), and its provenance (datasets,
date, code commit, table digest). :func:`load_prior` validates every field and reports every problem at once.

Written by hand: the feature transforms, the grouping, the leave-one-dataset-out loop (scikit-learn's
:class:`~sklearn.model_selection.LeaveOneGroupOut` gives the splits, the residual pooling per dataset is ours), the
widening rule, the JSON format and its validation, and prediction (a dot product: loading needs no scikit-learn).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.auto.candidates import Candidate
from visiontune.auto.schedule import PriorGain
from visiontune.errors import ConfigError

FORMAT, VERSION = "visiontune-gain-prior", 1
KINDS = ("lora", "lora_lastk", "dora", "mona", "full")
"""Fine-tuning kinds of the meta-benchmark's ``test`` columns that the prior models (gain over ``probe``)."""
MODELED = (*KINDS, "prototype")
"""Every kind the prior models: the fine-tunes, and the nearest prototype (a cheap candidate with a test accuracy on
every task of the table: with two folds of four images its tie with the probe is no evidence, and other datasets
say how far it usually trails)."""
FEATURES: tuple[tuple[str, str], ...] = (
    ("shots_per_class", "log2"),
    ("classes", "log2"),
    ("probe_cv_accuracy", "identity"),
    ("probe_cv_logloss", "identity"),
    ("probe_gap", "identity"),
    ("prototype_gap", "identity"),
    ("gray", "identity"),
)
"""The meta-features the prior's models read (name, transform): all computed by ``auto``'s cheap stage."""
TRANSFORMS: dict[str, Callable[[float], float]] = {"identity": float, "log2": lambda v: math.log2(max(float(v), 1e-9))}
BACKBONE_KEYS = {("vit_small_patch14_dinov2", 112): "dinov2-112", ("tf_efficientnet_lite0", 224): "lite0-224"}
"""(timm architecture, image size) -> the meta-benchmark's backbone key."""
DEFAULT_SIZES = {"tf_efficientnet_lite0": 224, "vit_small_patch14_dinov2": 518}
"""Image size of an architecture when ``backbone.img_size`` is not set (timm's pretrained config)."""
MIN_DATASETS = 3
"""A model is fitted for a group (backbone, family, pooled) x kind only with tasks of at least this many datasets:
leave-one-dataset-out needs two left to fit on."""
MISSING_WIDEN = 1.5
UNKNOWN_SCHEDULE_SD = 0.10
"""The sd (accuracy fraction) an unknown kind's flat prior is scheduled with (:meth:`MetaPrior.expected_gain`)."""
MAX_BYTES = 8 * 2**20
NEAREST = 3


def candidate_kind(candidate: Candidate) -> str | None:
    """The meta-benchmark kind of ``candidate`` (from its overrides, the last value of a key winning), or None."""
    o: dict[str, str] = {}
    for text in candidate.overrides:
        key, _, value = text.partition("=")
        o[key.strip()] = value.strip()
    name, blocks = o.get("method.name"), o.get("method.blocks", "")
    if name == "lora":
        if not blocks or blocks == "all":
            return "lora"
        return "lora_lastk" if blocks.startswith("last:") else None
    if name == "prototype":
        return "prototype"
    return name if name in ("dora", "mona", "full") and (not blocks or blocks == "all") else None


def backbone_key(name: str, img_size: int | None) -> str | None:
    """The meta-benchmark's key of a backbone (timm name, optionally with a ``.tag``) at ``img_size``, or None."""
    arch = str(name).split(".")[0]
    size = img_size if img_size else DEFAULT_SIZES.get(arch)
    return BACKBONE_KEYS.get((arch, int(size))) if size else None


def feature_vector(meta: dict[str, Any], features: Iterable[tuple[str, str]] = FEATURES) -> list[float | None]:
    """The transformed meta-features (None where the task lacks one, or it is not a finite number)."""
    out: list[float | None] = []
    for name, transform in features:
        v = meta.get(name)
        if isinstance(v, bool):
            v = float(v)
        if not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            out.append(None)
            continue
        out.append(TRANSFORMS[transform](v))
    return out


# ----------------------------------------------------------------------------- fitting (benchmarks/meta/fit_prior.py)


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """The meta-benchmark table: one JSON object per line (blank lines skipped).

    Raises:
        ConfigError: a line that is not a JSON object, or one without ``dataset``, ``backbone``, ``meta`` and ``test``.
    """
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{path} line {n} is not JSON ({e})") from e
        if not isinstance(row, dict) or not all(isinstance(row.get(k), t) for k, t in
                                                (("dataset", str), ("backbone", str), ("meta", dict), ("test", dict))):
            raise ConfigError(f"{path} line {n} lacks dataset/backbone (strings) or meta/test (objects)")
        rows.append(row)
    return rows


def _default_model() -> Any:
    from sklearn.linear_model import BayesianRidge

    return BayesianRidge()


def lodo_residuals(x: np.ndarray, y: np.ndarray, datasets: list[str], make_model: Callable[[], Any] = _default_model
                   ) -> tuple[np.ndarray, float]:
    """Leave-one-dataset-out residuals ``y - prediction`` (each row predicted by a model that saw no row of its own
    dataset; features standardized on the training part only) and their root mean square, every dataset weighing
    the same."""
    res, per_dataset = _lodo(x, y, datasets, make_model)
    return res, math.sqrt(float(np.mean(per_dataset)))


def _lodo(x: np.ndarray, y: np.ndarray, datasets: list[str], make_model: Callable[[], Any]
          ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`lodo_residuals`' residuals and each dataset's mean squared residual (in the order of first appearance)."""
    from sklearn.model_selection import LeaveOneGroupOut
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    groups = np.asarray(datasets)
    res = np.full(len(y), np.nan)
    for tr, te in LeaveOneGroupOut().split(x, y, groups):
        model = make_pipeline(StandardScaler(), make_model()).fit(x[tr], y[tr])
        res[te] = y[te] - model.predict(x[te])
    return res, np.array([float(np.mean(res[groups == d] ** 2)) for d in dict.fromkeys(datasets)])


def one_se_choice(per_dataset: list[np.ndarray]) -> int:
    """The index of the simplest model (models in order of complexity) whose leave-one-dataset-out RMS residual is
    within one standard error of the lowest (the one-standard-error rule of model selection: Breiman et al. 1984;
    Hastie, Tibshirani & Friedman, *Elements of Statistical Learning*, 7.10). ``per_dataset[i]`` holds model i's
    mean squared residual per left-out dataset; the standard error of the best model's RMS is the standard error of
    the mean of its per-dataset squares, carried through the square root (delta method). With a dozen datasets a
    richer model that is better by less than that is better by chance."""
    rms = [math.sqrt(float(np.mean(d))) for d in per_dataset]
    best = int(np.argmin(rms))
    d = per_dataset[best]
    se = float(np.std(d, ddof=1) / math.sqrt(len(d))) / (2 * rms[best]) if len(d) > 1 and rms[best] > 0 else 0.0
    return next(i for i, r in enumerate(rms) if r <= rms[best] + se)


MODELS: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("intercept only", ()), ("shots per class", ("shots_per_class",)), ("all features", None))
"""The models :func:`_fit_one` chooses between, simplest first (name, the features it reads; None: every one): the
simplest whose leave-one-dataset-out RMS residual is within one standard error of the lowest is kept
(:func:`one_se_choice`). With a few dozen rows of a dozen datasets the features may not predict a new dataset's gain
better than the mean gain does; then the mean it is (Auto-sklearn 2.0 likewise chooses its selection policy by
cross-validation on the meta-data)."""


def _fit_one(x: np.ndarray, y: np.ndarray, datasets: list[str], names: list[str]) -> dict[str, Any]:
    from sklearn.dummy import DummyRegressor
    from sklearn.preprocessing import StandardScaler

    scored, per_dataset = [], []
    for name, used in MODELS:
        cols = list(range(len(names))) if used is None else [names.index(n) for n in used if n in names]
        if used and len(cols) < len(used):
            continue
        make = _default_model if cols else DummyRegressor
        _, squares = _lodo(x[:, cols or [0]], y, datasets, make)
        per_dataset.append(squares)
        scored.append((math.sqrt(float(np.mean(squares))), len(scored), name, cols))
    sd, _, name, cols = scored[one_se_choice(per_dataset)]
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    coef = np.zeros(len(names))
    intercept = float(np.mean(y))
    if cols:
        model = _default_model().fit(z[:, cols], y)
        coef[cols], intercept = model.coef_, float(model.intercept_)
    fit_sd = float(np.sqrt(np.mean((y - intercept - z @ coef) ** 2)))
    return {
        "intercept": intercept, "coef": [float(c) for c in coef],
        "center": [float(c) for c in scaler.mean_], "scale": [float(s) for s in scaler.scale_],
        "low": [float(v) for v in x.min(0)], "high": [float(v) for v in x.max(0)],
        "sd": max(sd, 1e-4), "fit_sd": fit_sd, "rows": len(y), "datasets": len(set(datasets)),
        "model": name, "lodo_sd": {n: round(float(v), 5) for v, _, n, _ in scored},
    }


def fit_prior(rows: list[dict[str, Any]], provenance: dict[str, Any] | None = None,
              features: tuple[tuple[str, str], ...] = FEATURES, min_datasets: int = MIN_DATASETS) -> dict[str, Any]:
    """The prior (a JSON-ready dict, :func:`load_prior`'s format) fitted on meta-benchmark ``rows`` (one dict per
    task x backbone, ``benchmarks/meta/results/tasks.jsonl``'s schema). Rows lacking a feature or the probe's test
    accuracy are left out (counted in the provenance)."""
    usable, dropped = [], 0
    for r in rows:
        x = feature_vector(r.get("meta", {}), features)
        test = r.get("test", {})
        if any(v is None for v in x) or not isinstance(test.get("probe"), (int, float)):
            dropped += 1
            continue
        usable.append((r, np.array(x, dtype=float)))
    groups: dict[str, list[tuple[dict[str, Any], np.ndarray]]] = {}
    for r, x in usable:
        for g in (str(r["backbone"]), f"family {r.get('backbone_family', 'unknown')}", "pooled"):
            groups.setdefault(g, []).append((r, x))
    models: dict[str, dict[str, Any]] = {}
    for g, members in groups.items():
        for kind in MODELED:
            sel = [(r, x) for r, x in members if isinstance(r["test"].get(kind), (int, float))]
            datasets = [str(r["dataset"]) for r, _ in sel]
            if len(set(datasets)) < min_datasets:
                continue
            xs = np.stack([x for _, x in sel])
            ys = np.array([r["test"][kind] - r["test"]["probe"] for r, _ in sel], dtype=float)
            models.setdefault(g, {})[kind] = _fit_one(xs, ys, datasets, [n for n, _ in features])
    from sklearn.preprocessing import StandardScaler

    # The nearest-task distance's scale: over every task (a constant feature gets scale 1, as StandardScaler does)
    center, scale = np.zeros(len(features)), np.ones(len(features))
    if usable:
        scaler = StandardScaler().fit(np.stack([x for _, x in usable]))
        center, scale = scaler.mean_, scaler.scale_
    tasks = [{"task": str(r.get("task", "")), "dataset": str(r["dataset"]), "backbone": str(r["backbone"]),
              "x": [round(float(v), 5) for v in x],
              "gain": {k: round(float(r["test"][k] - r["test"]["probe"]), 5) for k in MODELED
                       if isinstance(r["test"].get(k), (int, float))}}
             for r, x in usable]
    return {
        "format": FORMAT, "version": VERSION,
        "target": "test accuracy of the kind minus the linear probe's, as a fraction",
        "features": [{"name": n, "transform": t} for n, t in features],
        "models": models,
        "task_scale": {"center": [float(v) for v in center], "scale": [float(v) for v in scale]},
        "tasks": tasks,
        "provenance": {
            **(provenance or {}), "rows": len(rows), "rows_used": len(usable), "rows_dropped_missing": dropped,
            "datasets": sorted({str(r["dataset"]) for r, _ in usable}),
            "model": ("per group and kind, the simplest within one standard error of the lowest leave-one-dataset-out "
                      "RMS residual of: the mean gain, scikit-learn BayesianRidge on log2 shots per class, BayesianRidge "
                      "on every standardized feature; sd = its RMS residual"),
        },
    }


# ----------------------------------------------------------------------------- loading, with validation


def _finite_list(v: Any, n: int) -> bool:
    return (isinstance(v, list) and len(v) == n
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v))


def _finite(v: Any, low: float = -math.inf) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= low


def validate_prior(data: Any) -> list[str]:
    """Every problem of a loaded prior file (empty when it is well formed)."""
    if not isinstance(data, dict):
        return [f"the top level is {type(data).__name__}, not an object"]
    problems = []
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        problems.append(f"format/version is {data.get('format')!r}/{data.get('version')!r}, expected {FORMAT!r}/{VERSION}")
    feats = data.get("features")
    if (not isinstance(feats, list) or not feats
            or not all(isinstance(f, dict) and isinstance(f.get("name"), str) and f.get("transform") in TRANSFORMS for f in feats)):
        return [*problems, f"'features' must be a non-empty list of {{name, transform in {sorted(TRANSFORMS)}}}"]
    n = len(feats)
    models = data.get("models")
    if not isinstance(models, dict):
        problems.append("'models' must be an object: group -> kind -> model")
        models = {}
    for g, kinds in models.items():
        if not isinstance(kinds, dict):
            problems.append(f"models[{g!r}] is not an object")
            continue
        for kind, m in kinds.items():
            where = f"models[{g!r}][{kind!r}]"
            if kind not in MODELED:
                problems.append(f"{where}: unknown kind (known: {', '.join(MODELED)})")
            if not isinstance(m, dict):
                problems.append(f"{where} is not an object")
                continue
            for key in ("coef", "center", "scale", "low", "high"):
                if not _finite_list(m.get(key), n):
                    problems.append(f"{where}.{key} must be {n} finite numbers")
            if _finite_list(m.get("scale"), n) and any(s <= 0 for s in m["scale"]):
                problems.append(f"{where}.scale must be above zero")
            if not _finite(m.get("intercept")):
                problems.append(f"{where}.intercept must be a finite number")
            if not _finite(m.get("sd")) or m["sd"] <= 0:
                problems.append(f"{where}.sd must be a finite number above zero")
            for key in ("rows", "datasets"):
                if not isinstance(m.get(key), int) or isinstance(m.get(key), bool) or m[key] < 1:
                    problems.append(f"{where}.{key} must be a whole number >= 1")
    ts = data.get("task_scale")
    if not isinstance(ts, dict) or not _finite_list(ts.get("center"), n) or not _finite_list(ts.get("scale"), n) \
            or any(s <= 0 for s in ts["scale"]):
        problems.append(f"'task_scale' must hold center and scale ({n} finite numbers, scales above zero)")
    tasks = data.get("tasks")
    if not isinstance(tasks, list):
        problems.append("'tasks' must be a list")
    else:
        for i, t in enumerate(tasks):
            if not (isinstance(t, dict) and isinstance(t.get("dataset"), str) and isinstance(t.get("task"), str)
                    and isinstance(t.get("backbone"), str) and _finite_list(t.get("x"), n)
                    and isinstance(t.get("gain"), dict) and all(k in MODELED and _finite(v) for k, v in t["gain"].items())):
                problems.append(f"tasks[{i}] must hold task, dataset, backbone (strings), x ({n} finite numbers), gain")
                break
    if not isinstance(data.get("provenance"), dict):
        problems.append("'provenance' must be an object")
    return problems


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def load_prior(path: str | Path) -> MetaPrior:
    """A :class:`MetaPrior` from a JSON file written by ``benchmarks/meta/fit_prior.py``.

    Raises:
        ConfigError: the file is unreadable, too large, not JSON, or any field is malformed (every problem named).
    """
    path = Path(path)
    fix = "refit it with `python benchmarks/meta/fit_prior.py`, or run with --prior flat"
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError(f"prior file {path} is {size} bytes, more than {MAX_BYTES} a prior can be; {fix}")
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except ConfigError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"prior file {path} cannot be read as JSON ({type(e).__name__}: {e}); {fix}") from e
    problems = validate_prior(data)
    if problems:
        raise ConfigError(f"prior file {path} is malformed: {'; '.join(problems[:20])}; {fix}")
    return MetaPrior(data, str(path))


SHIPPED = "prior.json"


def default_prior() -> Any:
    """The prior that ships with the package (``visiontune/auto/prior.json``), else :class:`FlatPrior`."""
    from visiontune.auto.schedule import FlatPrior

    ref = resources.files("visiontune.auto").joinpath(SHIPPED)
    if not ref.is_file():
        return FlatPrior()
    with resources.as_file(ref) as path:
        return load_prior(path)


def resolve_prior(spec: str | None) -> Any:
    """``--prior``: ``meta`` (default: the shipped prior, flat when none ships), ``flat``, or a prior JSON file."""
    from visiontune.auto.schedule import FlatPrior

    if spec is None or spec == "meta":
        return default_prior()
    if spec == "flat":
        return FlatPrior()
    if not Path(spec).is_file():
        raise ConfigError(f"--prior {spec!r} is neither 'meta', 'flat' nor a prior JSON file")
    return load_prior(spec)


# ----------------------------------------------------------------------------- the prior


def _key(features: dict[str, Any]) -> str | None:
    """The task's backbone key: ``backbone_key`` when the features carry one (the meta-benchmark's own rows), else
    from the backbone's name and image size."""
    given = features.get("backbone_key")
    return str(given) if given else backbone_key(str(features.get("backbone", "")), features.get("img_size"))



@dataclass(frozen=True)
class _Model:
    intercept: float
    coef: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    low: np.ndarray
    high: np.ndarray
    sd: float


class MetaPrior:
    """The learned :class:`~visiontune.auto.schedule.GainPrior`; see the module docstring. Build with
    :func:`load_prior` (validated), or from :func:`fit_prior`'s dict."""

    def __init__(self, data: dict[str, Any], origin: str = "(in memory)"):
        self.data = data
        self.origin = origin
        self.features = tuple((f["name"], f["transform"]) for f in data["features"])
        self.models = {
            g: {k: _Model(float(m["intercept"]), *(np.asarray(m[key], dtype=float) for key in ("coef", "center", "scale", "low", "high")),
                          float(m["sd"])) for k, m in kinds.items()}
            for g, kinds in data["models"].items()
        }

    def _group(self, features: dict[str, Any], kind: str) -> str | None:
        key = _key(features)
        for g in (key, f"family {features.get('family')}", "pooled"):
            if g and kind in self.models.get(g, {}):
                return g
        return None

    def gain(self, candidate: Candidate, features: dict[str, Any]) -> PriorGain:
        kind = candidate_kind(candidate)
        group = None if kind is None else self._group(features, kind)
        if kind is None or group is None:
            return PriorGain(kind=kind)
        m = self.models[group][kind]
        x = feature_vector(features, self.features)
        names = [n for n, _ in self.features]
        missing = tuple(n for n, v, c in zip(names, x, m.coef) if v is None and c != 0)
        xv = np.array([m.center[i] if v is None else v for i, v in enumerate(x)], dtype=float)
        # Only a feature the model reads can put the task outside what it was fitted on (or be missing from it).
        excess = np.where(m.coef != 0, np.maximum(0.0, np.maximum(xv - m.high, m.low - xv)) / m.scale, 0.0)
        outside = tuple(n for n, e in zip(names, excess) if e > 0)
        sd = m.sd * (1.0 + float(excess.max(initial=0.0))) * (MISSING_WIDEN if missing else 1.0)
        mean = m.intercept + float(m.coef @ ((xv - m.center) / m.scale))
        return PriorGain(mean, sd, group, kind, outside, missing)

    def expected_gain(self, candidate: Candidate, features: dict[str, Any]) -> float:
        """The expected improvement over the probe, E[max(gain, 0)] under the prior (Quick-Tune's acquisition
        before cost): positive even for a candidate expected to lose, and larger for an uncertain one."""
        from scipy.stats import norm

        p = self.gain(candidate, features)
        mean, sd = (0.0, UNKNOWN_SCHEDULE_SD) if p.flat else (p.mean, p.sd)
        return float(mean * norm.cdf(mean / sd) + sd * norm.pdf(mean / sd))

    def nearest(self, features: dict[str, Any], k: int = NEAREST) -> list[dict[str, Any]]:
        """The ``k`` fitted tasks closest to ``features`` (Euclidean in standardized meta-features; the same
        backbone's tasks when there are any), with their distance and measured gains."""
        x = feature_vector(features, self.features)
        scale = np.asarray(self.data["task_scale"]["scale"], dtype=float)
        known = [i for i, v in enumerate(x) if v is not None]
        if not known or not self.data["tasks"]:
            return []
        key = _key(features)
        tasks = [t for t in self.data["tasks"] if t["backbone"] == key] or self.data["tasks"]
        q = np.array([x[i] for i in known], dtype=float)
        out = []
        for t in tasks:
            tx = np.asarray(t["x"], dtype=float)[known]
            out.append((float(np.sqrt(np.sum(((tx - q) / scale[known]) ** 2))), t))
        out.sort(key=lambda p: p[0])
        return [{"task": t["task"], "dataset": t["dataset"], "backbone": t["backbone"], "distance": round(d, 2),
                 "gain": t["gain"]} for d, t in out[:k]]

    def describe(self, features: dict[str, Any]) -> dict[str, Any]:
        prov = self.data.get("provenance", {})
        return {"name": "meta", "file": self.origin,
                "provenance": {k: prov.get(k) for k in ("datasets", "date", "code", "rows_used", "left_out") if k in prov},
                "nearest": self.nearest(features)}


__all__ = ["FEATURES", "KINDS", "MODELED", "MetaPrior", "backbone_key", "candidate_kind", "default_prior", "feature_vector",
           "fit_prior", "load_prior", "lodo_residuals", "read_table", "resolve_prior", "validate_prior"]
