"""Same split, same budget, several methods: the accuracy / trainable-% / time table for a config.

Usage (from the repo root):
    .venv/bin/python benchmarks/compare_methods.py --config configs/demo.yaml \
        --methods linear lora dora mona --out benchmarks/results/elpv-methods [overrides ...]

Writes ``<out>/comparison.md`` (table + the exact command) and ``<out>/comparison.png``; the runs
themselves go under ``run.dir`` of the config.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import visiontune as vt
from visiontune.eval import compare_table, plot_comparison


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--methods", nargs="+", required=True, help="method names, each run with the config's other settings")
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    rows = []
    t0 = time.perf_counter()
    for m in args.methods:
        cfg = vt.load_config(args.config, overrides=[f"method.name={m}", f"run.name={m}", "run.overwrite=true", *args.overrides])
        rows.append(vt.train(cfg).metrics)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/compare_methods.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    text = (
        f"# Method comparison\n\nCommand: `{command}`\n\nMachine: {machine}; total {time.perf_counter() - t0:.0f} s.\n\n"
        f"{compare_table(rows)}\n\n![accuracy vs trainable parameters](comparison.png)\n"
    )
    (out / "comparison.md").write_text(text)
    plot_comparison(rows, out / "comparison.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
