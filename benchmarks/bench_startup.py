"""Cold start of the command line: how long ``visiontune --help``, ``list methods``, ``doctor --offline`` and a
``predict`` of a tiny LoRA run take as whole processes (issue 29: a user pays this on every command).

Each command runs ``--runs`` times (after one warm-up run that fills the OS file cache) in a fresh interpreter;
the figures are the medians of its wall time and of its CPU time (user + system of the child, from
``getrusage``). On a shared machine the wall time includes waiting for a core; the CPU time does not, so it is the
figure to compare across runs. The predict run also records which of peft / bitsandbytes the process imported.

    python benchmarks/bench_startup.py --runs 5 --out benchmarks/results/startup.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.dataset=digits", "data.train_per_class=4", "data.test_per_class=4", "backbone.name=test_vit",
        "backbone.weights=none", "backbone.img_size=32", "optim.epochs=1", "run.progress=false",
        "run.measure_speed=false", "run.plots=false", "method.name=lora"]
REPORT_IMPORTS = ("import sys, runpy\nsys.argv = ['visiontune', *sys.argv[1:]]\n"
                  "try:\n    runpy.run_module('visiontune', run_name='__main__')\nfinally:\n"
                  "    print('IMPORTED', sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules), file=sys.stderr)\n")


def time_once(argv: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s, stderr) of one run of ``python -c REPORT_IMPORTS argv`` (a fresh process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", REPORT_IMPORTS, *argv], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"visiontune {' '.join(argv)} failed:\n{out.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), out.stderr


def measure(argv: list[str], runs: int) -> dict[str, object]:
    time_once(argv)  # warm-up: file cache
    samples = [time_once(argv) for _ in range(runs)]
    imported = samples[-1][2].rsplit("IMPORTED", 1)[-1].strip()
    return {"argv": argv, "runs": runs, "wall_s_median": statistics.median(s[0] for s in samples),
            "cpu_s_median": statistics.median(s[1] for s in samples), "wall_s": [s[0] for s in samples],
            "cpu_s": [s[1] for s in samples], "imported": imported}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "startup.json")
    args = parser.parse_args()

    from PIL import Image

    from visiontune.infer.backends import cpu_info

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "visiontune", "train", *TINY, f"run.dir={tmp}", "run.name=lora"],
                       check=True, capture_output=True, cwd=ROOT)
        image = Path(tmp) / "image.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
        commands = {"--help": ["--help"], "list methods": ["list", "methods"], "doctor --offline": ["doctor", "--offline"],
                    "predict (tiny LoRA run)": ["predict", f"{tmp}/lora", str(image), "--quiet"]}
        load_before = os.getloadavg()[0]
        rows = {name: measure(argv, args.runs) for name, argv in commands.items()}
    result = {
        "command": f"python benchmarks/bench_startup.py --runs {args.runs}",
        "date": datetime.date.today().isoformat(), "machine": cpu_info(), "python": sys.version.split()[0],
        "load_before": load_before, "load_after": os.getloadavg()[0], "commands": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, row in rows.items():
        print(f"{name:26} wall {row['wall_s_median']:6.2f} s   cpu {row['cpu_s_median']:6.2f} s   {row['imported']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
