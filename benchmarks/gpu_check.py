"""Prepared GPU check (issue 19 part 5): visiontune's CUDA paths on random-init weights, in minutes.

Run through ``benchmarks/gpu_check.sh`` (``make install`` first). No hub access is needed: every backbone is
built with ``backbone.weights=none`` from timm's own architecture definitions at the real sizes. Sections:

* ``steps``: LoRA / DoRA / QLoRA / Mona / full fine-tuning training steps on the DINOv3 ViT-S/16 and ViT-B/16
  shapes in bf16 autocast, through the product's own ``build_model`` and ``train_one_epoch``: step time,
  images/s, peak ``torch.cuda.max_memory_allocated`` (weights included, as a CUDA run's ``peak_memory_mb``)
  next to ``visiontune estimate``'s peak for the same configuration.
* ``7b``: one QLoRA all-linear r64 step on ``vit_7b_patch16_dinov3`` with gradient checkpointing (NF4
  quantization on the GPU), its build time, and the estimate vs measured peak.
* ``eval``: merged vs unmerged inference throughput (bf16) of the ViT-B LoRA model, and how far the two differ.
* ``ddp``: DistributedDataParallel training steps on every GPU present (``torch.distributed.run``), with a
  check that the ranks end with identical weights.

Writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out`` (default ``benchmarks/results/gpu/``). Each
section's failure is recorded and the others go on. ``--dry-run`` runs the same code on the CPU with tiny
test backbones (no GPU needed): it checks the script, its DDP launch (gloo) and its writers, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
GIB = float(2**30)

ADAPTER = ["method.targets=all-linear", "method.rank=16"]
METHOD_OVERRIDES: dict[str, list[str]] = {
    "lora": ["method.name=lora", *ADAPTER],
    "dora": ["method.name=dora", *ADAPTER],
    "qlora": ["method.name=qlora", *ADAPTER],
    "mona": ["method.name=mona"],
    "full": ["method.name=full"],
}


def plan(dry_run: bool) -> dict[str, Any]:
    """Shapes and sizes of every section: the real ones on a GPU, toy ones for ``--dry-run`` on the CPU."""
    if dry_run:
        return {"device": "cpu", "precision": "fp32", "shapes": ["test_vit_reg"], "img": 32, "batch": 4, "steps": 1,
                "big": {"backbone": "test_vit_reg", "img": 32, "batch": 2}, "eval_backbone": "test_vit_reg",
                "eval_batch": 8, "eval_iters": 2, "ddp_backbone": "test_vit_reg", "ddp_batch": 4}
    return {"device": "cuda", "precision": "bf16", "shapes": ["vit_small_patch16_dinov3", "vit_base_patch16_dinov3"],
            "img": 224, "batch": 32, "steps": 5, "big": {"backbone": "vit_7b_patch16_dinov3", "img": 224, "batch": 8},
            "eval_backbone": "vit_base_patch16_dinov3", "eval_batch": 64, "eval_iters": 20,
            "ddp_backbone": "vit_base_patch16_dinov3", "ddp_batch": 32}


def make_config(backbone: str, method: list[str], img: int, batch: int, p: dict[str, Any], extra: list[str] = ()) -> Any:
    import visiontune as vt

    return vt.load_config(None, overrides=[
        "data.dataset=(random tensors)", f"backbone.name={backbone}", "backbone.weights=none", f"backbone.img_size={img}",
        f"optim.batch_size={batch}", f"optim.precision={p['precision']}", f"run.device={p['device']}",
        "run.progress=false", "optim.head_init=zero", *method, *extra,
    ])


def build(cfg: Any) -> tuple[Any, Any, Any, float]:
    """The run's model as ``visiontune train`` builds it (method applied, on the device); seconds it took."""
    import torch

    from visiontune.registry import METHODS
    from visiontune.runs import build_model
    from visiontune.train.loop import resolve_config, resolve_device

    device = resolve_device(cfg.run.device)
    method = METHODS.get(cfg.method.name)(cfg.method)
    method.device = device
    cfg = resolve_config(cfg, method, device)
    t0 = time.perf_counter()
    model = build_model(cfg, method, NUM_CLASSES).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return model, method, cfg, time.perf_counter() - t0


def train_steps(model: Any, method: Any, cfg: Any, steps: int, warmup: int = 1) -> dict[str, Any]:
    """``steps`` timed optimizer steps (after ``warmup``) of the product's ``train_one_epoch`` on random batches."""
    import torch

    from visiontune.eval import PeakMemory
    from visiontune.train.loop import autocast_dtype, resolve_device, train_one_epoch
    from visiontune.train.speed import fast_forward

    device = resolve_device(cfg.run.device)
    amp = autocast_dtype(cfg.optim.precision, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, s = cfg.optim.batch_size, int(cfg.backbone.img_size)
    batch = (torch.randn(b, 3, s, s, generator=gen).to(device), torch.randint(0, NUM_CLASSES, (b,), generator=gen).to(device))
    optimizer = torch.optim.AdamW(method.param_groups(model, cfg.optim.lr, cfg.optim.head_lr, cfg.optim.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    fwd = fast_forward(model)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with PeakMemory(device) as mem:
        train_one_epoch(fwd, [batch] * warmup, optimizer, scheduler, cfg, device, amp)
        sync()
        t0 = time.perf_counter()
        out = train_one_epoch(fwd, [batch] * steps, optimizer, scheduler, cfg, device, amp)
        sync()
        elapsed = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # On CUDA the allocator's peak (weights included) is compared with the estimate's peak; on the CPU (dry run)
    # the process RSS also holds the interpreter and libraries, so there what the steps added is compared.
    measured = mem.peak_mb if mem.kind == "cuda_allocated" else mem.delta_mb
    return {"step_ms": 1000 * elapsed / steps, "images_per_s": b * steps / elapsed, "loss": out["train_loss"],
            "peak_measured_gib": measured / 1024 if measured is not None else None, "memory_kind": mem.kind,
            "trainable": trainable, "batch": b, "img": s, "steps": steps}


def with_estimate(row: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """Add ``visiontune estimate``'s peak (and its ratio to the measured one) to a result row."""
    from visiontune.estimate import estimate_memory

    est = estimate_memory(cfg, num_classes=NUM_CLASSES, device=cfg.run.device)
    row["peak_estimate_gib"] = (est.peak if est.device == "cuda" else est.training_added) / GIB
    row["estimate_detail"] = {k: getattr(est, k) / GIB for k in ("weights", "gradients", "optimizer", "activations", "weight_copies")}
    if row.get("peak_measured_gib"):
        row["estimate_over_measured"] = row["peak_estimate_gib"] / row["peak_measured_gib"]
    return row


def _free() -> None:
    """Collect what the caller has just deleted and empty CUDA's cache, so the next cell's peak is its own."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cell(cfg: Any, steps: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build ``cfg``'s model, time ``steps`` training steps, add the estimate. The model lives only in this
    frame, so it is gone (and its GPU memory reusable) before the next cell builds its own."""
    model, method, cfg, build_s = build(cfg)
    row = {"backbone": cfg.backbone.name, "method": method.describe(), "build_s": build_s, **(extra or {})}
    if getattr(method, "quantized", False):
        row["quantization"] = method.report().get("quantization")
    row.update(train_steps(model, method, cfg, steps))
    return row


def section_steps(p: dict[str, Any], results: dict[str, Any], budget_end: float) -> None:
    for backbone in p["shapes"]:
        for name, ov in METHOD_OVERRIDES.items():
            key = f"{backbone} {name}"
            if time.monotonic() > budget_end:
                results["skipped"].append(f"steps {key}: over the time budget")
                continue
            try:
                cfg = make_config(backbone, ov, p["img"], p["batch"], p)
                row = _cell(cfg, p["steps"])
                _free()
                results["steps"].append(with_estimate(row, cfg))
                print(f"[gpu_check] steps {key}: {row['step_ms']:.1f} ms/step, peak {_f(row['peak_measured_gib'], '.3f')} GiB "
                      f"(estimate {row['peak_estimate_gib']:.3f})", flush=True)
            except Exception as e:  # noqa: BLE001 - recorded; the other cells go on
                results["errors"].append({"section": f"steps {key}", "error": f"{type(e).__name__}: {e}",
                                          "traceback": traceback.format_exc(limit=6)})
                print(f"[gpu_check] steps {key} failed: {type(e).__name__}: {e}", flush=True)
            _free()


def section_big(p: dict[str, Any], results: dict[str, Any]) -> None:
    big = p["big"]
    try:
        cfg = make_config(big["backbone"], ["method.name=qlora", "method.targets=all-linear", "method.rank=64"],
                          big["img"], big["batch"], p, ["backbone.grad_checkpointing=true"])
        row = _cell(cfg, min(2, p["steps"] + 1), {"grad_checkpointing": True})
        _free()
        results["big"] = with_estimate(row, cfg)
        print(f"[gpu_check] 7b: built in {row['build_s']:.0f} s, {row['step_ms']:.0f} ms/step, peak "
              f"{_f(row['peak_measured_gib'], '.2f')} GiB (estimate {row['peak_estimate_gib']:.2f})", flush=True)
    except Exception as e:  # noqa: BLE001 - recorded; the other sections go on
        results["errors"].append({"section": "7b", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)})
    _free()


def section_eval(p: dict[str, Any], results: dict[str, Any]) -> None:
    import torch

    from visiontune.train.loop import autocast, autocast_dtype, resolve_device
    from visiontune.train.speed import fast_forward

    try:
        cfg = make_config(p["eval_backbone"], METHOD_OVERRIDES["lora"], p["img"], p["batch"], p)
        model, method, cfg, _ = build(cfg)
        train_steps(model, method, cfg, steps=1)  # adapters away from their zero start, so merging changes weights
        device = resolve_device(cfg.run.device)
        amp = autocast_dtype(cfg.optim.precision, device)
        x = torch.randn(p["eval_batch"], 3, p["img"], p["img"], generator=torch.Generator().manual_seed(1)).to(device)
        model.eval()
        merged = method.merge(model).eval()
        row: dict[str, Any] = {"backbone": p["eval_backbone"], "method": method.describe(), "batch": p["eval_batch"]}
        outs = {}
        for label, m in (("unmerged", fast_forward(model)), ("merged", fast_forward(merged))):
            with torch.inference_mode(), autocast(device, amp):
                outs[label] = m(x).float()
                for _ in range(2):
                    m(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                for _ in range(p["eval_iters"]):
                    m(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            row[f"{label}_images_per_s"] = p["eval_batch"] * p["eval_iters"] / (time.perf_counter() - t0)
        row["speedup"] = row["merged_images_per_s"] / row["unmerged_images_per_s"]
        row["max_abs_logit_diff"] = float((outs["merged"] - outs["unmerged"]).abs().max())
        results["eval"] = row
        del model, merged, method, outs
    except Exception as e:  # noqa: BLE001 - recorded; the other sections go on
        results["errors"].append({"section": "eval", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)})
    _free()


def section_ddp(p: dict[str, Any], results: dict[str, Any], dry_run: bool) -> None:
    import torch

    n = 1 if dry_run else torch.cuda.device_count()
    if n < 1:
        results["skipped"].append("ddp: no GPU")
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(Path(__file__).resolve()),
               "--ddp-worker", "--ddp-out", str(out), *(["--dry-run"] if dry_run else [])]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
            if res.returncode != 0 or not out.exists():
                raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stderr[-3000:]}")
            results["ddp"] = json.loads(out.read_text())
        except Exception as e:  # noqa: BLE001 - recorded; the other sections go on
            results["errors"].append({"section": "ddp", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)})


def ddp_worker(args: argparse.Namespace) -> None:
    """One rank under ``torch.distributed.run``: DDP training steps; rank 0 writes the result."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from visiontune.train.loop import autocast_dtype, train_one_epoch
    from visiontune.train.speed import fast_forward

    p = plan(args.dry_run)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = p["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    cfg = make_config(p["ddp_backbone"], METHOD_OVERRIDES["lora"], p["img"], p["ddp_batch"], p,
                      [f"run.device={device}"])
    model, method, cfg, _ = build(cfg)  # same seed on every rank: identical initial weights
    ddp = DDP(fast_forward(model, check=False), device_ids=[local] if cuda else None)
    amp = autocast_dtype(cfg.optim.precision, device)
    optimizer = torch.optim.AdamW(method.param_groups(model, cfg.optim.lr, cfg.optim.head_lr, cfg.optim.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as a sampler would give it
    b, s = cfg.optim.batch_size, p["img"]
    batches = [(torch.randn(b, 3, s, s, generator=gen).to(device), torch.randint(0, NUM_CLASSES, (b,), generator=gen).to(device))
               for _ in range(2)]
    train_one_epoch(ddp, batches[:1], optimizer, scheduler, cfg, device, amp)
    if cuda:
        torch.cuda.synchronize(device)
    dist.barrier()
    steps = 2 if args.dry_run else 10
    t0 = time.perf_counter()
    train_one_epoch(ddp, [batches[i % 2] for i in range(steps)], optimizer, scheduler, cfg, device, amp)
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    flat = torch.cat([q.detach().float().flatten() for q in model.parameters() if q.requires_grad]).to(torch.float64)
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    same = max(float((g - gathered[0]).abs().max()) for g in gathered)
    times = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(times, torch.tensor([elapsed], dtype=torch.float64, device=device))
    if rank == 0:
        slowest = max(float(t) for t in times)
        Path(args.ddp_out).write_text(json.dumps({
            "world_size": world, "backend": dist.get_backend(), "backbone": p["ddp_backbone"], "method": method.describe(),
            "batch_per_rank": b, "img": s, "steps": steps, "step_ms": 1000 * slowest / steps,
            "images_per_s": world * b * steps / slowest, "max_param_diff_across_ranks": same,
        }))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- writers


def _f(v: Any, fmt: str = ".2f") -> str:
    return "—" if v is None else format(v, fmt)


def markdown(results: dict[str, Any]) -> str:
    """The Markdown report of a results dict (also what ``--dry-run`` checks)."""
    m = results["meta"]
    lines = [
        "# GPU check" + (" (DRY RUN on CPU: tiny test backbones, not GPU figures; memory columns are the RSS the "
                         "steps added and the estimate's training share)" if m["dry_run"] else ""),
        "",
        (f"`{m['command']}` on {m['device_name']} ({m['date']}; torch {m['torch']}, timm {m['timm']}, "
         f"bitsandbytes {m['bitsandbytes']}, {m['gpus']} GPU(s)); {m['wall_s']:.0f} s in all. Random-init weights "
         "(`backbone.weights=none`): speed and memory, not accuracy. Peaks are `torch.cuda.max_memory_allocated` "
         "during the steps, weights included (a CUDA run's `peak_memory_mb`); estimates are `visiontune estimate` for "
         "the same configuration."),
        "",
        f"## Training steps ({m['precision']}, batch {results['plan']['batch']}, {results['plan']['img']} px)",
        "",
        "| backbone | method | trainable | step (ms) | images/s | peak measured (GiB) | estimate (GiB) | estimate / measured |",
        "|:---|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["steps"]:
        lines.append(f"| {r['backbone']} | {r['method']} | {r['trainable'] / 1e6:.2f} M | {_f(r['step_ms'], '.1f')} | "
                     f"{_f(r['images_per_s'], '.1f')} | {_f(r.get('peak_measured_gib'), '.3f')} | "
                     f"{_f(r.get('peak_estimate_gib'), '.3f')} | {_f(r.get('estimate_over_measured'))} |")
    big = results.get("big")
    lines += ["", "## QLoRA all-linear r64 with gradient checkpointing on the largest backbone", ""]
    if big:
        q = big.get("quantization") or {}
        lines += [
            "| backbone | batch | img | build (s) | step (ms) | images/s | peak measured (GiB) | estimate (GiB) | estimate / measured |",
            "|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
            (f"| {big['backbone']} | {big['batch']} | {big['img']} | {big['build_s']:.0f} | {big['step_ms']:.0f} | "
             f"{big['images_per_s']:.1f} | {_f(big.get('peak_measured_gib'), '.2f')} | "
             f"{_f(big.get('peak_estimate_gib'), '.2f')} | {_f(big.get('estimate_over_measured'))} |"),
            "", (f"4-bit layers: {q.get('quantized_linears', '?')}, backbone {q.get('backbone_mb_before', 0) / 1024:.2f} GiB "
                 f"-> {q.get('backbone_mb_after', 0) / 1024:.2f} GiB."),
        ]
    else:
        lines.append("not run (see errors)")
    ev = results.get("eval")
    lines += ["", "## Merged vs unmerged inference", ""]
    if ev:
        lines += ["| backbone | method | batch | unmerged images/s | merged images/s | speedup | max abs logit diff |",
                  "|:---|:---|---:|---:|---:|---:|---:|",
                  (f"| {ev['backbone']} | {ev['method']} | {ev['batch']} | {ev['unmerged_images_per_s']:.1f} | "
                   f"{ev['merged_images_per_s']:.1f} | {ev['speedup']:.2f}x | {ev['max_abs_logit_diff']:.2e} |")]
    else:
        lines.append("not run (see errors)")
    dd = results.get("ddp")
    lines += ["", "## DistributedDataParallel on the GPUs present", ""]
    if dd:
        lines += ["| ranks | backend | backbone | method | batch per rank | step (ms) | images/s (all ranks) | max weight diff across ranks |",
                  "|---:|:---|:---|:---|---:|---:|---:|---:|",
                  (f"| {dd['world_size']} | {dd['backend']} | {dd['backbone']} | {dd['method']} | {dd['batch_per_rank']} | "
                   f"{dd['step_ms']:.1f} | {dd['images_per_s']:.1f} | {dd['max_param_diff_across_ranks']:.1e} |")]
    else:
        lines.append("not run (see errors)")
    if results["errors"] or results["skipped"]:
        lines += ["", "## Errors and skipped parts", ""]
        lines += [f"- **{e['section']}**: {e['error'].splitlines()[0]}" for e in results["errors"]]
        lines += [f"- skipped: {s}" for s in results["skipped"]]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    j, md = out / "gpu_check.json", out / "gpu_check.md"
    j.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md.write_text(markdown(results))
    return j, md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="visiontune's CUDA paths on random-init weights (see the module docstring)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/gpu, or .../gpu/dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="run the script on the CPU with tiny backbones (no GPU)")
    ap.add_argument("--sections", default="steps,7b,eval,ddp", help="comma-separated subset of steps,7b,eval,ddp")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining step cells after this long")
    ap.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ddp-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    import timm
    import torch

    import visiontune  # noqa: F401  (first: it quiets bitsandbytes' import-time kernel notice)

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"steps", "7b", "eval", "ddp"}
    if unknown:
        ap.error(f"--sections: unknown {sorted(unknown)}; choose from steps,7b,eval,ddp")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or --dry-run to check the script on CPU",
              file=sys.stderr)
        return 2
    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = "not installed"
    p = plan(args.dry_run)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "gpu" / ("dry-run" if args.dry_run else "")
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {"command": " ".join(["benchmarks/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])]),
                 "dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                 "timm": timm.__version__, "bitsandbytes": bnb_version, "cuda": torch.version.cuda,
                 "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                 "device_name": torch.cuda.get_device_name(0) if not args.dry_run else f"CPU ({platform.machine()})",
                 "precision": p["precision"], "host": platform.node()},
        "plan": p, "steps": [], "big": None, "eval": None, "ddp": None, "errors": [], "skipped": [],
    }
    if "steps" in sections:
        section_steps(p, results, started + args.budget_s)
    if "7b" in sections:
        section_big(p, results)
    if "eval" in sections:
        section_eval(p, results)
    if "ddp" in sections:
        section_ddp(p, results, args.dry_run)
    results["meta"]["wall_s"] = time.monotonic() - started
    j, md = write(results, out)
    print(md.read_text())
    print(f"[gpu_check] wrote {j} and {md}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
