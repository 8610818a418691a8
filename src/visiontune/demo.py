"""``make demo``: real pretrained DINOv2-S vs from-scratch baselines on a real limited-data split.

Runs each method of :data:`EXPERIMENTS` on ``configs/demo.yaml`` (methods not installed in this
build are skipped with a message), then prints and writes the comparison table and plot to
``runs/demo/comparison.md`` / ``comparison.png``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import visiontune as vt
from visiontune.registry import METHODS

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"

# (label, overrides). Scratch baselines follow the DINOv3 cow study: ResNet-18 and ViT-S from random init.
EXPERIMENTS: list[tuple[str, list[str]]] = [
    ("linear", ["method.name=linear"]),
    ("lora", ["method.name=lora", "method.targets=qv", "method.rank=8"]),
    ("full", ["method.name=full"]),
    ("scratch-resnet18", ["method.name=scratch", "backbone.name=resnet18", "optim.epochs=30"]),
    ("scratch-vit-s", ["method.name=scratch", "optim.epochs=20"]),
]


def main(argv: list[str] | None = None) -> int:
    from visiontune.eval import compare_table, plot_comparison

    extra = list(argv if argv is not None else sys.argv[1:])
    config = CONFIG if CONFIG.is_file() else None
    rows, t0 = [], time.perf_counter()
    for label, overrides in EXPERIMENTS:
        method = overrides[0].split("=", 1)[1]
        if method not in METHODS:
            print(f"[demo] skipping {label}: method {method!r} is not available in this build")
            continue
        cfg = vt.load_config(config, overrides=[*overrides, f"run.name={label}", "run.overwrite=true", *extra])
        print(f"\n[demo] === {label} ({time.perf_counter() - t0:.0f}s elapsed) ===")
        result = vt.train(cfg)
        rows.append(result.metrics)
    out = Path(vt.load_config(config, overrides=extra).run.dir)
    table = compare_table(rows)
    (out / "comparison.md").write_text(table + "\n")
    plot_comparison(rows, out / "comparison.png")
    print(f"\n[demo] {len(rows)} runs in {time.perf_counter() - t0:.0f}s on the same split:\n")
    print(table)
    print(f"\n[demo] table: {out / 'comparison.md'}  plot: {out / 'comparison.png'}  runs: {out}/<method>/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
