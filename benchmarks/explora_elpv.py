"""ExPLoRA on ELPV: does extended pretraining improve the linear probe of DINOv2-S over the original backbone?

Usage (from the repo root; the pretraining is the long part):
    .venv/bin/python -m visiontune.cli pretrain --config configs/pretrain/explora-elpv.yaml
    .venv/bin/python benchmarks/explora_elpv.py --pretrain-run runs/pretrain/explora-elpv \
        --probe-config configs/demo.yaml --out benchmarks/results/explora-elpv

For the original backbone and for every backbone of the pretraining run (the EMA teacher it saved,
and the student exported from its last checkpoint), on the probe config's split (ELPV, 20 labeled
images per class, up to 100 per class tested, seed 0):

* the library's linear probe (``method.name=linear``, ``backbone.weights=<file>``): test accuracy and F1;
* the same probe's test accuracy over a fixed grid of C (is a difference robust to the C that cross-validation picks?);
* k-nearest-neighbour classifiers (k = 5, 10, 20) on L2-normalised features (no fitting: the feature geometry);
* how far the features moved: linear CKA between original and adapted test features, and the
  spread of the features (mean per-dimension std of normalised features x sqrt(dim); 0 = collapsed).

Writes ``<out>/results.json`` and ``<out>/loss.png`` (copied from the run); the README there is written by hand
from these numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import visiontune as vt


def _features(cfg: vt.Config, cache: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pooled features of the train and test split of ``cfg`` (eval transform, no augmentation), cached in ``cache``."""
    if cache.is_file():
        z = np.load(cache)
        return {s: (z[f"{s}_x"], z[f"{s}_y"]) for s in ("train", "test")}
    from visiontune.backbones import build_transform, create_backbone
    from visiontune.data import ImageDataset, load_records, make_splits
    from visiontune.runtime import make_loader
    from visiontune.train.loop import extract_features

    records = load_records(cfg.data.dataset, root=cfg.data.root)
    splits = make_splits(records, cfg.data)
    model = create_backbone(cfg.backbone, num_classes=len(records.classes)).eval()
    tf = build_transform(model, cfg.backbone.img_size, train=False)
    out = {}
    for s in ("train", "test"):
        x, y = extract_features(model, make_loader(ImageDataset(splits[s], tf), 64, False, 0, 0), torch.device("cpu"))
        out[s] = (x.numpy().astype(np.float64), y.numpy())
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **{f"{s}_{k}": v for s, (x, y) in out.items() for k, v in (("x", x), ("y", y))})
    return out


def _probe_by_c(feats: dict[str, tuple[np.ndarray, np.ndarray]], grid: list[float]) -> dict[str, float]:
    """Test accuracy of a standardised logistic-regression probe at each C: is a difference robust to the C choice?"""
    from sklearn.linear_model import LogisticRegression

    (xtr, ytr), (xte, yte) = feats["train"], feats["test"]
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-8
    out = {}
    for c in grid:
        clf = LogisticRegression(C=c, max_iter=1000).fit((xtr - mu) / sd, ytr)
        out[f"{c:g}"] = float((clf.predict((xte - mu) / sd) == yte).mean())
    return out


def _knn(feats: dict[str, tuple[np.ndarray, np.ndarray]], k: int) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    (xtr, ytr), (xte, yte) = feats["train"], feats["test"]
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance").fit(norm(xtr), ytr)
    return float((clf.predict(norm(xte)) == yte).mean())


def _cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear centered kernel alignment (Kornblith et al., 2019): 1 = the same features up to rotation and scale."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    num = np.linalg.norm(b.T @ a, "fro") ** 2
    return float(num / (np.linalg.norm(a.T @ a, "fro") * np.linalg.norm(b.T @ b, "fro")))


def _spread(x: np.ndarray) -> float:
    n = x / np.linalg.norm(x, axis=1, keepdims=True)
    return float(n.std(0).mean() * np.sqrt(x.shape[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-run", required=True, help="a finished `visiontune pretrain` run directory")
    p.add_argument("--probe-config", default="configs/demo.yaml")
    p.add_argument("--out", required=True)
    p.add_argument("--retrain", action="store_true", help="redo the probes even when their run directories are finished")
    p.add_argument("--runs-dir", default="runs/explora-probe")
    args = p.parse_args(argv)
    from visiontune.pretrain import export_checkpoint

    run = Path(args.pretrain_run)
    lineage = json.loads((run / "backbone.json").read_text())
    student = run / "student-final.safetensors"
    if not student.is_file():
        export_checkpoint(run, "student", student)
    candidates = {"original": None, f"explora ({lineage['backbone']['network']})": run / "backbone.safetensors",
                  "explora (student)": student}
    base_feats = None
    rows = {}
    for label, weights in candidates.items():
        over = ["method.name=linear", f"run.dir={args.runs_dir}", f"run.name={label.replace(' ', '-').strip('()')}",
                "run.overwrite=true", "run.progress=false"]
        if weights is not None:
            over.append(f"backbone.weights={weights}")
        cfg = vt.load_config(args.probe_config, overrides=over)
        t0 = time.perf_counter()
        done = Path(cfg.run.dir) / str(cfg.run.name) / "metrics.json"
        metrics = json.loads(done.read_text()) if done.is_file() and not args.retrain else vt.train(cfg).metrics
        feats = _features(cfg, Path(cfg.run.dir) / f"{cfg.run.name}-features.npz")
        base_feats = base_feats or feats
        rows[label] = {
            "weights": str(weights) if weights else cfg.backbone.weights,
            "probe_accuracy": metrics["test"]["accuracy"], "probe_f1_weighted": metrics["test"]["f1_weighted"],
            "probe_f1_macro": metrics["test"]["f1_macro"], "probe_c": metrics["train"].get("c"),
            "probe_accuracy_by_c": _probe_by_c(feats, [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]),
            **{f"knn{k}_accuracy": _knn(feats, k) for k in (5, 10, 20)},
            "cka_vs_original_test": _cka(base_feats["test"][0], feats["test"][0]),
            "feature_spread_test": _spread(feats["test"][0]),
            "test_images": int(len(feats["test"][1])), "train_images": int(len(feats["train"][1])),
            "seconds": time.perf_counter() - t0,
        }
        print(label, json.dumps(rows[label]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if (run / "loss.png").is_file():
        shutil.copy(run / "loss.png", out / "loss.png")
    (out / "results.json").write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/explora_elpv.py", *(sys.argv[1:] if argv is None else argv)]),
        "pretraining": {k: lineage[k] for k in ("recipe", "base", "data", "training", "explora")},
        "probes": rows,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
