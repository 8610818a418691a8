"""Where a fold of ``visiontune auto`` spends its time, beside ``visiontune train`` and the hand-written loop.

One real task (default: Fashion-MNIST, 10 labeled images per class, DINOv2-S offline weights at 112 px), the fold
``auto`` trains first: its own stratified 5-fold split (:class:`visiontune.auto.plan.Task`), fold 1 = 80 training
images, 20 held out. For each fine-tuning candidate ``auto`` tries on the backbone (its family's,
:func:`visiontune.auto.candidates.family_candidates`; full fine-tuning left out unless ``--candidates`` names it),
three contenders train the same config for the same short schedule (``--epochs``), each run in a fresh process,
alternating:

* ``fold``: the auto fold job, :func:`visiontune.auto.executor.run_fold` called as ``auto`` calls it (overrides by
  :func:`visiontune.auto.finetune.fold_overrides`, the cheap stage's features for the LP-FT head by
  :func:`~visiontune.auto.finetune.fold_head_features`, computed once here as ``auto`` computes them once per
  backbone). With pruning on (``auto``'s default) a candidate's fold 1 is two jobs: its first rung (a third of
  the schedule, paused, scored) and the rest (resumed from the checkpoint); ``--straight`` times one job instead,
  as folds 2-5 run.
* ``train``: ``visiontune.train`` of the same config (same overrides but the fold's run folder and ``run.plots``,
  which ``visiontune train`` leaves on) on the same 80 images, tested on the same 20.
* ``peer``: the hand-written timm + peft loop of ``make bench`` (``benchmarks/peer.py``) with the same weights,
  images (written as PNG), batch, epochs, learning rates, schedule (``bench_peer.peer_spec``). Its head starts
  at zero (no LP-FT); peft cannot split timm's fused ``qkv``, so "q,v" is q,k,v there; the last-blocks
  candidate restricts the peft target regex to those blocks.

The project runs' time is split by wrapping the training loop's own functions (config, model build with its
weights, LP-FT head init, frozen-prefix cache, training steps, end-of-epoch validation and checkpoint, held-out
scoring, run folder); "start + imports" is from launching the interpreter to the worker's imports done. In ``auto``
the local executor runs every fold in one process, so that part is paid once per selection, not per fold (a Ray
fold pays it per worker). Timings are only as good as the machine is quiet: the 1-min load average is recorded
before and after every run and loaded runs are flagged (``bench_peer.loaded``); ratios of alternating runs are
what to read on a shared machine.

Usage (from the repo root):
    nice -n 5 .venv/bin/python benchmarks/fold_cost.py                       # ~15 min on 2 busy cores
    .venv/bin/python benchmarks/fold_cost.py --epochs 3 --repeats 2 --candidates "lora q,v r8"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import bench_peer  # noqa: E402  (stdlib imports only at module level)

OUT = HERE / "results" / "fold-cost"
DATA = "fashion-mnist"
TASK = ["data.train_per_class=10", "data.test_per_class=100", "backbone.name=vit_small_patch14_dinov2",
        "backbone.weights=offline", "backbone.img_size=112"]
CONTENDERS = ("fold", "train", "peer")
PHASES = {  # key -> what it covers (the wrapped functions of visiontune.train.loop and friends)
    "config": "config (load_config)",
    "build": "model build (backbone + weights + method)",
    "head_init": "LP-FT head init",
    "prefix": "frozen-prefix cache",
    "steps": "training steps",
    "epoch_end": "end-of-epoch validation + checkpoint",
    "score": "held-out scoring (merge + test pass)",
    "run_folder": "run folder (start, metrics, adapter, report)",
}


# ============================================================================ workers (fresh processes)


class Timers:
    """Seconds spent inside wrapped functions, by phase; :meth:`restore` puts the functions back."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        self.originals: list[tuple[Any, str, Any]] = []

    def restore(self) -> None:
        for owner, attr, fn in reversed(self.originals):
            setattr(owner, attr, fn)
        self.originals.clear()

    def wrap(self, owner: Any, attr: str, key: str) -> None:
        fn = getattr(owner, attr)
        self.originals.append((owner, attr, owner.__dict__[attr] if isinstance(owner, type) else fn))

        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.s[key] = self.s.get(key, 0.0) + time.perf_counter() - t

        setattr(owner, attr, timed)


def _instrument() -> Timers:
    """Wrap the training loop's phases (none of them calls another wrapped one, so the phases do not overlap)."""
    import visiontune.config
    from visiontune.train import loop
    from visiontune.train.checkpointing import TrainCheckpoint

    t = Timers()
    t.wrap(visiontune.config, "load_config", "config")
    for attr, key in (("_build", "build"), ("_probe_head_init", "head_init"), ("build_prefix_cache", "prefix"),
                      ("train_one_epoch", "steps"), ("predict_logits", "epoch_end"), ("evaluate_loader", "score"),
                      ("start_run", "run_folder"), ("finish_run", "run_folder")):
        t.wrap(loop, attr, key)
    t.wrap(TrainCheckpoint, "save", "epoch_end")
    return t


def _project_start(job: dict[str, Any]) -> dict[str, Any]:
    """Imports of a project worker, the task, its fold 1 and the candidate: what every project contender shares."""
    import torch

    torch.set_num_threads(job["threads"])
    import sklearn.linear_model  # noqa: F401  (imported by the peer at its top too: see bench_peer.worker_project)
    import sklearn.model_selection  # noqa: F401

    import visiontune.auto.executor  # noqa: F401
    import visiontune.auto.finetune  # noqa: F401
    import visiontune.train.loop  # noqa: F401

    ready = time.time()
    from visiontune.auto.plan import Task
    from visiontune.auto.settings import AutoSettings

    t0 = time.perf_counter()
    task = Task(job["data"], AutoSettings(progress=False), overrides=job["task"])
    backbone = task.backbones[0]
    cand = next(c for c in task.fit(backbone)[0] if c.name == job["candidate"])
    return {"task": task, "backbone": backbone, "cand": cand, "splits": task.fold_splits(0),
            "imports_s": ready - job["launched"], "task_s": time.perf_counter() - t0}


def _phases(timers: Timers, total: float) -> dict[str, float]:
    out = {k: timers.s.get(k, 0.0) for k in PHASES}
    out["other"] = total - sum(out.values())
    return out


def worker_fold(job: dict[str, Any]) -> dict[str, Any]:
    """Fold 1 of ``job["candidate"]`` as ``auto`` runs it: the first rung then the rest, or one straight job."""
    ctx = _project_start(job)
    from safetensors.torch import load_file

    from visiontune.auto.executor import run_fold
    from visiontune.auto.finetune import fold_head_features, fold_overrides
    from visiontune.auto.rungs import rung_epoch

    task, backbone, cand, splits = ctx["task"], ctx["backbone"], ctx["cand"], ctx["splits"]
    feats = load_file(job["features"])
    head = fold_head_features(task, {backbone: (feats["x"], feats["y"])}, backbone, 0, splits)
    timers = _instrument()
    epochs, folds_dir = job["epochs"], Path(job["run_dir"])
    t0 = time.perf_counter()
    jobs = [run_fold(fold_overrides(task, backbone, cand, 0, epochs, folds_dir, False), splits, None, None,
                     None if job["straight"] else rung_epoch(epochs), time.time, head)]
    if jobs[0]["paused"]:
        jobs.append(run_fold(fold_overrides(task, backbone, cand, 0, epochs, folds_dir, True), splits, None, None,
                             None, time.time, head))
    total = time.perf_counter() - t0
    timers.restore()
    return {"imports_s": ctx["imports_s"], "task_s": ctx["task_s"], "in_process_s": total,
            "phases": _phases(timers, total), "steps": sum(j["steps"] for j in jobs), "jobs": len(jobs),
            "accuracy": jobs[-1]["row"]["accuracy"], "head_features": head is not None,
            "rung_accuracy": jobs[0]["row"]["accuracy"] if jobs[0]["paused"] else None}


def worker_train(job: dict[str, Any]) -> dict[str, Any]:
    """``visiontune.train`` of the candidate's config on fold 1's training images, tested on its held-out ones."""
    ctx = _project_start(job)
    from visiontune.auto.folds import steps_per_epoch
    from visiontune.config import load_config
    from visiontune.train.loop import train  # what `visiontune train` and vt.train run, here on explicit splits

    task, splits = ctx["task"], ctx["splits"]
    timers = _instrument()
    t0 = time.perf_counter()
    extra = [f"optim.epochs={job['epochs']}", "run.progress=false", f"run.dir={job['run_dir']}", "run.name=train",
             "run.overwrite=true"]
    cfg = load_config(None, task.overrides(ctx["backbone"], ctx["cand"].overrides, extra))
    m = train(cfg, splits=splits).metrics
    total = time.perf_counter() - t0
    timers.restore()
    return {"imports_s": ctx["imports_s"], "task_s": ctx["task_s"], "in_process_s": total,
            "phases": _phases(timers, total), "accuracy": m["test"]["accuracy"],
            "steps": steps_per_epoch(len(splits["train"]), cfg.optim.batch_size) * cfg.optim.epochs,
            "prefix_cache": m["train"].get("prefix_cache")}


def worker_peer(job: dict[str, Any]) -> dict[str, Any]:
    """The peer loop (``bench_peer.worker_peer``), with its imports timed apart."""
    import torch

    torch.set_num_threads(job["threads"])
    import peer  # noqa: F401
    import peft  # noqa: F401
    import timm  # noqa: F401

    ready = time.time()
    t0 = time.perf_counter()
    out = bench_peer.worker_peer(job)
    total = time.perf_counter() - t0
    spec = job["spec"]
    steps = -(-len(spec["train"]) // spec["batch_size"]) * spec["epochs"]
    phases = {k: 0.0 for k in PHASES}
    phases.update(steps=out["train_s"], score=out["eval_s"], other=total - out["train_s"] - out["eval_s"])
    return {"imports_s": ready - job["launched"], "in_process_s": total, "phases": phases, "steps": steps,
            "accuracy": out["accuracy"]}


WORKERS = {"fold": worker_fold, "train": worker_train, "peer": worker_peer}


# ============================================================================ preparation (this process)


def last_blocks_regex(blocks: str, depth: int) -> str:
    """peft's target regex for timm ViT Linears inside the blocks ``method.blocks`` names (``all`` or ``last:k``)."""
    ids = range(depth) if blocks == "all" else range(depth - int(blocks.split(":")[1]), depth)
    return rf"blocks\.({'|'.join(map(str, ids))})\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


def peer_method(cfg: Any, depth: int) -> dict[str, Any] | None:
    """The peer's method settings for a candidate's config, or None where the peer has no such method."""
    name = cfg.method.name
    if name == "mona":
        return {"method": "mona"}
    if name == "full":
        return {"method": "full"}
    if name not in ("lora", "dora"):
        return None
    targets = list(cfg.method.targets) if not isinstance(cfg.method.targets, str) else [cfg.method.targets]
    target = "qkv" if targets == ["qv"] else "all"
    blocks = str(getattr(cfg.method, "blocks", "all") or "all")
    out = {"method": name, "target": target}
    if blocks != "all":
        if target != "all":
            return None
        out["target_regex"] = last_blocks_regex(blocks, depth)
    return out


def prepare(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The task and its fold 1, the cheap stage's features (saved for the fold jobs), the images as PNG files and
    the backbone for the peer, every candidate's peer spec."""
    from safetensors.torch import save_file

    from visiontune.auto.candidates import backbone_family
    from visiontune.auto.cheap import pool_features, probe_model
    from visiontune.auto.plan import CHEAP, Task
    from visiontune.auto.settings import AutoSettings
    from visiontune.data.cache import decode_compact

    task = Task(args.data, AutoSettings(progress=False), overrides=args.task)
    backbone = task.backbones[0]
    fitted, skipped = task.fit(backbone)
    names = args.candidates or [c.name for c in fitted if "method.name=full" not in c.overrides]
    unknown = [n for n in names if n not in {c.name for c in fitted}]
    if unknown:
        raise SystemExit(f"unknown or skipped candidate(s) {unknown}; on {backbone}: {[c.name for c in fitted]} "
                         f"(skipped: {skipped})")
    model = probe_model(task, backbone)
    x, y = pool_features(task, backbone, model)
    features = tmp / "features.safetensors"
    save_file({"x": x.contiguous(), "y": y.contiguous()}, str(features))
    splits = task.fold_splits(0)
    items = {}
    for part, key in (("train", "train"), ("test", "test")):
        rec = splits[part]
        folder = tmp / "images" / key
        folder.mkdir(parents=True)
        items[key] = []
        for i, (item, label) in enumerate(zip(rec.items, rec.labels)):
            path = folder / f"{i:04d}.png"  # lossless: the same pixels the project reads
            decode_compact(item, rec.ids[i]).save(path)
            items[key].append((str(path), int(label)))
    base = task.config(backbone, CHEAP[0].overrides)
    depth = backbone_family(base).depth
    peer = "peer" in args.contenders
    probe_spec = bench_peer.export_backbone(base, len(task.classes), items["test"][0][0], tmp) if peer else None
    plans = {}
    for cand in (c for c in fitted if c.name in names):
        cfg = task.config(backbone, cand.overrides, [f"optim.epochs={args.epochs}"])
        extra = peer_method(cfg, depth) if peer else None
        spec, detail = bench_peer.peer_spec(cfg, probe_spec, items, extra) if extra else (None, None)
        plans[cand.name] = {"spec": spec and {**spec, "seed": cfg.run.seed}, "detail": detail}
    return {"task": args.task, "backbone": backbone, "n_train": len(splits["train"]), "n_val": len(splits["val"]),
            "n_test": len(splits["test"]), "k": task.k, "features": str(features), "plans": plans,
            "full_epochs": task.epochs(len(splits["train"])), "steps_per_epoch": task.steps_per_epoch(len(splits["train"]))}


# ============================================================================ summary and report


def summarize(runs: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    """Medians over the runs on a quiet machine (all runs when none was), as ``bench_peer.summarize`` takes them."""
    quiet = [r for r in runs if not bench_peer.loaded(r, threads)]
    use = quiet or runs
    med = lambda f: statistics.median(f(r) for r in use)  # noqa: E731
    return {
        "runs_used": len(use), "all_loaded": not quiet,
        "process_s": med(lambda r: r["process_s"]), "in_process_s": med(lambda r: r["in_process_s"]),
        "imports_s": med(lambda r: r["imports_s"]), "task_s": med(lambda r: r.get("task_s", 0.0)),
        "exit_s": med(lambda r: r["process_s"] - r["imports_s"] - r.get("task_s", 0.0) - r["in_process_s"]),
        "steps": use[0]["steps"],
        "s_per_step": med(lambda r: r["phases"]["steps"] / r["steps"]),
        "phases": {k: med(lambda r, k=k: r["phases"][k]) for k in [*PHASES, "other"]},
        "accuracy": statistics.fmean(r["accuracy"] for r in use),
        "max_load": max(max(r["load_before"], r["load_after"]) for r in use),
    }


def render(result: dict[str, Any]) -> str:
    s, mach, prep = result["settings"], result["machine"], result["prep"]
    full_steps = prep["full_epochs"] * prep["steps_per_epoch"]
    lines = [
        "# Where a fold of `visiontune auto` spends its time",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']}, {s['threads']} torch thread(s) per run, "
        f"fp32. Total {result['total_s'] / 60:.1f} min; 1-min load average {result['load'][0]:.2f} before, "
        f"{result['load'][1]:.2f} after.  ",
        f"Task: `{s['data']}` with `{' '.join(prep['task'])}`; auto's fold 1 of {prep['k']}: {prep['n_train']} training "
        f"images ({prep['n_val']} inner validation), {prep['n_test']} held out. {s['epochs']} epochs of "
        f"{prep['steps_per_epoch']} steps (batch 16) for every contender; auto's full schedule on this fold is "
        f"{prep['full_epochs']} epochs = {full_steps} steps. Fold job: "
        + ("one straight job (as folds 2-5 run)." if s["straight"] else
           "the first rung (paused a third of the way, scored) + the rest resumed, as fold 1 runs with pruning.")
        + f" {s['repeats']} run(s) per contender, alternating, each a fresh process.",
        "",
        "| candidate | contender | s per fold (process) | in process | s/step | full schedule, in process (est.) "
        "| start + imports | task + fold split (once per selection) | " + " | ".join(PHASES.values())
        + " | other | harness + exit | held-out acc % | load before/after |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|" + "--:|" * len(PHASES) + "--:|--:|--:|--:|",
    ]
    for name, r in result["candidates"].items():
        for side in CONTENDERS:
            if side not in r:
                lines.append(f"| {name} | {side} | n/a: {r.get(side + '_why', 'not run')} |" + " |" * (9 + len(PHASES)))
                continue
            x, runs = r[side], r["runs"][side]
            loads = ", ".join(f"{q['load_before']:.1f}/{q['load_after']:.1f}" for q in runs)
            flag = " (loaded)" if x["all_loaded"] else ""
            lines.append(
                f"| {name} | {side}{flag} | {x['process_s']:.1f} | {x['in_process_s']:.1f} | {x['s_per_step']:.2f} "
                f"| {x['in_process_s'] - x['phases']['steps'] + full_steps * x['s_per_step']:.0f} | {x['imports_s']:.1f} | {x['task_s']:.1f} | "
                + " | ".join(f"{x['phases'][k]:.1f}" for k in PHASES)
                + f" | {x['phases']['other']:.1f} | {x['exit_s']:.1f} | {100 * x['accuracy']:.0f} | {loads} |")
    lines += ["", "Ratios (medians; > 1 means the first is slower):", "",
              "| candidate | auto fold / train, per fold (process) | in process | s/step | train / peer, per fold (process) "
              "| in process | s/step |", "|:--|--:|--:|--:|--:|--:|--:|"]
    for name, r in result["candidates"].items():
        cells = []
        for a, b in (("fold", "train"), ("train", "peer")):
            if a in r and b in r:
                cells += [f"{r[a][k] / r[b][k]:.2f}" for k in ("process_s", "in_process_s", "s_per_step")]
            else:
                cells += ["n/a"] * 3
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "s per fold (process) = launching the interpreter to its exit (the harness's clock); in process = the fold "
        "job(s) / `train` / `peer.run` alone, after imports and the task (auto builds the task, with its candidate "
        "checks, once per selection: the project workers rebuild it, the peer gets its images as files). Full schedule "
        f"(est.) = in process with the training steps scaled to auto's {full_steps} steps on this fold (the other "
        "phases as measured: they do not grow with the epochs but for the per-epoch checkpoint). s/step = training-steps time / optimizer steps. Peer: "
        "'training steps' is its timed loop, 'held-out scoring' its test pass, 'other' model build, peft and loaders. "
        "A run whose 1-min load average before or after was above threads + 0.75 is loaded; a contender's medians "
        "leave loaded runs out when it has a quiet one, '(loaded)' marks contenders with none (on this shared "
        "machine: read the ratios of alternating runs).",
    ]
    notes = [f"- {n}: peer {p['detail'] or 'n/a'}" for n, p in prep["plans"].items()]
    return "\n".join([*lines, "", "Methods as the project describes them:", "", *notes]) + "\n"


# ============================================================================ orchestration


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=3, help="epochs of every contender (default 3: a short fixed schedule)")
    p.add_argument("--repeats", type=int, default=1, help="runs per contender and candidate")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--candidates", nargs="+", help="candidate names (default: the family's, full fine-tuning left out)")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--straight", action="store_true", help="the fold as one job (folds 2-5), not rung + rest (fold 1)")
    p.add_argument("--data", default=DATA)
    p.add_argument("--out", default=str(OUT), help="folder for results.json and results.md ('-': print only)")
    p.add_argument("overrides", nargs="*", help="task overrides after the default ones (e.g. backbone.name=...)")
    args = p.parse_args(argv)
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        Path(job["out"]).write_text(json.dumps(WORKERS[job["kind"]](job)))
        return 0
    args.task = [*TASK, *args.overrides]
    command = " ".join(["python benchmarks/fold_cost.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    script = Path(__file__)
    with tempfile.TemporaryDirectory(prefix="vt-fold-cost-") as tmpdir:
        tmp = Path(tmpdir)
        prep = prepare(args, tmp)
        print(f"[fold-cost] {prep['backbone']}: fold 1 = {prep['n_train']} train / {prep['n_test']} held out; "
              f"candidates {list(prep['plans'])}", flush=True)
        results: dict[str, Any] = {}
        task_s = []
        for name, plan in prep["plans"].items():
            runs: dict[str, list[dict[str, Any]]] = {}
            r = results[name] = {"runs": runs}
            for rep in range(args.repeats):
                order = args.contenders if rep % 2 == 0 else args.contenders[::-1]  # alternate who goes first
                for side in order:
                    if side == "peer" and plan["spec"] is None:
                        r["peer_why"] = "the peer has no such method"
                        continue
                    job = {"threads": args.threads, "data": args.data, "task": args.task, "candidate": name,
                           "epochs": args.epochs, "straight": args.straight, "features": prep["features"],
                           "run_dir": str(tmp / "runs" / side), "spec": plan["spec"]}
                    res = bench_peer.run_worker(side, job, tmp, script=script)
                    task_s += [res["task_s"]] if "task_s" in res else []
                    runs.setdefault(side, []).append(res)
                    print(f"[fold-cost] {name} {side} #{rep}: {res['process_s']:.1f} s per fold, "
                          f"{res['phases']['steps'] / res['steps']:.2f} s/step, acc {100 * res['accuracy']:.0f} %, "
                          f"load {res['load_before']:.1f}/{res['load_after']:.1f}", flush=True)
            r.update({side: summarize(v, args.threads) for side, v in runs.items()})
    prep.pop("features")
    result = {"command": command, "machine": bench_peer.machine(), "prep": prep, "candidates": results,
              "task_s": statistics.median(task_s) if task_s else 0.0, "total_s": time.perf_counter() - t_start,
              "load": (load_start, os.getloadavg()[0]),
              "settings": {"data": args.data, "epochs": args.epochs, "repeats": args.repeats, "threads": args.threads,
                           "straight": args.straight, "contenders": args.contenders}}
    for plan in prep["plans"].values():
        plan["spec"] = plan["spec"] and {k: v for k, v in plan["spec"].items() if k not in ("train", "test", "weights")}
    text = render(result)
    print(text)
    if args.out != "-":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1))
        (out / "results.md").write_text(text)
        print(f"[fold-cost] wrote {out}/results.md and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
