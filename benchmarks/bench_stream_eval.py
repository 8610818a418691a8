"""Streaming evaluation/prediction over a large image folder: images per second and peak memory (issue 19, part 2).

Makes a synthetic labeled folder of N small PNGs (digits, upscaled with noise so every file differs; classes
"0".."9"), trains a tiny run on the built-in digits data (random-init ``test_vit``: the point is the data path,
not accuracy), then times, each in a fresh process while sampling the resident memory of that process and its
DataLoader workers every 50 ms:

* ``visiontune eval RUN --data FOLDER --workers W --predictions eval.csv``
* ``visiontune predict RUN FOLDER --workers W --output predict.csv``

on the full folder and on a tenth of it: if memory is bounded, the peak does not grow with the folder.
Figures are end to end (process start, folder scan with header checks, decode, forward, CSV).

    python benchmarks/bench_stream_eval.py --images 20000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, n: int, size: int, seed: int = 0) -> float:
    """``n`` PNGs of ``size`` px in ``root/<digit>/``; returns seconds taken (0 when already there)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    marker = root / f".complete-{n}-{size}"
    if marker.exists():
        return 0.0
    t0 = time.perf_counter()
    d = load_digits()
    rng = np.random.default_rng(seed)
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        k = i % len(d.images)
        img = np.kron(d.images[k] * 15, np.ones((size // 8, size // 8)))
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / str(d.target[k]) / f"{i:06d}.png")
    marker.touch()
    return time.perf_counter() - t0


def subset_folder(src: Path, dst: Path, n: int) -> None:
    """The first ``n`` images of ``src`` as links in ``dst`` (same files, fewer of them)."""
    if (dst / f".complete-{n}").exists():
        return
    files = sorted(src.glob("*/*.png"))[:n]
    for f in files:
        (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
        target = dst / f.parent.name / f.name
        if not target.exists():
            os.link(f, target)
    (dst / f".complete-{n}").touch()


def run_measured(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd``; wall seconds and the peak RSS of the main process and of it plus its children (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak_main = peak_tree = 0
    while proc.poll() is None:
        try:
            main = ps.memory_info().rss
            tree = main + sum(c.memory_info().rss for c in ps.children(recursive=True))
        except psutil.Error:
            continue
        peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode not in (0,):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": wall, "peak_rss_main_mib": peak_main / 2**20, "peak_rss_with_workers_mib": peak_tree / 2**20,
            "stdout_tail": out[-400:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--size", type=int, default=32, help="PNG side in pixels (the tiny run's input size)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--work", default="/tmp/visiontune-stream-bench", help="folder for the images and the run")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/stream-eval.json"))
    args = ap.parse_args()

    work = Path(args.work)
    full, tenth = work / f"images-{args.images}", work / f"images-{args.images // 10}"
    made = make_folder(full, args.images, args.size)
    subset_folder(full, tenth, args.images // 10)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    vt = [sys.executable, "-m", "visiontune.cli"]
    run = work / "runs" / "tiny"
    if not (run / "metrics.json").exists():
        subprocess.run([*vt, "train", "data.dataset=digits", "backbone.name=test_vit", "backbone.weights=none",
                        f"backbone.img_size={args.size}", "method.name=lora", "optim.epochs=1", "run.progress=false",
                        "run.measure_speed=false", f"run.dir={work / 'runs'}", "run.name=tiny", "run.overwrite=true"],
                       env=env, check=True, capture_output=True)
    rows = []
    for folder, n in ((tenth, args.images // 10), (full, args.images)):
        for name, cmd in (
            ("eval", [*vt, "eval", str(run), "--data", str(folder), "--workers", str(args.workers), "--batch-size",
                      str(args.batch_size), "--predictions", str(work / "eval.csv"), "--quiet"]),
            ("predict", [*vt, "predict", str(run), str(folder), "--workers", str(args.workers), "--batch-size",
                         str(args.batch_size), "--output", str(work / "predict.csv"), "--quiet"]),
        ):
            r = run_measured(cmd, env)
            with open(work / f"{name}.csv") as f:
                lines = sum(1 for _ in f) - 1
            assert lines == n, f"{name} wrote {lines} rows for {n} images"
            row = {"command": name, "images": n, "rows_written": lines, "img_per_s": n / r["wall_s"], **r}
            rows.append(row)
            print(f"{name:8s} {n:6d} images  {row['img_per_s']:7.1f} img/s  {r['wall_s']:6.1f} s  peak RSS main "
                  f"{r['peak_rss_main_mib']:6.0f} MiB, with workers {r['peak_rss_with_workers_mib']:6.0f} MiB", flush=True)
    info = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "images": args.images,
            "png_px": args.size, "workers": args.workers, "batch_size": args.batch_size,
            "folder_made_s": made, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(info, indent=1))
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
