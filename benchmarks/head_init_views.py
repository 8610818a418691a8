"""Does fitting the LP-FT probe head on augmented views help the fine-tune that follows? (optim.head_init_views)

Why: with ``optim.head_init=probe`` the head is fitted on clean views of the training images, but fine-tuning
feeds it augmented crops, on which that head is badly calibrated (first-epoch training loss 2.0-3.8 on ELPV's
4 classes, above ln 4). ``optim.head_init_views=4`` fits the probe on the clean view plus 3 augmented views.
The same views for the linear probe itself (``method.views``) are measured beside it.

Grid: ELPV 20/class and Fashion-MNIST 10/class, three training draws (``data.seed`` 0-2), real DINOv2-S
(offline weights) at 112 px, LoRA q,v r8 for 10 epochs at batch 16; each run a fresh ``visiontune train``
process with the rest at defaults, scored on <=100 test images per class of the same draw. Runs whose
``metrics.json`` exists are not repeated (so a killed study continues).

Usage (from the repo root):
    .venv/bin/python benchmarks/head_init_views.py --runs /tmp/head-init-views --out benchmarks/results/head-init-views
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from visiontune.infer.backends import cpu_info

DATASETS = {"elpv": 20, "fashion-mnist": 10}
CONFIGS = {  # name -> (method, views, overrides)
    "lora v1": ["method.name=lora", "method.targets=[qv]", "method.rank=8", "optim.head_init_views=1"],
    "lora v4": ["method.name=lora", "method.targets=[qv]", "method.rank=8", "optim.head_init_views=4"],
    "linear v1": ["method.name=linear", "method.views=1"],
    "linear v4": ["method.name=linear", "method.views=4"],
}
COMMON = ["data.test_per_class=100", "backbone.weights=offline", "backbone.img_size=112", "optim.epochs=10",
          "optim.batch_size=16", "run.progress=false", "run.overwrite=true"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, help="folder for the runs (kept, so a rerun only tabulates)")
    p.add_argument("--out", required=True, help="folder for README-ready results.md and results.json")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    machine = cpu_info()
    runs = Path(args.runs)
    jobs = [(ds, n, s, c) for s in range(args.seeds) for ds, n in DATASETS.items() for c in CONFIGS]
    acc: dict[tuple[str, int, str], float] = {}
    for ds, n, seed, conf in tqdm(jobs, desc="runs", dynamic_ncols=True):
        name = f"{ds}-s{seed}-{conf.replace(' ', '-')}"
        metrics = runs / name / "metrics.json"
        if not metrics.exists():
            cmd = [str(Path(sys.executable).with_name("visiontune")), "train", f"data.dataset={ds}", f"data.train_per_class={n}",
                   f"data.seed={seed}", *COMMON, *CONFIGS[conf], f"run.dir={runs}", f"run.name={name}"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        acc[(ds, seed, conf)] = 100 * json.loads(metrics.read_text())["test"]["accuracy"]

    lines = [
        "# LP-FT probe head on augmented views (`optim.head_init_views`), and the probe's own views (`method.views`)",
        "",
        f"Command: `.venv/bin/python {' '.join(map(shlex.quote, ['benchmarks/head_init_views.py', *(argv or sys.argv[1:])]))}`",
        f"(CPU: {machine['cpu']}, {machine['cores']} cores, {' '.join(machine['isa'])}; each run a fresh "
        "`visiontune train` process; grid and settings in the script's docstring).",
        "",
        "Test accuracy (%), one row per training draw; v4 - v1 is paired (same training and test images).",
        "",
        "| dataset | seed | LoRA v1 | LoRA v4 | v4 - v1 | probe v1 | probe v4 | v4 - v1 |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary = {}
    for ds in DATASETS:
        d = {"lora": [], "linear": []}
        for s in range(args.seeds):
            row = [ds, str(s)]
            for m in ("lora", "linear"):
                a, b = acc[(ds, s, f"{m} v1")], acc[(ds, s, f"{m} v4")]
                d[m].append(b - a)
                row += [f"{a:.1f}", f"{b:.1f}", f"{b - a:+.1f}"]
            lines.append("| " + " | ".join(row) + " |")
        for m, diffs in d.items():
            se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
            summary[f"{ds} {m}"] = {"mean_diff": statistics.fmean(diffs), "se": se, "diffs": diffs}
    lines += ["", "Mean paired difference v4 - v1 over the draws, +- one standard error of that mean:", ""]
    lines += [f"- {k}: {v['mean_diff']:+.1f} +- {v['se']:.1f} points" for k, v in summary.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(
        {"machine": machine, "accuracy": {f"{k[0]} s{k[1]} {k[2]}": v for k, v in acc.items()}, "summary": summary}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
