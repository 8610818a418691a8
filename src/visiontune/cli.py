"""The ``visiontune`` command line: parse -> config -> library call. Nothing below this module reads argparse."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from visiontune.errors import VisiontuneError


def _cmd_train(args: argparse.Namespace) -> int:
    import visiontune as vt

    cfg = vt.load_config(args.config, overrides=args.overrides)
    result = vt.train(cfg)
    print(json.dumps({"run_dir": str(result.run_dir), "accuracy": result.metrics["test"]["accuracy"],
                      "f1_weighted": result.metrics["test"]["f1_weighted"]}))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from visiontune.runs import evaluate_run

    m = evaluate_run(args.run_dir, data=args.data, device=args.device, progress=not args.quiet)
    if args.json:
        print(json.dumps(m, indent=1))
    else:
        print(f"accuracy {m['accuracy']:.4f}  weighted F1 {m['f1_weighted']:.4f}  macro F1 {m['f1_macro']:.4f}  "
              f"({m['num_samples']} images)")
        w = max(len(c) for c in m["per_class"])
        print(f"{'class':<{w}}  precision  recall  f1      support")
        for c, r in m["per_class"].items():
            print(f"{c:<{w}}  {r['precision']:.4f}     {r['recall']:.4f}  {r['f1']:.4f}  {r['support']}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    import visiontune as vt
    from visiontune.registry import DATASETS, METHODS

    if args.what == "methods":
        for name in vt.list_methods():
            print(f"{name:10s} {METHODS.get(name).summary or METHODS.help(name)}")
    elif args.what == "datasets":
        for name in vt.list_datasets():
            print(f"{name:14s} {DATASETS.help(name)}")
    else:
        for name in vt.list_backbones():
            print(name)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from visiontune.eval import compare_table, load_run_metrics, plot_comparison

    rows = [load_run_metrics(d) for d in args.run_dirs]
    table = compare_table(rows)
    print(table)
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.md").write_text(table + "\n")
        plot_comparison(rows, out / "comparison.png")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from visiontune.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.sweep_file, overrides=args.overrides)
    if args.status:
        from visiontune.sweep import sweep_status

        states = sweep_status(sweep)
        for name, state in states:
            print(f"{name:60s} {state}")
        print(f"{sum(s == 'done' for _, s in states)}/{len(states)} done")
        return 0
    if args.dry_run:
        for e in sweep.entries:
            print(e.name)
        return 0
    out = run_sweep(sweep, progress=not args.quiet)
    print(json.dumps({k: (v if k != "failed" else sorted(v)) for k, v in out.items()}))
    return 1 if out["failed"] else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visiontune", description="Parameter-efficient fine-tuning of vision backbones.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune and evaluate one configuration")
    t.add_argument("--config", "-c", default=None, help="YAML config file (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.name=linear data.train_per_class=10")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a finished run on its test split or on other labeled data")
    e.add_argument("run_dir")
    e.add_argument("--data", default=None, help="image folder / CSV / built-in dataset to evaluate on (same labels)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true", help="print the full metrics as JSON")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_cmd_eval)

    ls = sub.add_parser("list", help="list backbones, methods or datasets")
    ls.add_argument("what", choices=["backbones", "methods", "datasets"])
    ls.set_defaults(func=_cmd_list)

    cp = sub.add_parser("compare", help="comparison table (and plot) of finished runs")
    cp.add_argument("run_dirs", nargs="+")
    cp.add_argument("--out", default=None, help="folder for comparison.md and comparison.png")
    cp.set_defaults(func=_cmd_compare)
    sw = sub.add_parser("sweep", help="run a comparison grid (resumable) and write results.csv + report.md")
    sw.add_argument("sweep_file", help="configs/sweeps/*.yaml")
    sw.add_argument("overrides", nargs="*", help="dotted overrides applied to the base config of every run")
    sw.add_argument("--dry-run", action="store_true", help="list the runs without training")
    sw.add_argument("--status", action="store_true", help="show which runs are done, failed, partial or pending")
    sw.add_argument("--quiet", action="store_true")
    sw.set_defaults(func=_cmd_sweep)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VisiontuneError as e:
        print(f"visiontune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
