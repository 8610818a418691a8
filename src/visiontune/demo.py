"""``make demo``: real pretrained DINOv2-S vs from-scratch baselines on a real limited-data split.

Runs each method of :data:`EXPERIMENTS` on ``configs/demo.yaml`` (methods not installed in this
build are skipped with a message), then prints and writes the comparison table and plot to
``runs/demo/comparison.md`` / ``comparison.png``, and the numbers with the machine they came from to
``runs/demo/comparison.json``.

``python -m visiontune.demo --check README.md`` (``make demo-check``, run by CI after ``make demo``) holds the
README's demo table against that fresh output: the method, backbone, weights and trainable-parameter columns
must be identical; test accuracy and F1 must be identical when the README's numbers were measured on the same
kind of machine (CPU model, vector extensions, torch version and thread count, recorded in the README block),
and otherwise within three standard errors of the difference of two binomial accuracies on that test set,
because float summation order differs between CPU kernels and a 80-image training run amplifies it. Times are
not compared (they measure the machine, not the code).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import visiontune as vt
from visiontune.atomic import write_text_atomic
from visiontune.auto import AutoSelect, AutoSettings
from visiontune.registry import METHODS
from visiontune.eval import compare_table, plot_comparison

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
README_START, README_END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
_MACHINE = re.compile(r"<!-- demo-machine: (\{.*?\}) -->")
SAME_COLUMNS = 4  # method, backbone, weights, trainable params
METRIC_COLUMNS = {5: "test accuracy", 6: "weighted F1", 7: "macro F1"}
TOLERANCE_SE = 3.0

# (label, overrides). Scratch baselines follow the DINOv3 cow study: ResNet-18 and ViT-S from random init.
EXPERIMENTS: list[tuple[str, list[str]]] = [
    ("linear", ["method.name=linear"]),
    ("lora", ["method.name=lora", "method.targets=qv", "method.rank=8"]),
    ("full", ["method.name=full"]),
    ("scratch-resnet18", ["method.name=scratch", "backbone.name=resnet18", "optim.epochs=30"]),
    ("scratch-vit-s", ["method.name=scratch", "optim.epochs=20"]),
]

_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def machine() -> dict[str, Any]:
    """What decides which float kernels run: CPU model and vector extensions, torch version and threads."""
    import torch

    from visiontune.runtime import cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    return {
        "cpu": model, "isa": [f for f in _ISA_FLAGS if f in flags], "torch": torch.__version__.split("+")[0],
        "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
    }


def run_demo(extra: list[str]) -> Path:
    """Train every experiment; write comparison.md / .png / .json into the demo's run.dir; return that folder."""
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
    write_text_atomic(out / "comparison.md", table + "\n")
    record = {
        "machine": machine(), "overrides": extra, "table": table,
        "test_images": [int(r.get("test", {}).get("num_samples") or 0) for r in rows],
    }
    write_text_atomic(out / "comparison.json", json.dumps(record, indent=1) + "\n")
    plot_comparison(rows, out / "comparison.png")
    print(f"\n[demo] {len(rows)} runs in {time.perf_counter() - t0:.0f}s on the same split:\n")
    print(table)
    print(f"\n[demo] table: {out / 'comparison.md'}  plot: {out / 'comparison.png'}  runs: {out}/<method>/report.md")
    return out


def run_auto(extra: list[str], budget: str) -> dict[str, Any]:
    """``visiontune auto`` on the demo's data and backbone (the same split) within ``budget``: the method chosen for
    this data, in ``<run.dir>/auto/leaderboard.md``. Which candidates fit depends on the machine's speed, so this part
    is not held against the README by ``--check``."""
    cfg = vt.load_config(CONFIG if CONFIG.is_file() else None, overrides=extra)
    sections = cfg.to_dict()
    # The demo's data and backbone settings, as the overrides auto gives every candidate.
    overrides = [
        f"{sec}.{k}={v}" for sec in ("data", "backbone") for k, v in sections[sec].items()
        if v is not None and isinstance(v, (str, int, float, bool))
    ]
    out = Path(cfg.run.dir) / "auto"
    print(f"\n[demo] === visiontune auto {cfg.data.dataset} --budget {budget} --out {out} ===")
    record = AutoSelect(cfg.data.dataset, out, AutoSettings(budget_s=budget, progress=cfg.run.progress),
                        overrides=overrides).run()
    print(f"\n[demo] auto chose: {record['decision']['candidate']}. {record['decision']['reason']}.")
    print(f"[demo] leaderboard: {out / 'leaderboard.md'}  model: {record['final']['run_dir']}")
    return record


# ----------------------------------------------------------------------------- README check


def _rows(table: str) -> list[list[str]]:
    lines = [ln.strip() for ln in table.strip().splitlines() if ln.strip().startswith("|")]
    return [[c.strip().strip("*") for c in ln.strip("|").split("|")] for ln in lines[2:]]


def readme_block(text: str) -> tuple[str, dict[str, Any] | None]:
    """The table and the recorded machine between the README's demo-table markers."""
    if README_START not in text or README_END not in text:
        raise ValueError(f"README has no demo table between {README_START} and {README_END}")
    block = text.split(README_START, 1)[1].split(README_END, 1)[0]
    found = _MACHINE.search(block)
    return block, json.loads(found.group(1)) if found else None


def check(readme_text: str, record: dict[str, Any]) -> list[str]:
    """Problems between the README's demo table and a fresh demo record (empty list = they agree)."""
    block, recorded = readme_block(readme_text)
    ours, fresh = _rows(block), _rows(record["table"])
    same_machine = recorded == record["machine"]
    if len(ours) != len(fresh):
        return [f"README lists {len(ours)} demo rows, the demo produced {len(fresh)}"]
    problems = []
    for i, (a, b) in enumerate(zip(ours, fresh)):
        if a[:SAME_COLUMNS] != b[:SAME_COLUMNS]:
            problems.append(f"row {i + 1}: README {a[:SAME_COLUMNS]} vs demo {b[:SAME_COLUMNS]}")
            continue
        n = max(int(record["test_images"][i]), 1)
        for col, what in METRIC_COLUMNS.items():
            if same_machine:
                if a[col] != b[col]:
                    problems.append(f"row {i + 1} ({a[0]}): {what} README {a[col]} vs demo {b[col]} on the same machine")
                continue
            scale = 100.0 if col == 5 else 1.0
            p, q = float(a[col]) / scale, float(b[col]) / scale
            se = math.sqrt(max(p * (1 - p), 1e-4) / n + max(q * (1 - q), 1e-4) / n)
            if abs(p - q) > TOLERANCE_SE * se:
                problems.append(
                    f"row {i + 1} ({a[0]}): {what} README {a[col]} vs demo {b[col]}: more than {TOLERANCE_SE:g} standard "
                    f"errors apart ({abs(p - q) / se:.1f}) on {n} test images"
                )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visiontune.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", metavar="README", help="compare README's demo table with the last demo output")
    parser.add_argument("--results", metavar="DIR", help="demo output folder (default: run.dir of configs/demo.yaml)")
    parser.add_argument("--auto", metavar="BUDGET", help="then run `visiontune auto` on the same data within BUDGET (e.g. 15m)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every demo run")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    if not args.check:
        run_demo(list(args.overrides))
        if args.auto:
            run_auto(list(args.overrides), args.auto)
        return 0
    results = Path(args.results or vt.load_config(CONFIG, overrides=list(args.overrides)).run.dir)
    record_path = results / "comparison.json"
    if not record_path.is_file():
        print(f"demo check: {record_path} does not exist; run `make demo` first", file=sys.stderr)
        return 2
    record = json.loads(record_path.read_text())
    try:
        problems = check(Path(args.check).read_text(), record)
        _, recorded = readme_block(Path(args.check).read_text())
    except (OSError, ValueError) as e:
        print(f"demo check: {args.check}: {e}", file=sys.stderr)
        return 1
    how = "identical (same machine)" if recorded == record["machine"] else f"within {TOLERANCE_SE:g} SE (other machine)"
    if problems:
        print(f"demo check: {args.check} disagrees with {record_path}:", *problems, sep="\n  - ", file=sys.stderr)
        print(f"machine now: {record['machine']}\nrecorded:    {recorded}", file=sys.stderr)
        return 1
    print(f"demo check: {args.check} matches {record_path}: {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
