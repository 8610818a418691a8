"""Fit the selection prior of ``visiontune auto`` on the meta-benchmark table and write it as the package's JSON file.

    python benchmarks/meta/fit_prior.py                                   # -> src/visiontune/auto/prior.json
    python benchmarks/meta/fit_prior.py --leave-out fashion-mnist --leave-out elpv --out runs/prior-lodo.json

``--leave-out`` drops a dataset's tasks (for an ``auto`` run on that dataset judged leave-one-dataset-out: pass the
result to ``visiontune auto --prior FILE``). The model, its leave-one-dataset-out sd and the file's format:
:mod:`visiontune.auto.prior`. Prints, per backbone group and kind, the rows, datasets, the LODO residual sd (what the
prior uses) beside the in-sample one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from visiontune.auto.prior import fit_prior, load_prior, read_table

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "benchmarks" / "meta" / "results" / "tasks.jsonl"
OUT = ROOT / "src" / "visiontune" / "auto" / "prior.json"


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", type=Path, default=TABLE, help=f"meta-benchmark table (default {TABLE.relative_to(ROOT)})")
    p.add_argument("--out", type=Path, default=OUT, help=f"prior JSON to write (default {OUT.relative_to(ROOT)})")
    p.add_argument("--leave-out", action="append", default=[], metavar="DATASET", help="drop this dataset's tasks (repeat)")
    args = p.parse_args(argv)
    rows = read_table(args.table)
    unknown = sorted(set(args.leave_out) - {r["dataset"] for r in rows})
    if unknown:
        print(f"fit_prior: --leave-out names no dataset of the table: {', '.join(unknown)}", file=sys.stderr)
        return 2
    kept = [r for r in rows if r["dataset"] not in set(args.leave_out)]
    try:
        table = str(args.table.resolve().relative_to(ROOT))
    except ValueError:
        table = str(args.table)
    data = fit_prior(kept, provenance={
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "code": _commit(), "table": table,
        "table_sha256": hashlib.sha256(args.table.read_bytes()).hexdigest(), "left_out": sorted(args.leave_out),
        "command": " ".join(["python benchmarks/meta/fit_prior.py", *(sys.argv[1:] if argv is None else argv)]),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    load_prior(args.out)  # what auto will read: validated now, not at the user's first run
    print(f"{args.out}: {len(kept)} rows of {len(data['provenance']['datasets'])} datasets "
          f"({len(rows) - len(kept)} left out, {data['provenance']['rows_dropped_missing']} lacking a feature)")
    print(f"{'group':<22} {'kind':<11} {'rows':>5} {'datasets':>8} {'LODO sd':>8} {'fit sd':>7}  model (LODO sd of each)")
    for group, kinds in data["models"].items():
        for kind, m in kinds.items():
            each = ", ".join(f"{n} {100 * v:.1f}p" for n, v in m["lodo_sd"].items())
            print(f"{group:<22} {kind:<11} {m['rows']:>5} {m['datasets']:>8} {100 * m['sd']:>7.1f}p {100 * m['fit_sd']:>6.1f}p"
                  f"  {m['model']} ({each})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
