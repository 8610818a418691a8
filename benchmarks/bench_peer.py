"""visiontune vs the hand-written timm + peft loop (``benchmarks/peer.py``), side by side, same machine.

Per method, project and peer runs alternate (project, peer, project, peer, ...; the linear probe also
gets a third contender, the head trained by gradient with a backbone forward every epoch), each in a
fresh Python process so that peak memory, thread pools and allocator state do not leak between runs.
Both sides get the same model weights (the project's converted DINOv2-S, saved once at the benchmark
size and loaded by the peer with plain timm), the same images and split, batch size, epochs, learning
rates, schedule and seeds (run ``r`` uses seed ``r`` on both sides), fp32 on the CPU with the same
torch thread count. The project runs through ``visiontune.train`` exactly as users call it, with the
LP-FT head init switched off (``optim.head_init=zero``) because the peer starts from a zero head too.

Reported per method: medians over repeats of train images/s, peak memory (process RSS while
training), eval images/s (project: adapters merged; peer: peft modules as trained) and test accuracy
(mean over the seeds), and the ratios project / peer. Also: the FLOPs of one training step (torch's
``FlopCounterMode``) and the fraction of this machine's fp32 matmul throughput, measured in the same
invocation, that training reaches.

Usage (from the repo root; ``make bench`` runs the quick default):
    .venv/bin/python benchmarks/bench_peer.py                 # quick: ~10-15 min on 2 quiet cores
    .venv/bin/python benchmarks/bench_peer.py --full          # the demo's budget: 10 epochs, 3 repeats
    .venv/bin/python benchmarks/bench_peer.py --methods lora-qkv-r8 dora-qkv-r8 --repeats 3

Timings are only as good as the machine is quiet: the load average is recorded before and after
every run and runs taken under load are flagged in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASE_CONFIG = ROOT / "configs" / "demo.yaml"
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- bench_peer:begin -->", "<!-- bench_peer:end -->"

# name -> (project overrides, peer settings)
METHODS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "linear": (["method.name=linear"], {"method": "linear"}),
    "lora-qkv-r8": (["method.name=lora", "method.targets=[qkv]", "method.rank=8"], {"method": "lora", "target": "qkv"}),
    "lora-all-r16": (["method.name=lora", "method.targets=[all-linear]", "method.rank=16"], {"method": "lora", "target": "all"}),
    "dora-qkv-r8": (["method.name=dora", "method.targets=[qkv]", "method.rank=8"], {"method": "dora", "target": "qkv"}),
    "qlora-qkv-r8": (["method.name=qlora", "method.targets=[qkv]", "method.rank=8"], {"method": "qlora", "target": "qkv"}),
    "mona": (["method.name=mona"], {"method": "mona"}),
    "full": (["method.name=full"], {"method": "full"}),
}
# peft module-name regexes for timm's ViT (full match): the fused qkv, or every Linear inside the blocks.
PEER_TARGETS = {"qkv": r"blocks\.\d+\.attn\.qkv", "all": r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"}
QUICK = {"epochs": 2, "test_per_class": 40, "repeats": 2, "linear_loop_epochs": 30}
FULL = {"epochs": 10, "test_per_class": 100, "repeats": 3, "linear_loop_epochs": 30}


# ============================================================================ workers (fresh processes)


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def worker_probe(job: dict[str, Any]) -> dict[str, Any]:
    """This machine's fp32 matmul throughput: a large square GEMM and a ViT-S-shaped one (best of N)."""
    import torch

    _threads(job["threads"])
    out = {}
    for name, (m, k, n) in {"square_2048": (2048, 2048, 2048), "vit_s_qkv": (job["tokens"], 384, 1152)}.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        reps = max(3, int(4e10 / (2 * m * k * n)))
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = min(best, (time.perf_counter() - t0) / reps)
        out[name] = 2 * m * k * n / best / 1e9
    return out


def _step_flops(cfg: Any) -> dict[str, float]:
    """FLOPs of one training step (forward + backward of one batch) of the project's model; linear: one forward."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from visiontune.registry import METHODS as REG
    from visiontune.runs import build_model

    method = REG.get(cfg.method.name)(cfg.method)
    model = build_model(cfg, method, 4)
    size = cfg.backbone.img_size
    bs = cfg.optim.batch_size
    x, y = torch.randn(bs, 3, size, size), torch.randint(0, 4, (bs,))
    with FlopCounterMode(display=False) as fc:
        if method.feature_cache:
            with torch.no_grad():
                model.eval()(x)
        else:
            F.cross_entropy(model.train()(x), y).backward()
    return {"flops_per_step": float(fc.get_total_flops()), "batch_size": bs, "backward": not method.feature_cache}


def worker_project(job: dict[str, Any]) -> dict[str, Any]:
    _threads(job["threads"])
    # The peer imports scikit-learn at the top of its script, outside its timed region; the project imports
    # it lazily inside training. Import it here too, so neither side's times include the ~1-2 s import.
    import sklearn.linear_model  # noqa: F401
    import sklearn.model_selection  # noqa: F401

    import visiontune as vt

    cfg = vt.load_config(job["config"], job["overrides"])
    m = vt.train(cfg).metrics
    epochs = 1 if m["train"].get("feature_cache") else cfg.optim.epochs
    out = {
        "train_s": m["train"]["wall_time_s"], "eval_s": m["eval_time"]["test_s"], "merge_s": m["eval_time"]["merge_s"],
        "peak_mb": m["train"]["peak_memory_mb"], "delta_mb": m["train"]["peak_memory_delta_mb"],
        "accuracy": m["test"]["accuracy"], "train_images": m["run"]["train_size"] * epochs,
        "test_images": m["run"]["test_size"], "prefix_cache": m["train"].get("prefix_cache"),
    }
    if job.get("flops"):
        out.update(_step_flops(cfg))
    return out


def worker_peer(job: dict[str, Any]) -> dict[str, Any]:
    _threads(job["threads"])
    sys.path.insert(0, str(HERE))
    import peer

    from visiontune.eval import PeakMemory  # the harness's meter, the same one the project reports

    out = peer.run(job["spec"], lambda: PeakMemory("cpu"))
    out["test_images"] = len(job["spec"]["test"])
    return out


WORKERS = {"probe": worker_probe, "project": worker_project, "peer": worker_peer}


def run_worker(kind: str, job: dict[str, Any], tmp: Path, timeout: float = 3600, script: Path | None = None) -> dict[str, Any]:
    """Run one worker in a fresh interpreter (``script --worker JOB``, default this file); returns its result plus
    load averages around it. The job holds ``launched``, the wall clock just before the interpreter starts, so that
    a worker can tell its start-up and imports apart (:func:`started`)."""
    job_file = tmp / f"job-{time.time_ns()}.json"
    out_file = job_file.with_suffix(".out.json")
    load_before = os.getloadavg()[0]
    job_file.write_text(json.dumps({**job, "kind": kind, "out": str(out_file), "launched": time.time()}))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str((script or Path(__file__)).resolve()), "--worker", str(job_file)], cwd=ROOT,
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if proc.returncode != 0 or not out_file.exists():
        raise RuntimeError(f"{kind} worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(out_file.read_text())
    res.update(process_s=time.perf_counter() - t0, load_before=load_before, load_after=os.getloadavg()[0])
    return res


# ============================================================================ preparation


def export_backbone(base: Any, num_classes: int, image: str, tmp: Path) -> dict[str, Any]:
    """Save ``base``'s backbone (the project's weights at its size) for the peer and check that the peer preprocesses
    ``image`` (a file) and computes its features exactly as the project does; the peer spec's model part."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from visiontune.backbones import build_transform, create_backbone

    backbone = create_backbone(base.backbone, num_classes=0)
    weights = tmp / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(weights))
    sys.path.insert(0, str(HERE))
    import peer

    probe_spec = {"arch": base.backbone.name, "img_size": base.backbone.img_size, "num_classes": num_classes,
                  "weights": str(weights), "augment": False, "crop_scale": base.data.crop_scale}
    peer_model = peer.build_model(probe_spec).eval()
    _, peer_tf = peer.transforms(peer_model, probe_spec)
    with Image.open(image) as img:
        rgb = img.convert("RGB")
    x = build_transform(backbone, base.backbone.img_size, train=False)(rgb)
    assert torch.equal(x, peer_tf(rgb)), "peer and project preprocess differently"
    with torch.no_grad():
        diff = (backbone.eval()(x[None]) - peer_model.forward_head(peer_model.forward_features(x[None]), pre_logits=True)).abs().max()
    assert float(diff) == 0.0, f"peer and project backbones differ by {float(diff)}"
    return probe_spec


def peer_spec(cfg: Any, probe_spec: dict[str, Any], items: dict[str, list[tuple[str, int]]],
              peer_extra: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The peer's spec for the project config ``cfg`` (its resolved recipe: epochs, batch, learning rates, schedule,
    the method's rank/alpha/dropout), on ``items`` (``train``/``test`` (path, label) pairs); and the method's words."""
    import torch

    from visiontune.registry import METHODS as REG
    from visiontune.train.loop import resolve_config

    method = REG.get(cfg.method.name)(cfg.method)
    cfg = resolve_config(cfg, method, torch.device("cpu"))
    spec = {
        **probe_spec, "augment": cfg.data.augment, "epochs": cfg.optim.epochs, "batch_size": cfg.optim.batch_size,
        "eval_batch_size": cfg.optim.eval_batch_size, "lr": cfg.optim.lr, "head_lr": cfg.optim.head_lr,
        "weight_decay": cfg.optim.weight_decay, "warmup_epochs": cfg.optim.warmup_epochs,
        "min_lr_ratio": cfg.optim.min_lr_ratio, "label_smoothing": cfg.optim.label_smoothing,
        "clip_grad": cfg.optim.clip_grad, "train": items["train"], "test": items["test"], **peer_extra,
    }
    if peer_extra["method"] in ("lora", "dora", "qlora"):
        spec.update(rank=cfg.method.rank, alpha=method.alpha, dropout=cfg.method.dropout, use_dora=method.use_dora,
                    quantize=method.quantized, target_regex=peer_extra.get("target_regex") or PEER_TARGETS[peer_extra["target"]])
    if peer_extra["method"] == "mona":
        spec.update(inner_dim=cfg.method.inner_dim, mona_dropout=cfg.method.dropout)
    return spec, method.describe()


def prepare(args: argparse.Namespace, settings: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Resolve every method's project config, export the backbone for the peer, fix the split, check parity."""
    import visiontune as vt
    from visiontune.data import load_records, make_splits

    common = [
        f"optim.epochs={settings['epochs']}", f"data.test_per_class={settings['test_per_class']}", "optim.head_init=zero",
        "run.progress=false", "run.measure_speed=false", f"run.dir={tmp / 'runs'}", "run.overwrite=true",
        *args.overrides,
    ]
    base = vt.load_config(args.config, common)
    if base.optim.grad_accum != 1:
        raise SystemExit("bench_peer compares grad_accum=1 loops; drop optim.grad_accum")
    records = load_records(base.data.dataset, root=base.data.root)
    splits = make_splits(records, base.data)
    for name in ("train", "test"):
        if not all(isinstance(it, str) for it in splits[name].items):
            raise SystemExit(f"the peer reads image files; {base.data.dataset} has in-memory images")
    items = {k: [(str(p), int(y)) for p, y in zip(splits[k].items, splits[k].labels)] for k in ("train", "test")}
    probe_spec = export_backbone(base, len(records.classes), items["test"][0][0], tmp)
    plans = {}
    for name in args.methods:
        overrides, peer_extra = METHODS[name]
        cfg = vt.load_config(args.config, [*common, *overrides])
        spec, detail = peer_spec(cfg, probe_spec, items, peer_extra)
        plans[name] = {"overrides": [*common, *overrides], "spec": spec, "detail": detail}
    tokens = base.optim.batch_size * ((base.backbone.img_size // 14) ** 2 + 1)
    return {"plans": plans, "n_train": len(items["train"]), "n_test": len(items["test"]), "tokens": tokens,
            "classes": list(records.classes)}


# ============================================================================ orchestration and report


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "ram_gb": mem_gb, "torch": torch.__version__, "python": platform.python_version(), "os": platform.platform()}


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def loaded(run: dict[str, Any], threads: int) -> bool:
    """Whether another process competed for the CPU around this run (1-min load average above our threads)."""
    return max(run["load_before"], run["load_after"]) > threads + 0.75


def summarize(rows: list[dict[str, Any]], threads: int) -> dict[str, float]:
    """Medians over the runs taken on a quiet machine (all runs when none was)."""
    quiet = [r for r in rows if not loaded(r, threads)]
    rows = quiet or rows
    return {
        "runs_used": len(rows),
        "train_ips": statistics.median(r["train_images"] / r["train_s"] for r in rows),
        "eval_ips": statistics.median(r["test_images"] / r["eval_s"] for r in rows),
        "peak_mb": _median(rows, "peak_mb"),
        "delta_mb": _median(rows, "delta_mb"),
        "accuracy": statistics.fmean(r["accuracy"] for r in rows),
        "train_s": _median(rows, "train_s"),
        "eval_s": _median(rows, "eval_s"),
        "merge_s": statistics.median(r.get("merge_s", 0.0) for r in rows),
        "e2e_s": statistics.median(r["train_s"] + r.get("merge_s", 0.0) + r["eval_s"] for r in rows),
        "max_load": max(max(r["load_before"], r["load_after"]) for r in rows),
        "all_loaded": not quiet,
    }


def render(result: dict[str, Any]) -> str:
    s, mach, probe = result["settings"], result["machine"], result["probe"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_gb']} GB RAM, torch {mach['torch']}, "
        f"{s['threads']} torch threads, fp32, {mach['os']}  ",
        f"Measured fp32 matmul throughput (same invocation): {probe['square_2048']:.1f} GFLOP/s (2048^3 GEMM), "
        f"{probe['vit_s_qkv']:.1f} GFLOP/s (ViT-S qkv-shaped GEMM)  ",
        f"Settings: {s['config']} ({s['backbone']}, {s['img_size']} px, weights {s['weights']}), {s['dataset']}: "
        f"{s['n_train']} training / {s['n_test']} test images, {s['epochs']} epochs, batch {s['batch_size']}, eval batch "
        f"{s['eval_batch_size']}, {s['repeats']} repeats per side alternating (seeds 0..{s['repeats'] - 1}); linear-loop "
        f"contender {s['linear_loop_epochs']} epochs. Total {result['total_s'] / 60:.1f} min; load average "
        f"{result['load'][0]:.2f} before, {result['load'][1]:.2f} after.",
        "",
        "| method | train img/s project / peer | eval img/s project / peer | merge s | end-to-end s project / peer "
        "| peak RSS MB project / peer (training adds) | test accuracy % project / peer | step GFLOP | train GFLOP/s (% of matmul) |",
        "|:--|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, r in result["methods"].items():
        p, q = r["project"], r["peer"]
        fl = r.get("flops")
        flop_cells = "n/a | n/a"
        if fl:
            gfs = fl["flops_per_step"] / fl["batch_size"] * p["train_ips"] / 1e9
            flop_cells = f"{fl['flops_per_step'] / 1e9:.1f} | {gfs:.1f} ({100 * gfs / probe['square_2048']:.0f}%)"
            if name.startswith("qlora"):  # bitsandbytes' 4-bit matmuls are custom ops FlopCounterMode cannot see
                flop_cells = f"{fl['flops_per_step'] / 1e9:.1f}+ | n/a (4-bit matmuls uncounted)"
        warn = " (under load)" if p["all_loaded"] or q["all_loaded"] else ""
        lines.append(
            f"| {name}{warn} | {p['train_ips']:.1f} / {q['train_ips']:.1f} = **{p['train_ips'] / q['train_ips']:.2f}x** "
            f"| {p['eval_ips']:.1f} / {q['eval_ips']:.1f} = **{p['eval_ips'] / q['eval_ips']:.2f}x** | {p['merge_s']:.2f} "
            f"| {p['e2e_s']:.1f} / {q['e2e_s']:.1f} = **{q['e2e_s'] / p['e2e_s']:.2f}x** "
            f"| {p['peak_mb']:.0f} / {q['peak_mb']:.0f} = {p['peak_mb'] / q['peak_mb']:.2f} ({p['delta_mb']:+.0f} / {q['delta_mb']:+.0f}) "
            f"| {100 * p['accuracy']:.1f} / {100 * q['accuracy']:.1f} ({100 * (p['accuracy'] - q['accuracy']):+.1f}) "
            f"| {flop_cells} |"
        )
        if "loop" in r:
            lp = r["loop"]
            lines.append(
                f"| linear vs head trained by gradient, backbone forward every epoch{warn} | {p['train_ips']:.1f} / "
                f"{lp['train_ips']:.1f} (training **{lp['train_s'] / p['train_s']:.1f}x** shorter) | | | "
                f"{p['e2e_s']:.1f} / {lp['e2e_s']:.1f} = **{lp['e2e_s'] / p['e2e_s']:.2f}x** | {p['peak_mb']:.0f} / "
                f"{lp['peak_mb']:.0f} | {100 * p['accuracy']:.1f} / {100 * lp['accuracy']:.1f} | | |"
            )
    lines += [
        "",
        "Ratios are project / peer (for end-to-end: peer time / project time, so > 1 means the project is faster). "
        "train img/s = training images x epochs / training wall time (project: `metrics.json` train.wall_time_s, which "
        "includes building the decoded-image and prefix caches; linear probe: features + C search + fit, one pass). "
        "eval img/s = test images / test-pass time; the project evaluates the merged model (merge time in its own "
        "column, a one-off like loading), the peer its peft model as trained. End-to-end = training + merge + test pass. "
        "Peak RSS = process resident-set peak while training, in brackets what training added to the RSS at its start. "
        "Runs started or ended with the 1-min load average above threads + 0.75 (another process on the CPU) are "
        "left out of the medians when a quiet run of the same side exists; '(under load)' marks methods with none. "
        "Accuracy = mean over the seeds. step GFLOP = one training step (forward + backward of a batch; linear: a "
        "forward) of the project's model counted by FlopCounterMode; train GFLOP/s = that per image x project train "
        "img/s, as a share of the measured 2048^3 matmul throughput.",
        "",
        "Per run (seconds, MB, accuracy, load average before/after):",
        "",
    ]
    for name, r in result["methods"].items():
        for side in ("project", "peer", "loop"):
            for i, run in enumerate(r.get("runs", {}).get(side, [])):
                pc = run.get("prefix_cache") or {}
                lines.append(
                    f"- {name} {side} #{i}: train {run['train_s']:.1f} s, eval {run['eval_s']:.1f} s"
                    + (f" (+ merge {run['merge_s']:.2f} s)" if "merge_s" in run else "")
                    + f", peak {run['peak_mb']:.0f} MB ({run['delta_mb']:+.0f}), acc {100 * run['accuracy']:.1f}, "
                    f"load {run['load_before']:.1f}/{run['load_after']:.1f}"
                    + (" (loaded: left out of the medians)" if loaded(run, s["threads"]) and r[side]["runs_used"] < len(r["runs"][side]) else "")
                    + (f", prefix cache: {pc.get('reason') or pc.get('train_reason') or 'used'}" if pc else "")
                )
    return "\n".join(lines) + "\n"


def write_results(text: str, path: Path) -> None:
    """Replace the generated block of RESULTS.md, keeping the hand-written notes around it."""
    block = f"{BEGIN}\n{text}{END}"
    if path.exists() and BEGIN in path.read_text() and END in path.read_text():
        old = path.read_text()
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = f"# visiontune vs a hand-written timm + peft loop\n\n{block}\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--full", action="store_true", help="the demo's budget (10 epochs, 100 test images per class, 3 repeats)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--repeats", type=int, help="runs per side and method (default: 2 quick, 3 full)")
    p.add_argument("--epochs", type=int, help="training epochs (default: 2 quick, 10 full)")
    p.add_argument("--test-per-class", type=int, help="test images per class (default: 40 quick, 100 full)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    p.add_argument("--config", default=str(BASE_CONFIG))
    p.add_argument("--out", default=str(RESULTS), help="Markdown file whose generated block is replaced ('-' = print only)")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every project run (and the peer's recipe)")
    args = p.parse_args(argv)
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        result = WORKERS[job["kind"]](job)
        Path(job["out"]).write_text(json.dumps(result))
        return 0

    settings = dict(FULL if args.full else QUICK)
    for key in ("repeats", "epochs", "test_per_class"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    command = " ".join(["python benchmarks/bench_peer.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory(prefix="vt-bench-") as tmpdir:
        tmp = Path(tmpdir)
        print(f"[bench] settings: {settings}, threads {args.threads}, methods {args.methods}", flush=True)
        prep = prepare(args, settings, tmp)
        probe = run_worker("probe", {"threads": args.threads, "tokens": prep["tokens"]}, tmp)
        print(f"[bench] fp32 matmul: {probe['square_2048']:.1f} GFLOP/s (2048^3), {probe['vit_s_qkv']:.1f} (ViT-S qkv shape)", flush=True)
        methods: dict[str, Any] = {}
        for name in args.methods:
            plan = prep["plans"][name]
            runs: dict[str, list[dict[str, Any]]] = {"project": [], "peer": []}
            flops = None
            for r in range(settings["repeats"]):
                seed = [f"run.seed={r}", f"run.name={name}-{r}"]
                res = run_worker("project", {"threads": args.threads, "config": args.config,
                                             "overrides": [*plan["overrides"], *seed], "flops": r == 0}, tmp)
                if r == 0:
                    flops = {k: res[k] for k in ("flops_per_step", "batch_size", "backward")}
                runs["project"].append(res)
                runs["peer"].append(run_worker("peer", {"threads": args.threads, "spec": {**plan["spec"], "seed": r}}, tmp))
                if name == "linear":
                    loop_spec = {**plan["spec"], "seed": r, "method": "linear_loop", "epochs": settings["linear_loop_epochs"],
                                 "augment": True, "lr": 1e-3, "head_lr": 1e-3}
                    runs.setdefault("loop", []).append(run_worker("peer", {"threads": args.threads, "spec": loop_spec}, tmp))
                last = {k: v[-1] for k, v in runs.items()}
                print(f"[bench] {name} #{r}: " + "; ".join(
                    f"{k} train {v['train_s']:.1f}s eval {v['eval_s']:.1f}s acc {100 * v['accuracy']:.1f} peak {v['peak_mb']:.0f}MB"
                    for k, v in last.items()), flush=True)
            methods[name] = {**{k: summarize(v, args.threads) for k, v in runs.items()}, "runs": runs, "flops": flops,
                             "detail": plan["detail"]}
    base_cfg = __import__("visiontune").load_config(args.config, args.overrides)
    result = {
        "command": command, "machine": machine(), "probe": probe, "methods": methods, "total_s": time.perf_counter() - t_start,
        "load": (load_start, os.getloadavg()[0]),
        "settings": {**settings, "threads": args.threads, "config": os.path.relpath(args.config, ROOT),
                     "backbone": base_cfg.backbone.name, "img_size": base_cfg.backbone.img_size,
                     "weights": base_cfg.backbone.weights, "dataset": base_cfg.data.dataset, "n_train": prep["n_train"],
                     "n_test": prep["n_test"], "batch_size": base_cfg.optim.batch_size,
                     "eval_batch_size": base_cfg.optim.eval_batch_size},
    }
    text = render(result)
    print(text)
    if args.out != "-":
        write_results(text, Path(args.out))
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
        print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
