"""LoRA on the labeled sets the simulated policies picked (issue 33: "state the LoRA numbers too").

For each dataset, policy (``--strategies``) and seed, the policy is replayed from 0 labels with the simulation's own
code (:func:`simulate.run_one`, the same round schedule ``--rounds``, seeds and fixed-C probe, so the same picks; the
probe's accuracy of each replayed round is checked against the simulation's committed row in ``--sim-rows`` when
there is one). At each budget of ``--per-class`` the labeled set of that round is fine-tuned with LoRA in the
meta-benchmark's regime (``benchmarks/meta/run.py``: the backbone family's first candidate, LoRA q,v r8 on the
ViT, batch 16, epochs for ``--steps`` optimizer steps by :func:`visiontune.auto.folds.fold_epochs`, LP-FT head fitted
on the cached features of the labeled images) via ``visiontune.train`` on exactly those images, and scored on the
simulation's fixed test split.

Usage (repo root)::

    nice -n 10 python benchmarks/suggest/lora_rounds.py --cache runs/suggest/features --data-root /work/data \\
        --datasets neu_steel6 aid_aerial10 pbc_blood8 --strategies random auto --seeds 0 --per-class 20
    python benchmarks/suggest/lora_rounds.py --render      # results/lora_rounds.md from results/lora_rounds.jsonl

Rows go to ``--out/lora_rounds.jsonl`` (one per dataset x policy x seed x budget, appended at once; a rerun skips
what is there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "meta")]
import run as meta  # noqa: E402  (benchmarks/meta/run.py: the meta-benchmark's fine-tune regime)
import simulate as sim  # noqa: E402

from visiontune.auto.candidates import family_candidates  # noqa: E402
from visiontune.data.sources import load_records  # noqa: E402

JSONL, RENDERED = "lora_rounds.jsonl", "lora_rounds.md"


def sim_rows(path: Path) -> dict[tuple, dict]:
    """The simulation's rows of ``path`` (its ``rounds.jsonl``) by (dataset, strategy, seed, per_class)."""
    if not path.is_file():
        return {}
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {(r["dataset"], r["strategy"], r["seed"], r["per_class"]): r for r in rows}


def rounds(d: dict, strategy: str, seed: int, schedule: list[int], budgets: list[int]) -> list[dict]:
    """The replayed policy's rows (with their labeled sets) at the budgets ``budgets`` (labels per class)."""
    missing = sorted(set(budgets) - set(schedule))
    if missing:
        raise SystemExit(f"--per-class {missing} is not a round of --rounds {schedule}: add it to --rounds")
    rows = sim.run_one(d, strategy, seed, [k for k in schedule if k <= max(budgets)], keep_labeled=True)
    return [r for r in rows if r["per_class"] in budgets]


def lora_row(d: dict, records, row: dict, args: argparse.Namespace, run_name: str) -> dict:
    """Fine-tune on the round's labeled set (indices into ``d``'s features), score on ``d``'s test split."""
    where = {rid: i for i, rid in enumerate(records.ids)}
    try:
        train = np.array([where[d["ids"][i]] for i in row["labeled"]])
        test = np.array([where[d["ids"][i]] for i in d["test"]])
    except KeyError as e:
        raise SystemExit(f"{e.args[0]} has features in --cache but is not an image of --data-root: point --data-root "
                         "at the folders the features were extracted from") from None
    if records.classes != d["classes"]:
        raise SystemExit(f"the class folders of --data-root {records.classes} are not the cached features' {d['classes']}")
    lab = np.array(row["labeled"])
    cand = family_candidates(meta.family_of(args.backbone))[0]
    overrides = meta.finetune_overrides(args.spec, args.backbone, cand.overrides, len(train), args, run_name)
    out = meta.finetune_unit(overrides, records.subset(train), records.subset(test), (d["x"][lab], d["y"][lab]),
                             args.threads)
    return {"lora_accuracy": out["test"], "n_test": out["n_test"], "epochs": out["epochs"], "candidate": cand.name,
            "train_s": round(out["train_s"], 1), "seconds": round(out["seconds"], 1), "cpu_s": round(out["cpu_s"], 1)}


def render(rows: list[dict]) -> str:
    """The table: per dataset and budget, LoRA and the probe for each policy, and auto - random."""
    by = {(r["dataset"], r["seed"], r["per_class"], r["strategy"]): r for r in rows}
    keys = sorted({(r["per_class"], r["dataset"], r["seed"]) for r in rows})
    out = ["| labels/class | dataset | seed | LoRA random | LoRA auto | LoRA auto - random | probe random | probe auto "
           "| probe auto - random |", "|---|---|---|---|---|---|---|---|---|"]
    diffs: dict[int, list[tuple[float, float]]] = {}
    for k, name, seed in keys:
        a, r = by.get((name, seed, k, "auto")), by.get((name, seed, k, "random"))
        cell = []
        for f in ("lora_accuracy", "probe_accuracy"):
            cell += [f"{100 * x[f]:.1f}" if x else "-" for x in (r, a)]
            cell.append(f"{100 * (a[f] - r[f]):+.1f}" if a and r else "-")
        if a and r:
            diffs.setdefault(k, []).append([x[f] for f in ("lora_accuracy", "probe_accuracy") for x in (r, a)])
        out.append(f"| {k} | {name} | {seed} | " + " | ".join(cell) + " |")
    for k, ds in sorted(diffs.items()):
        lr_, la, pr, pa = 100 * np.array(ds).T
        dl = la - lr_
        out.append(f"| {k} | **mean of {len(ds)}** | | {lr_.mean():.1f} | {la.mean():.1f} | **{dl.mean():+.1f}** (auto ahead "
                   f"on {int((dl > 0).sum())}, behind on {int((dl < 0).sum())}) | {pr.mean():.1f} | {pa.mean():.1f} | "
                   f"**{(pa - pr).mean():+.1f}** |")
    machine = sorted({r.get("machine", "?") for r in rows})
    return ("# LoRA on the simulated policies' picks (issue 33)\n\nTest accuracy % on the simulation's fixed test "
            "split; LoRA = `visiontune.train` on exactly the labeled images of that round (see "
            "`benchmarks/suggest/lora_rounds.py`); probe = the simulation's fixed-C probe on the same picks.\n\n"
            + "\n".join(out) + f"\n\nMachine: {', '.join(machine)}. Code: {', '.join(sorted({r['code'] for r in rows}))}.\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path("runs/suggest/features"))
    p.add_argument("--data-root", type=Path, default=Path("/work/data"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--sim-rows", type=Path, default=HERE / "results" / "rounds.jsonl",
                   help="the simulation's rows the replayed probe accuracies are checked against")
    p.add_argument("--datasets", nargs="+", default=[])
    p.add_argument("--strategies", nargs="+", default=["random", "auto"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--per-class", nargs="+", type=int, default=[20])
    p.add_argument("--rounds", nargs="+", type=int, default=[2, 5, 10, 20, 30, 50],
                   help="the simulation's round schedule (labels per class), which the picks depend on")
    p.add_argument("--test-per-class", type=int, default=30)
    p.add_argument("--probe-c", type=float, default=0.1)
    p.add_argument("--backbone", default="dinov2-112", choices=sorted(meta.BACKBONES))
    p.add_argument("--steps", type=int, default=meta.FINETUNE_STEPS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=Path, default=Path("runs/suggest/lora"))
    p.add_argument("--overrides", nargs="*", default=[])
    p.add_argument("--render", action="store_true", help="only write lora_rounds.md from lora_rounds.jsonl")
    args = p.parse_args(argv)
    path = args.out / JSONL
    if not args.render:
        sim.PROBE_C = args.probe_c
        committed = sim_rows(args.sim_rows)
        done = {(r["dataset"], r["strategy"], r["seed"], r["per_class"]) for r in meta.read_units(path)}
        code = meta.code_version()
        jobs = [(n, s, seed) for n in args.datasets for s in args.strategies for seed in args.seeds]
        for name, strategy, seed in tqdm(jobs, desc="lora rounds", file=sys.stdout):
            todo = [k for k in args.per_class if (name, strategy, seed, k) not in done]
            if not todo:
                continue
            d = sim.load_dataset(args.cache, name, args.test_per_class)
            args.spec = str(args.data_root / name)
            records = load_records(args.spec)
            for row in rounds(d, strategy, seed, args.rounds, todo):
                key = (name, strategy, seed, row["per_class"])
                ref = committed.get(key)
                if ref is not None and (ref["labels"], ref["accuracy"]) != (row["labels"], row["accuracy"]):
                    raise SystemExit(f"{key}: the replayed probe scores {row['accuracy']} on {row['labels']} labels, the "
                                     f"simulation's row in {args.sim_rows} {ref['accuracy']} on {ref['labels']}: not "
                                     "the same picks (other features or code?)")
                res = lora_row(d, records, row, args, f"{name}-{strategy}-s{seed}-k{row['per_class']}")
                meta.append_unit(path, {"dataset": name, "strategy": strategy, "seed": seed, "per_class": row["per_class"],
                                        "labels": row["labels"], "probe_accuracy": row["accuracy"],
                                        "probe_matches_simulation": ref is not None, **res, "backbone": args.backbone,
                                        "steps": args.steps, "overrides": args.overrides, "code": code,
                                        "machine": meta.ob._machine(args.threads),
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    rows = meta.read_units(path)
    if rows:
        (args.out / RENDERED).write_text(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
