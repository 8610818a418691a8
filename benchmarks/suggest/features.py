"""Features of the simulation's images: DINOv2-S (offline, 112 px) pooled pre-logits, computed once per image.

For each dataset folder, up to ``--per-class`` images per class are drawn (seed 0; images whose features the
meta-benchmark already cached come first, so ``--seed-cache`` saves their forward passes) and their features
are stored in ``--cache/dinov2-112--NAME.npz`` (:class:`benchmarks.offline_backbones.FeatureCache`, the same
extraction the meta-benchmark and ``auto``'s cheap stage use: eval transform, ``forward_head(pre_logits=True)``).

Usage (repo root)::

    python benchmarks/suggest/features.py --cache runs/suggest/features --seed-cache runs/meta/features \\
        --data neu_steel6=/work/data/neu_steel6 --data pbc_blood8=/work/data/pbc_blood8 ...
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import offline_backbones as ob  # noqa: E402

from visiontune.backbones import build_transform, create_backbone  # noqa: E402
from visiontune.data.sources import load_records  # noqa: E402


def chosen(records, cached: set[str], per_class: int) -> list[int]:
    """Indices of at most ``per_class`` images per class: cached ones first, then a seed-0 shuffle of the rest."""
    rng = np.random.default_rng(0)
    out = []
    for c in range(len(records.classes)):
        idx = np.flatnonzero(records.labels == c)
        idx = idx[rng.permutation(len(idx))]
        first = [i for i in idx if records.ids[i] in cached]
        rest = [i for i in idx if records.ids[i] not in cached]
        out += (first + rest)[:per_class]
    return sorted(int(i) for i in out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", action="append", required=True, help="NAME=FOLDER")
    p.add_argument("--cache", type=Path, default=Path("runs/suggest/features"))
    p.add_argument("--seed-cache", type=Path, default=None)
    p.add_argument("--per-class", type=int, default=130)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 on a shared machine)")
    args = p.parse_args()
    b = ob.BACKBONES["dinov2-112"]
    torch.set_num_threads(args.threads)
    model = create_backbone(ob._BB(b), 0).eval()
    tf = build_transform(model, b.img_size, train=False)
    for spec in args.data:
        name, folder = spec.split("=", 1)
        target = args.cache / f"{b.label}--{name}.npz"
        if args.seed_cache and not target.exists() and (args.seed_cache / target.name).is_file():
            args.cache.mkdir(parents=True, exist_ok=True)
            shutil.copy(args.seed_cache / target.name, target)
        cache = ob.FeatureCache(args.cache, b, name)
        records = load_records(folder)
        todo = [i for i in chosen(records, set(cache.feats), args.per_class) if records.ids[i] not in cache.feats]
        if todo:
            ob.extract(model, tf, records, todo, cache, f"features {name}")
            cache.save()
        print(name, len(cache.feats), "images cached", flush=True)


if __name__ == "__main__":
    main()
