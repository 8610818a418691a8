"""A large unlabeled pool made of real images: ``--n`` small JPEG crops of the image folders under ``--src``.

Each source image (all of /work/data/*/*/*, sorted, walked round-robin) is resized to 96 px on its shorter side and
cut into random 48x48 crops (seeded) until ``--n`` files exist, in sub-folders of 1,000 files.

Usage (repo root)::

    python benchmarks/suggest/make_pool.py --src /work/data --out runs/suggest/pool100k --n 100000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--size", type=int, default=48)
    args = p.parse_args()
    sources = sorted(q for q in args.src.glob("*/*/*") if q.suffix.lower() in (".jpg", ".jpeg", ".png"))
    per = -(-args.n // len(sources))
    rng = np.random.default_rng(0)
    k = 0
    with tqdm(total=args.n, desc="crops") as bar:
        for src in sources:
            if k >= args.n:
                break
            with Image.open(src) as im:
                im = im.convert("RGB")
                im.thumbnail((10_000, 96)) if im.height < im.width else im.thumbnail((96, 10_000))
                for _ in range(min(per, args.n - k)):
                    x = int(rng.integers(0, max(1, im.width - args.size + 1)))
                    y = int(rng.integers(0, max(1, im.height - args.size + 1)))
                    folder = args.out / f"{k // 1000:03d}"
                    folder.mkdir(parents=True, exist_ok=True)
                    im.crop((x, y, x + args.size, y + args.size)).save(folder / f"{k:06d}.jpg", quality=90)
                    k += 1
                    bar.update(1)
    print(k, "images from", len(sources), "sources")


if __name__ == "__main__":
    main()
