"""Multispectral comparison on DERIVED bands: RGB only vs the widened patch embedding vs an ExPLoRA-pretrained
13-band backbone, each with a linear probe and LoRA on top, same labels, same test split.

No real multispectral imagery (EuroSAT-MS / Sentinel-2 patches as .tif / .npy) was found committed in a public
repository reachable here (see docs/how-to/multispectral.md), so the 13 bands are computed from the real RGB aerial
tiles of ``aid_aerial10`` (AID, Google Earth imagery; benchmarks/datasets/DATASETS.md): the three colours, gray,
three normalised colour differences, gradient magnitude, absolute Laplacian, local standard deviation, and the
three colours blurred. They are a function of the RGB pixels, NOT spectral measurements: the table measures the
plumbing and the initialisation, not what infrared bands would add.

Usage (from the repo root; CPU-sized: a few minutes per run on 2 cores):
    .venv/bin/python benchmarks/multispectral.py --out benchmarks/results/multispectral

Writes ``<out>/data`` (the derived .npy arrays: 64 labeled + 24 unlabeled-pool tiles per class at 64 px),
``<out>/runs``, ``<out>/results.json`` and ``<out>/results.md`` (the table with the command of every run).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from visiontune.cli import main as cli

SOURCE = Path("/work/data/aid_aerial10")
BAND_NAMES = ["red", "green", "blue", "gray", "(r-g)/(r+g)", "(g-b)/(g+b)", "(r-b)/(r+b)", "|gradient|", "|laplacian|",
              "local std 5x5", "red blurred", "green blurred", "blue blurred"]
RGB = [0, 1, 2]


def derive(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> HxWx13 float32 (see the module docstring); scaled roughly to 0..1 like reflectance."""
    from scipy import ndimage

    x = rgb.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    gray = 0.299 * r + 0.587 * g + 0.114 * b
    eps = 1e-3

    def nd(a: np.ndarray, c: np.ndarray) -> np.ndarray:
        return (a - c) / (a + c + eps)

    grad = np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1))
    lap = np.abs(ndimage.laplace(gray))
    mean = ndimage.uniform_filter(gray, 5)
    std = np.sqrt(np.clip(ndimage.uniform_filter(gray * gray, 5) - mean * mean, 0, None))
    blur = [ndimage.gaussian_filter(c, 2.0) for c in (r, g, b)]
    return np.stack([r, g, b, gray, nd(r, g), nd(g, b), nd(r, b), grad, lap, std, *blur], axis=-1).astype(np.float32)


def build(out: Path, labeled: int, pool: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    """Derived arrays: ``out/labeled/<class>/*.npy`` and ``out/unlabeled/*.npy`` (disjoint tiles)."""
    lab, unl = out / "labeled", out / "unlabeled"
    if lab.is_dir() and unl.is_dir():
        return lab, unl
    rng = np.random.default_rng(seed)
    for cls in sorted(p.name for p in SOURCE.iterdir() if p.is_dir()):
        files = sorted((SOURCE / cls).iterdir())
        pick = rng.permutation(len(files))[: labeled + pool]
        (lab / cls).mkdir(parents=True, exist_ok=True)
        unl.mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(pick):
            img = Image.open(files[i]).convert("RGB").resize((size, size), Image.BICUBIC)
            dest = lab / cls / f"{files[i].stem}.npy" if k < labeled else unl / f"{cls}-{files[i].stem}.npy"
            np.save(dest, derive(np.asarray(img)))
    return lab, unl


def run(argv: list[str]) -> tuple[dict, float]:
    t = time.perf_counter()
    assert cli(argv) == 0, argv
    return json.loads((_run_dir(argv) / "metrics.json").read_text()), time.perf_counter() - t


def _run_dir(argv: list[str]) -> Path:
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    return Path(opts["run.dir"]) / opts["run.name"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/multispectral"))
    ap.add_argument("--per-class", type=int, default=5, help="labeled training images per class")
    ap.add_argument("--test-per-class", type=int, default=30)
    ap.add_argument("--img-size", type=int, default=56)
    ap.add_argument("--pretrain-steps", type=int, default=24)
    ap.add_argument("--lora-epochs", type=int, default=10)
    args = ap.parse_args()
    out = args.out.resolve()
    lab, unl = build(out / "data", labeled=64, pool=24, size=64)
    runs = out / "runs"
    common = [f"data.dataset={lab}", "data.channels=13", f"data.train_per_class={args.per_class}",
              f"data.test_per_class={args.test_per_class}", "backbone.name=vit_small_patch14_dinov2",
              f"backbone.img_size={args.img_size}", "run.progress=false", "run.measure_speed=false", f"run.dir={runs}"]
    pre_dir = out / "pretrain"
    pretrain = ["pretrain", f"data.dataset={unl}", "data.channels=13", "backbone.name=vit_small_patch14_dinov2",
                "backbone.weights=offline", f"backbone.img_size={args.img_size}", "crops.photometric=false",
                f"crops.global_size={args.img_size}", "crops.local_size=28", "crops.local_number=2",
                f"optim.steps={args.pretrain_steps}", "optim.batch_size=8", "explora.recipe=D-ExPLoRA-[L]-r64",
                "run.progress=false", "run.plot=false", f"run.dir={pre_dir}", "run.name=explora"]
    backbone = pre_dir / "explora" / "backbone.safetensors"
    t0 = time.perf_counter()
    if not backbone.is_file():
        assert cli(pretrain) == 0
    pretrain_s = time.perf_counter() - t0
    inputs = {
        "RGB only (data.bands=[0,1,2])": ("rgb", ["backbone.weights=offline", "data.bands=[0,1,2]"]),
        "13 bands, widened patch embedding": ("widened", ["backbone.weights=offline", "backbone.rgb_bands=[0,1,2]"]),
        "13 bands, ExPLoRA-pretrained": ("explora", [f"backbone.weights={backbone}"]),
    }
    methods = {"linear probe": ["method.name=linear"],
               "LoRA r8 q,v": ["method.name=lora", "method.rank=8", f"optim.epochs={args.lora_epochs}", "optim.batch_size=16"]}
    rows = []
    for inp, (key, extra) in inputs.items():
        for meth, mextra in methods.items():
            name = f"{key}-{meth.split()[0].lower()}"
            argv = ["train", *common, *extra, *mextra, f"run.name={name}", "run.overwrite=true"]
            metrics, secs = run(argv)
            rows.append({"input": inp, "method": meth, "accuracy": metrics["test"]["accuracy"],
                         "f1_weighted": metrics["test"]["f1_weighted"], "test_size": metrics["run"]["test_size"],
                         "input_init": metrics["run"]["backbone_identity"].get("input_init", "RGB (3 bands)"),
                         "wall_s": secs, "command": "visiontune " + shlex.join(argv)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"rows": rows, "pretrain": {"command": "visiontune " + shlex.join(pretrain), "wall_s": pretrain_s},
              "bands": BAND_NAMES, "cpu": _cpu()}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = ["| input | method | test accuracy | weighted F1 | test images |", "|---|---|---|---|---|"]
    lines += [f"| {r['input']} | {r['method']} | {100 * r['accuracy']:.1f} % | {100 * r['f1_weighted']:.1f} % | {r['test_size']} |"
              for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
