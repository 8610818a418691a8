"""The meta-benchmark: how each fine-tuning method does against the linear probe on many small real tasks.

``visiontune auto`` learns its prior (which candidate gains over the probe, and how surely) from the table this
script rebuilds, offline and resumably. See ``benchmarks/meta/README.md`` for the design, the cost and what was run.

* **Tasks.** Every dataset of ``benchmarks/datasets.py`` (12 image folders under ``--data-root`` plus the built-ins
  ``elpv``, ``fashion-mnist``, ``digits``); at most ``--max-classes`` classes (an evenly spaced, seed-independent
  subset of the sorted class names); per class a FIXED test set (``--test-per-class``, drawn once) and a fixed pool
  (``--pool-per-class``) from which seed ``s`` draws the ``shots`` training images (nested: the 5 of a seed are
  among its 10). Features are computed once per image and backbone (``--cache``, one ``.npz`` per backbone and
  dataset, :class:`offline_backbones.FeatureCache`).
* **Cheap unit** (every task and backbone): test accuracy of the linear probe and the nearest prototype fitted on
  the task's shots, and what ``auto`` sees before it fine-tunes (:mod:`visiontune.auto.folds`: the same stratified
  folds, probe and prototype): fold accuracies and the meta-features.
* **Fold unit** (task x backbone x ``METHOD_folds``, ``--fold-methods``): the same fine-tune on the training part of
  each of the task's first ``--finetune-folds`` folds (the folds the cheap unit scored the probe on, each fold's
  epochs by the same rule), scored on the fold's held-out part: the evidence ``auto``'s decision rules read
  (``benchmarks/meta/regret.py`` compares the rules on it, the probe's scores cut to the same folds).
* **Fine-tune unit** (task x backbone x method): ``visiontune.train`` on the task's shots with the candidate of the
  backbone's family (:func:`visiontune.auto.candidates.family_candidates`: ``lora`` = its first, ``lora_lastk`` its
  last-blocks LoRA, ``dora`` its DoRA), in the regime of ``auto``'s fold / final retrain with project defaults:
  batch 16, :data:`~visiontune.auto.folds.FINETUNE_STEPS` optimizer steps but never fewer epochs than
  ``optim.epochs``, LP-FT head initialised from the cached features; test accuracy on the fixed test set.

Every finished unit is appended to ``OUT/units.jsonl`` at once; a rerun skips what is there. Units run on Ray
(``--workers N`` local CPUs, one torch thread each) in priority order (:func:`schedule`), or in this process with
``--workers 0``. ``collect`` merges the units into ``OUT/tasks.jsonl`` (one row per task x backbone, the schema in
the README) and renders ``OUT/README.md``; ``run`` collects as it goes.

Usage (repo root)::

    python benchmarks/datasets.py extract-all --mirror-root /work/.mirror --out /work/data
    nice -n 10 python benchmarks/meta/run.py run            # everything, in priority order; resumable
    python benchmarks/meta/run.py collect                   # tasks.jsonl + README.md from units.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from visiontune.auto.candidates import backbone_family, family_candidates
from visiontune.auto.folds import FINETUNE_STEPS, cheap_logits, fold_count, fold_epochs, stratified_folds
from visiontune.config import load_config
from visiontune.data.records import ImageRecords
from visiontune.data.sources import load_records

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
REPO = BENCH.parent


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


bd = _load("visiontune_bench_datasets", BENCH / "datasets.py")
ob = _load("visiontune_bench_offline_backbones", BENCH / "offline_backbones.py")

BACKBONES: dict[str, Any] = {
    **{k: ob.BACKBONES[k] for k in ("dinov2-112", "lite0-224")},
    # A tiny random ViT for tests of this harness (never part of the committed table).
    "tiny-vit": ob.Backbone("tiny-vit", "test_vit", "none", 32, "qv", weights_value="none"),
}
DEFAULT_BACKBONES = ["dinov2-112", "lite0-224"]
METHODS = ("lora", "lora_lastk", "dora")
"""Fine-tune keys -> the index of the candidate in the backbone family's list (family_candidates order)."""
_CANDIDATE_INDEX = {"lora": 0, "lora_lastk": 1, "dora": 2}
FOLDS_SUFFIX = "_folds"
"""A fold unit's method: ``lora_folds`` = the ``lora`` candidate fine-tuned on the first ``--finetune-folds`` of the
task's folds (auto's folds, the ones the cheap unit scored the probe on), its accuracy on each fold's held-out part."""
CHEAP = "cheap"
DEFAULT_SHOTS = [2, 5, 10, 20, 50]
DEFAULT_SEEDS = [0, 1, 2]
CORE_SHOTS = (5, 10, 20)
"""The shot levels fine-tuned first (the issue's regret table is at 5, 10 and 20 per class)."""
PROBE = ("method.name=linear",)
PROTOTYPE = ("method.name=prototype",)
AUTO_FOLDS = 5
"""``visiontune auto --folds`` default: k = min(5, smallest class)."""
SPLIT_SEED = 0
"""Seed of the fixed test / pool split of every dataset (seed-independent by design)."""
UNITS, TASKS, RENDERED = "units.jsonl", "tasks.jsonl", "README.md"
BATCH = 16
"""auto's fold batch size (``optim.batch_size=16`` in its base overrides)."""


# ----------------------------------------------------------------------------- datasets and tasks


def dataset_spec(name: str, data_root: Path) -> str:
    """What ``data.dataset`` gets: a built-in's name, or the dataset's folder under ``data_root``."""
    spec = bd.DATASETS[name]
    if isinstance(spec, bd.BuiltinDataset):
        return name
    folder = data_root / name
    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing; rebuild it: python benchmarks/datasets.py extract-all "
                         f"--mirror-root /work/.mirror --out {data_root}")
    return str(folder)


@dataclasses.dataclass
class Dataset:
    """One dataset, cut once: the fixed test set and the pool each seed draws its shots from (indices into records)."""

    name: str
    spec: str
    records: ImageRecords
    test: np.ndarray
    pool: dict[int, np.ndarray]  # class -> pool indices, in the fixed order

    @property
    def classes(self) -> int:
        return len(self.records.classes)

    def max_shots(self) -> int:
        return min(len(p) for p in self.pool.values())

    def shots(self, shots: int, seed: int) -> np.ndarray:
        """The training indices of ``shots`` per class for ``seed``: nested over shots (a prefix of one order)."""
        out = []
        for c, idx in sorted(self.pool.items()):
            order = np.random.default_rng([seed, c]).permutation(len(idx))
            out.append(idx[order[:shots]])
        return np.concatenate(out)


def restrict(records: ImageRecords, keep: list[str]) -> ImageRecords:
    """``records`` of the classes ``keep`` only, relabeled in that order."""
    remap = {records.classes.index(c): i for i, c in enumerate(keep)}
    idx = np.array([i for i, y in enumerate(records.labels) if int(y) in remap], dtype=np.int64)
    sub = records.subset(idx)
    return dataclasses.replace(sub, labels=np.array([remap[int(y)] for y in sub.labels]), classes=list(keep))


def cut(name: str, spec: str, test_per_class: int, pool_per_class: int, max_classes: int) -> Dataset:
    """The dataset's class subset, fixed test set and pool (a permutation per class seeded by :data:`SPLIT_SEED`;
    a class's first ``test_per_class`` images test, at most half of it, the next ``pool_per_class`` are the pool)."""
    records = load_records(spec)
    classes = sorted(records.classes)
    if len(classes) > max_classes:
        records = restrict(records, bd.evenly_spaced(classes, max_classes))
    test, pool = [], {}
    for c in range(len(records.classes)):
        idx = np.flatnonzero(records.labels == c)
        idx = idx[np.random.default_rng([SPLIT_SEED, c]).permutation(len(idx))]
        n_test = min(test_per_class, len(idx) // 2)
        test.append(idx[:n_test])
        pool[c] = idx[n_test : n_test + pool_per_class]
    return Dataset(name, spec, records, np.concatenate(test), pool)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One result row of units.jsonl: the cheap part of a task on a backbone, or one fine-tune."""

    dataset: str
    classes: int
    shots: int
    seed: int
    backbone: str
    method: str  # CHEAP or a METHODS key

    @property
    def task(self) -> str:
        return task_name(self.dataset, self.classes, self.shots, self.seed)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.task, self.backbone, self.method)


def task_name(dataset: str, classes: int, shots: int, seed: int) -> str:
    return f"{dataset}/k{classes}/s{shots}/seed{seed}"


def _finetune_rank(u: Unit, backbones: list[str], seeds: list[int]) -> tuple:
    """Fine-tunes by what the prior needs most: the first backbone, the first seed, shots 5/10/20 with LoRA and
    last-k LoRA; then DoRA; then shots 2 and 50; then the next seeds; then the next backbones. A task's fold unit
    follows its test unit, so that tasks are completed one at a time."""
    core = u.shots in CORE_SHOTS
    base = u.method.removesuffix(FOLDS_SUFFIX)
    return (backbones.index(u.backbone), seeds.index(u.seed), 0 if core else 1, 1 if base == "dora" else 0,
            (5, 10, 20, 2, 50).index(u.shots) if u.shots in (5, 10, 20, 2, 50) else u.shots, METHODS.index(base),
            u.dataset, u.method != base)


def schedule(units: list[Unit], backbones: list[str], seeds: list[int]) -> list[Unit]:
    """The order units run in when CPU is short. The cheap units of the first backbone and seed at 5, 10 and 20
    shots first (the first fine-tunes' tasks: their features are computed then); then fine-tunes
    (:func:`_finetune_rank`) and the other cheap units (by seed, then backbone, then shots) alternately, one of each:
    a cheap unit costs a fraction of a fine-tune, so every task gets its probe row long before the fine-tunes are
    done."""
    first = [u for u in units if u.method == CHEAP and u.backbone == backbones[0] and u.seed == seeds[0]
             and u.shots in CORE_SHOTS]
    cheap = sorted((u for u in units if u.method == CHEAP and u not in first),
                   key=lambda u: (seeds.index(u.seed), backbones.index(u.backbone), u.shots not in CORE_SHOTS, u.shots,
                                  u.dataset))
    tunes = sorted((u for u in units if u.method != CHEAP), key=lambda u: _finetune_rank(u, backbones, seeds))
    first.sort(key=lambda u: (u.shots, u.dataset))
    mixed = [u for pair in zip(tunes, cheap) for u in pair]
    n = min(len(tunes), len(cheap))
    return first + mixed + tunes[n:] + cheap[n:]


# ----------------------------------------------------------------------------- what a unit computes (Ray-safe)


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


def _logloss(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits.double(), y))


def cheap_unit(x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, classes: int, run_seed: int) -> dict:
    """Probe and prototype on one task's features: test accuracies, auto's fold scores and meta-features."""
    t0, c0 = time.perf_counter(), time.process_time()
    x, y, xt, yt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(xt), torch.from_numpy(yt)
    k = fold_count(AUTO_FOLDS, y.numpy())
    folds: dict[str, list[float]] = {"probe": [], "prototype": []}
    logloss = []
    for tr, va in stratified_folds(y.numpy(), k, run_seed):
        tr, va = torch.from_numpy(tr), torch.from_numpy(va)
        probe = cheap_logits(PROBE, x[tr], y[tr], x[va], classes)
        folds["probe"].append(_accuracy(probe, y[va]))
        logloss.append(_logloss(probe, y[va]))
        folds["prototype"].append(_accuracy(cheap_logits(PROTOTYPE, x[tr], y[tr], x[va], classes), y[va]))
    both = cheap_logits(PROBE, x, y, torch.cat([xt, x]), classes)
    test = {"probe": _accuracy(both[: len(yt)], yt),
            "prototype": _accuracy(cheap_logits(PROTOTYPE, x, y, xt, classes), yt)}
    cv = {m: float(np.mean(v)) for m, v in folds.items()}
    train_acc = _accuracy(both[len(yt):], y)
    meta = {"probe_cv_accuracy": cv["probe"], "probe_cv_logloss": float(np.mean(logloss)), "probe_train_accuracy": train_acc,
            "probe_gap": train_acc - cv["probe"], "prototype_cv_accuracy": cv["prototype"],
            "prototype_gap": cv["prototype"] - cv["probe"], "folds_k": k}
    return {"test": test, "folds": folds, "fold_logloss": {"probe": logloss}, "meta": meta,
            "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def family_of(label: str) -> Any:
    """The :func:`~visiontune.auto.candidates.backbone_family` of the backbone ``label`` (a key of :data:`BACKBONES`)."""
    return backbone_family(load_config(None, overrides=["data.dataset=digits", *BACKBONES[label].overrides()]))


def finetune_overrides(spec: str, backbone: str, candidate: Iterable[str], n_train: int, args: Any, run_name: str) -> list[str]:
    """The overrides of one fine-tune in ``auto``'s fold regime: ``candidate`` on the backbone ``backbone`` (a key of
    :data:`BACKBONES`) for ``n_train`` images of the dataset ``spec``, batch :data:`BATCH`, epochs by
    :func:`~visiontune.auto.folds.fold_epochs` for ``args.steps`` optimizer steps; ``args.overrides`` last but the
    run's place (``args.runs``, ``run_name``) and ``args.threads``."""
    defaults = load_config(None, overrides=[f"data.dataset={spec}", *args.overrides])
    return [
        f"data.dataset={spec}", f"optim.batch_size={BATCH}", "run.measure_speed=false", *BACKBONES[backbone].overrides(),
        *candidate, *args.overrides, f"optim.epochs={fold_epochs(n_train, BATCH, defaults.optim.epochs, args.steps)}",
        "run.progress=false", "run.plots=false", f"run.dir={args.runs}", f"run.name={run_name}", "run.overwrite=true",
        f"run.threads={args.threads}",
    ]


def finetune_unit(overrides: list[str], train_recs: ImageRecords, test_recs: ImageRecords, head: tuple[np.ndarray, np.ndarray],
                  threads: int) -> dict:
    """One fine-tune in auto's fold regime; its test accuracy on the fixed test set (runs in a Ray worker)."""
    from visiontune.train.loop import train

    torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = load_config(None, overrides=overrides)
    empty = train_recs.subset(np.array([], dtype=np.int64))
    result = train(cfg, splits={"train": train_recs, "val": empty, "test": test_recs},
                   head_features=(torch.from_numpy(head[0]), torch.from_numpy(head[1])))
    m = result.metrics
    shutil.rmtree(result.run_dir, ignore_errors=True)  # the adapter is not kept: only its score matters here
    return {"test": float(m["test"]["accuracy"]), "n_test": int(m["test"]["num_samples"]), "epochs": cfg.optim.epochs,
            "train_s": float(m["train"]["wall_time_s"]), "trainable_pct": float(m["params"]["trainable_pct"]),
            "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def fold_unit(jobs: list[tuple], threads: int) -> dict:
    """A fine-tune on each of a task's first folds (``jobs``: :func:`finetune_unit`'s arguments per fold, the
    fold's held-out images as its test set): the fold accuracies ``auto`` would see (runs in a Ray worker)."""
    t0, c0 = time.perf_counter(), time.process_time()
    runs = [finetune_unit(*job, threads) for job in jobs]
    return {"folds": [r["test"] for r in runs], "fold_n": [r["n_test"] for r in runs], "epochs": [r["epochs"] for r in runs],
            "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


# ----------------------------------------------------------------------------- the driver


def code_version() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "src", "benchmarks"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def read_units(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: that unit runs again
                continue
    return rows


def append_unit(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _image_px(item: Any) -> float:
    """sqrt(width x height) of one image, from its header (files) or its shape (in-memory)."""
    if isinstance(item, np.ndarray):
        return math.sqrt(item.shape[0] * item.shape[1])
    from PIL import Image

    with Image.open(item) as im:
        return math.sqrt(im.size[0] * im.size[1])


class Harness:
    """Cut datasets, features and units for one invocation of ``run``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.datasets: dict[str, Dataset] = {}
        self.features: dict[tuple[str, str], Any] = {}  # (backbone, dataset) -> its FeatureCache
        self.models: dict[str, tuple[Any, Any]] = {}
        self.feature_rate: dict[tuple[str, str], float] = {}
        self.family: dict[str, Any] = {}
        self.code = code_version()

    def dataset(self, name: str) -> Dataset:
        if name not in self.datasets:
            a = self.args
            self.datasets[name] = cut(name, dataset_spec(name, a.data_root), a.test_per_class, a.pool_per_class, a.max_classes)
        return self.datasets[name]

    def units(self) -> list[Unit]:
        out = []
        for name in self.args.datasets:
            d = self.dataset(name)
            for b in self.args.backbones:
                for shots in self.args.shots:
                    if shots > d.max_shots():
                        continue  # the data does not allow it (README: what was not run)
                    for seed in self.args.seeds:
                        out.append(Unit(name, d.classes, shots, seed, b, CHEAP))
                        if seed in (self.args.finetune_seeds or self.args.seeds) and \
                                shots in (self.args.finetune_shots or self.args.shots):
                            out.extend(Unit(name, d.classes, shots, seed, b, m) for m in self.args.methods)
                            out.extend(Unit(name, d.classes, shots, seed, b, m + FOLDS_SUFFIX) for m in self.args.fold_methods)
        return schedule(out, self.args.backbones, self.args.seeds)

    def defaults(self, d: Dataset) -> Any:
        """The project's default config for ``d`` with ``--overrides`` (its run seed and epochs are what ``auto``
        starts from)."""
        return load_config(None, overrides=[f"data.dataset={d.spec}", *self.args.overrides])

    def backbone_family(self, label: str) -> Any:
        if label not in self.family:
            self.family[label] = family_of(label)
        return self.family[label]

    def feats(self, label: str, name: str, train: np.ndarray) -> dict[str, np.ndarray]:
        """Features of the test set and the images ``train`` of ``name`` on backbone ``label``: from the cache, the
        missing ones computed now (the eval transform's pooled pre-logits, as ``auto``'s cheap stage computes them).
        Only what a unit needs is computed, so a short run does not pay for the pool images of later seeds."""
        key = (label, name)
        d, b = self.dataset(name), BACKBONES[label]
        if key not in self.features:
            self.features[key] = ob.FeatureCache(self.args.cache, b, name)
        cache = self.features[key]
        timing_path = cache.path.with_suffix(".json")
        timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {"seconds": 0.0, "images": 0}
        needed = sorted({int(i) for i in d.test} | {int(i) for i in train})
        todo = [i for i in needed if d.records.ids[i] not in cache.feats]
        if todo:
            from visiontune.backbones import build_transform, create_backbone

            torch.set_num_threads(max(1, self.args.workers or os.cpu_count() or 1))
            if label not in self.models:
                model = create_backbone(ob._BB(b), 0).eval()
                self.models = {label: (model, build_transform(model, b.img_size, train=False))}  # one held at a time
            model, tf = self.models[label]
            seconds = ob.extract(model, tf, d.records, todo, cache, f"features {label} {name}")
            cache.save()
            timing = {"seconds": timing["seconds"] + seconds, "images": timing["images"] + len(todo),
                      "threads": torch.get_num_threads()}
            timing_path.write_text(json.dumps(timing) + "\n")
        self.feature_rate[key] = timing["seconds"] / max(1, timing["images"])
        return cache.feats

    def arrays(self, u: Unit) -> tuple[Dataset, np.ndarray, tuple[np.ndarray, ...]]:
        d = self.dataset(u.dataset)
        tr = d.shots(u.shots, u.seed)
        feats = self.feats(u.backbone, u.dataset, tr)

        def xy(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return (np.stack([feats[d.records.ids[i]] for i in idx]).astype(np.float32), d.records.labels[idx].astype(np.int64))

        return d, tr, (*xy(tr), *xy(d.test))

    def payload(self, u: Unit) -> tuple[Any, tuple]:
        """The function a unit runs and its arguments (plain data: a Ray worker needs nothing of this script)."""
        d, tr, (x, y, xt, yt) = self.arrays(u)
        if u.method == CHEAP:
            return cheap_unit, (x, y, xt, yt, d.classes, self.defaults(d).run.seed)
        base = u.method.removesuffix(FOLDS_SUFFIX)
        if base == u.method:
            return finetune_unit, (*self._finetune(u, d, tr, d.test, (x, y)), self.args.threads)
        folds = stratified_folds(y, fold_count(AUTO_FOLDS, y), self.defaults(d).run.seed)[: self.args.finetune_folds]
        jobs = [self._finetune(u, d, tr[a], tr[b], (x[a], y[a]), f"-fold{j + 1}") for j, (a, b) in enumerate(folds)]
        return fold_unit, (jobs, self.args.threads)

    def _finetune(self, u: Unit, d: Dataset, train: np.ndarray, test: np.ndarray, head: tuple[np.ndarray, np.ndarray],
                  suffix: str = "") -> tuple:
        """:func:`finetune_unit`'s arguments (but the threads) for ``u``'s candidate trained on the images ``train``
        of ``d`` (its LP-FT head from their features ``head``) and scored on the images ``test``."""
        cand = family_candidates(self.backbone_family(u.backbone))[_CANDIDATE_INDEX[u.method.removesuffix(FOLDS_SUFFIX)]]
        run_name = f"{u.task}-{u.backbone}-{u.method}{suffix}".replace("/", "-")
        overrides = finetune_overrides(d.spec, u.backbone, cand.overrides, len(train), self.args, run_name)
        return overrides, d.records.subset(train), d.records.subset(test), head

    def describe(self, u: Unit) -> dict:
        """The fields of a unit's row that do not depend on its result."""
        d, tr, _ = self.arrays(u)
        row = {"task": u.task, "dataset": u.dataset, "backbone": u.backbone, "method": u.method, "shots": u.shots,
               "seed": u.seed, "classes": d.classes, "pool": int(len(tr)), "n_test": int(len(d.test)), "code": self.code,
               "family": bd.DATASETS[u.dataset].family, "backbone_family": self.backbone_family(u.backbone).kind,
               "backbone_depth": self.backbone_family(u.backbone).depth}
        if u.method == CHEAP:
            sub = d.records.subset(tr)
            row["gray"] = bool(ob._gray(sub))
            row["image_px_median"] = float(statistics.median(_image_px(it) for it in sub.items))
            row["features_s"] = self.feature_rate[(u.backbone, u.dataset)] * (len(tr) + len(d.test))
        else:
            base = u.method.removesuffix(FOLDS_SUFFIX)
            row["candidate"] = family_candidates(self.backbone_family(u.backbone))[_CANDIDATE_INDEX[base]].name
            if base != u.method:
                row["folds_k"] = fold_count(AUTO_FOLDS, d.records.labels[tr])
            row["steps"] = self.args.steps
            if self.args.overrides:
                row["overrides"] = list(self.args.overrides)
        return row


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    units_path = out / UNITS
    done = {(r["task"], r["backbone"], r["method"]) for r in read_units(units_path)}
    h = Harness(args)
    todo = [u for u in h.units() if u.key not in done]
    print(f"{len(todo)} units to run ({len(done)} already in {units_path})", flush=True)
    if args.limit is not None:
        todo = todo[: args.limit]
    bar = tqdm(total=len(todo), desc="meta-benchmark", dynamic_ncols=True)
    finished = 0

    def record(u: Unit, result: dict, threads: int) -> None:
        nonlocal finished
        row = {**h.describe(u), **result, "threads": threads, "machine": ob._machine(threads),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        append_unit(units_path, row)
        finished += 1
        bar.update(1)
        if u.method != CHEAP:
            score = result["test"] if "test" in result else float(np.mean(result["folds"]))
            bar.write(f"{u.task} {u.backbone} {u.method}: {100 * score:.1f} % ({result['seconds']:.0f} s)")
        if finished % args.collect_every == 0:
            collect(out)

    if args.workers == 0:
        for u in todo:
            fn, fargs = h.payload(u)
            record(u, fn(*fargs), args.threads)
    else:
        try:
            import ray
        except ImportError as e:  # pragma: no cover - ray is a dependency of the project's sweeps
            raise SystemExit("--workers N needs ray (pip install 'visiontune[ray]'), or --workers 0") from e
        # Ray makes its workers 15 nicer than the driver; they keep the driver's niceness (`nice -n 10 ... run`)
        # instead, so that the units are not starved by the driver's own feature extraction on a shared machine.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 object_store_memory=512 * 1024 * 1024)
        remote = {fn: ray.remote(num_cpus=args.threads, max_retries=0)(fn) for fn in (cheap_unit, finetune_unit, fold_unit)}
        in_flight: dict[Any, Unit] = {}
        pending = list(todo)
        slots = max(1, args.workers // args.threads)
        try:
            while pending or in_flight:
                while pending and len(in_flight) < slots:
                    u = pending.pop(0)
                    fn, fargs = h.payload(u)
                    in_flight[remote[fn].remote(*fargs)] = u
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                u = in_flight.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except Exception as e:  # noqa: BLE001 - one failed unit is logged and left for a rerun
                    bar.write(f"FAILED {u.task} {u.backbone} {u.method}: {type(e).__name__}: {str(e)[-500:]}")
                    append_unit(out / "failed.jsonl", {"task": u.task, "backbone": u.backbone, "method": u.method,
                                                       "error": f"{type(e).__name__}: {str(e)[-2000:]}"})
                    continue
                record(u, result, args.threads)
        finally:
            ray.shutdown()
    bar.close()
    collect(out)
    return 0


# ----------------------------------------------------------------------------- collect: tasks.jsonl + README.md


def merge_rows(units: Iterable[dict]) -> list[dict]:
    """One row per task x backbone (the README's schema) from the units; a unit measured twice: the later wins."""
    rows: dict[tuple[str, str], dict] = {}
    for u in units:
        key = (u["task"], u["backbone"])
        r = rows.setdefault(key, {
            "task": u["task"], "dataset": u["dataset"], "family": u["family"], "backbone": u["backbone"],
            "backbone_family": u["backbone_family"], "shots": u["shots"], "seed": u["seed"], "classes": u["classes"],
            "pool": u["pool"], "n_test": u["n_test"], "meta": {}, "folds": {}, "test": {}, "seconds": {},
            "machine": None, "code": None, "machines": {}, "epochs": {},
        })
        if u["method"] == CHEAP:
            r["meta"] = {"shots_per_class": u["shots"], "classes": u["classes"], "pool": u["pool"], "gray": u["gray"],
                         "image_px_median": u["image_px_median"], **u["meta"]}
            r["folds"].update(u["folds"])
            r["fold_logloss"] = u["fold_logloss"]
            r["test"].update(u["test"])
            r["seconds"].update(features=round(u["features_s"], 2), cheap=round(u["seconds"], 2))
            r["machine"], r["code"] = u["machine"], u["code"]
        elif u["method"].endswith(FOLDS_SUFFIX):
            base = u["method"].removesuffix(FOLDS_SUFFIX)
            r["folds"][base] = u["folds"]  # the task's first folds only (regret.py cuts the probe's to match)
            r["seconds"][f"{base}_per_fold"] = round(u["seconds"] / len(u["folds"]), 2)
        else:
            r["test"][u["method"]] = u["test"]
            r["seconds"][u["method"]] = round(u["seconds"], 2)
            r["epochs"][u["method"]] = u["epochs"]
            r["code"] = r["code"] or u["code"]
        r["machines"][u["method"]] = u["machine"]
    for r in rows.values():
        r["machine"] = r["machine"] or next(iter(r["machines"].values()))
    return sorted(rows.values(), key=lambda r: (r["backbone"], r["dataset"], r["shots"], r["seed"]))


def collect(out: Path) -> list[dict]:
    units = read_units(out / UNITS)
    rows = merge_rows(units)
    tmp = out / (TASKS + ".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    tmp.replace(out / TASKS)
    (out / RENDERED).write_text(render(rows, units))
    return rows


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def render(rows: list[dict], units: list[dict]) -> str:
    """results/README.md: what the table holds, per backbone and shot level the mean test accuracy over seeds per
    dataset, and the mean gain of each fine-tune over the probe where both ran."""
    methods = ["probe", "prototype", *METHODS]
    lines = ["# Meta-benchmark results", "",
             f"Generated by `python benchmarks/meta/run.py collect` from `{UNITS}` ({len(units)} units) into `{TASKS}` "
             f"({len(rows)} task x backbone rows). How it was made: `benchmarks/meta/README.md`.", "",
             "## What the table holds", "", "| backbone | tasks | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for b in sorted({r["backbone"] for r in rows}):
        sel = [r for r in rows if r["backbone"] == b]
        lines.append(f"| {b} | {len(sel)} | " + " | ".join(str(sum(m in r["test"] for r in sel)) for m in methods) + " |")
    wall: dict[str, float] = defaultdict(float)
    for u in units:
        wall[u["method"]] += u["seconds"] * u.get("threads", 1)
    cpu = [u["cpu_s"] for u in units if "cpu_s" in u]
    lines += ["", "Unit time, wall seconds x torch threads: " + ", ".join(
        f"{k} {v / 3600:.2f} h over {sum(u['method'] == k for u in units)} units" for k, v in sorted(wall.items())) +
        (f"; process CPU time measured on {len(cpu)} units: {sum(cpu) / 3600:.2f} h" if cpu else "") +
        ". Feature extraction is not in these (see `benchmarks/meta/README.md`); on a shared machine wall time "
        "overstates the CPU a unit got.", ""]
    for b in sorted({r["backbone"] for r in rows}):
        for shots in sorted({r["shots"] for r in rows if r["backbone"] == b}):
            sel = [r for r in rows if r["backbone"] == b and r["shots"] == shots]
            shown = [m for m in methods if any(m in r["test"] for r in sel)]
            lines += [f"## {b}, {shots} per class: test accuracy % (mean over seeds; n = seeds with the probe)", "",
                      "| dataset | family | n | " + " | ".join(shown) + " |", "|---|---|---|" + "---|" * len(shown)]
            gains: dict[str, list[float]] = defaultdict(list)
            for name in sorted({r["dataset"] for r in sel}):
                rs = [r for r in sel if r["dataset"] == name]
                cells = []
                for m in shown:
                    v = [r["test"][m] for r in rs if m in r["test"]]
                    cells.append(_pct(float(np.mean(v))) + ("" if len(v) in (0, len(rs)) else f" (n={len(v)})") if v else "-")
                    if m in METHODS:
                        gains[m] += [r["test"][m] - r["test"]["probe"] for r in rs if m in r["test"] and "probe" in r["test"]]
                lines.append(f"| {name} | {rs[0]['family']} | {len(rs)} | " + " | ".join(cells) + " |")
            if gains:
                lines += ["", "Gain over the probe, points (tasks where both ran): " + "; ".join(
                    f"{m} {100 * np.mean(g):+.1f} mean, {100 * np.median(g):+.1f} median, better on {sum(x > 0 for x in g)} "
                    f"of {len(g)}" for m, g in gains.items() if g)]
            lines.append("")
    lines += ["## Datasets", "", "Full provenance (label derivation, selection rules, notes): "
              "[`benchmarks/datasets/DATASETS.md`](../../datasets/DATASETS.md).", "",
              "| dataset | family | classes (in the tasks) | source | licence |", "|---|---|---|---|---|"]
    for name in sorted({r["dataset"] for r in rows}):
        d = bd.DATASETS[name]
        k = next(r["classes"] for r in rows if r["dataset"] == name)
        lines.append(f"| {name} | {d.family} | {k} | {bd._md_cell(bd.source_text(d))} | {bd._md_cell(d.licence)} |")
    machines = sorted({u["machine"] for u in units})
    lines += ["", "Machines: " + "; ".join(machines), f"Python {platform.python_version()}.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run every unit not yet in OUT/units.jsonl, in priority order, then collect")
    c = sub.add_parser("collect", help="OUT/tasks.jsonl and OUT/README.md from OUT/units.jsonl")
    for q in (r, c):
        q.add_argument("--out", type=Path, default=HERE / "results")
    r.add_argument("--data-root", type=Path, default=Path("/work/data"),
                   help="where `benchmarks/datasets.py extract-all --out` put the image folders")
    r.add_argument("--datasets", nargs="+", default=list(bd.DATASETS), choices=sorted(bd.DATASETS))
    r.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES, choices=sorted(BACKBONES))
    r.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS, help="fine-tunes (none: cheap part only)")
    r.add_argument("--fold-methods", nargs="*", default=["lora"], choices=METHODS,
                   help="fine-tunes that also get fold units (none: test accuracies only)")
    r.add_argument("--finetune-folds", type=int, default=2,
                   help="how many of a task's folds a fold unit fine-tunes (the first ones)")
    r.add_argument("--shots", nargs="+", type=int, default=DEFAULT_SHOTS)
    r.add_argument("--seeds", nargs="+", type=int, default=DEFAULT_SEEDS)
    r.add_argument("--finetune-shots", nargs="+", type=int, default=None, help="shot levels that get fine-tunes (all)")
    r.add_argument("--finetune-seeds", nargs="+", type=int, default=None, help="seeds that get fine-tunes (all)")
    r.add_argument("--test-per-class", type=int, default=30)
    r.add_argument("--pool-per-class", type=int, default=50)
    r.add_argument("--max-classes", type=int, default=10)
    r.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Ray CPUs (0: in this process)")
    r.add_argument("--threads", type=int, default=1, help="torch threads (and Ray CPUs) per unit")
    r.add_argument("--steps", type=int, default=FINETUNE_STEPS, help="a fine-tune's optimizer steps (auto's schedule)")
    r.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every fine-tune (tests only: the table uses the project defaults)")
    r.add_argument("--limit", type=int, default=None, help="run at most this many units")
    r.add_argument("--collect-every", type=int, default=10, help="re-collect after this many units")
    r.add_argument("--cache", type=Path, default=Path("runs/meta/features"))
    r.add_argument("--runs", type=Path, default=Path("runs/meta/runs"))
    args = p.parse_args(argv)
    if args.command == "collect":
        rows = collect(args.out)
        print(f"{len(rows)} rows -> {args.out / TASKS}")
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
