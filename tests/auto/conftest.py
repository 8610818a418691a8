"""A small synthetic meta-benchmark table (``benchmarks/meta/results/tasks.jsonl``'s schema) for the prior's tests."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest


def synthetic_meta_table(datasets: int = 6, tasks: int = 6, seed: int = 0, fold_scores: bool = False,
                         offset_sd: float = 0.03) -> list[dict[str, Any]]:
    """Rows per dataset x backbone x task: a fine-tune's gain over the probe falls as the probe's accuracy rises (as on
    VTAB-1k), plus a per-dataset offset of sd ``offset_sd`` (what leave-one-dataset-out must not see) and noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(datasets):
        name = f"set{d}"
        offset = rng.normal(0, offset_sd)
        for backbone, family in (("dinov2-112", "transformer"), ("lite0-224", "cnn")):
            for t in range(tasks):
                shots = (5, 10, 20)[t % 3]
                probe_cv = float(np.clip(0.45 + 0.08 * math.log2(shots / 5) + rng.normal(0, 0.06), 0.2, 0.95))
                probe_test = float(np.clip(probe_cv + rng.normal(0, 0.02), 0, 1))
                gains = {"lora": 0.20 - 0.25 * probe_cv, "lora_lastk": 0.15 - 0.2 * probe_cv, "dora": 0.21 - 0.25 * probe_cv,
                         "full": 0.10 - 0.2 * probe_cv}
                test = {"probe": probe_test, "prototype": probe_test - 0.03,
                        **{k: float(np.clip(probe_test + g + offset + rng.normal(0, 0.01), 0, 1)) for k, g in gains.items()}}
                meta = {"shots_per_class": shots, "classes": 5, "pool": 5 * shots, "gray": d % 3 == 0, "image_px_median": 64,
                        "probe_cv_accuracy": probe_cv, "probe_cv_logloss": 1.6 - 1.2 * probe_cv,
                        "probe_train_accuracy": 1.0, "probe_gap": 1.0 - probe_cv,
                        "prototype_cv_accuracy": probe_cv - 0.03, "prototype_gap": -0.03}
                row = {"task": f"{name}/k5/s{shots}/seed{t}", "dataset": name, "family": f"domain{d % 3}",
                       "backbone": backbone, "backbone_family": family, "shots": shots, "seed": t, "classes": 5,
                       "pool": 5 * shots, "n_test": 100, "meta": meta, "test": test,
                       "folds": {"probe": list(probe_cv + rng.normal(0, 0.04, 5)),
                                 "prototype": list(probe_cv - 0.03 + rng.normal(0, 0.04, 5))},
                       "seconds": {"probe": 1.0, "prototype": 0.5, "lora": 30.0, "lora_lastk": 10.0, "dora": 60.0,
                                   "full": 40.0}, "machine": "synthetic", "code": "0000000"}
                if fold_scores:
                    for k in ("lora", "lora_lastk", "dora"):
                        row["folds"][k] = list(np.array(row["folds"]["probe"]) + (test[k] - probe_test)
                                               + rng.normal(0, 0.05, 5))
                rows.append(row)
    return rows


@pytest.fixture
def meta_table() -> Callable[..., list[dict[str, Any]]]:
    return synthetic_meta_table
