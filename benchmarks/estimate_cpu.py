"""`visiontune estimate` against measured CPU training peaks: one fresh process per run, a table of both.

Each configuration trains for one epoch (digits, 8 images per class, batch 16 unless set) through
`visiontune train` in its own process, so no earlier run's freed memory hides part of its peak; the measured
figure is the run's `metrics.json` `train.peak_memory_delta_mb` (peak process RSS during training minus the
RSS when training began: what training adds to the loaded model). The estimate is `visiontune estimate`'s
`training_added` (its peak minus the weights) for the same configuration on CPU. Writes
`benchmarks/results/estimate-cpu.md` and `.json`.

    python benchmarks/estimate_cpu.py            # ~10 min on 2 busy cores
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "data.dataset=digits", "data.train_per_class=8", "data.test_per_class=2", "backbone.weights=none",
    "optim.epochs=1", "optim.batch_size=16", "optim.head_init=zero", "run.progress=false", "run.measure_speed=false",
    "run.threads=2",
]
VIT_S = ["backbone.name=vit_small_patch16_224", "backbone.img_size=64"]
DINOV3_S = ["backbone.name=vit_small_patch16_dinov3", "backbone.img_size=64"]
CONFIGS = [
    VIT_S + ["method.name=lora", "optim.batch_size=8"],
    VIT_S + ["method.name=lora"],
    VIT_S + ["method.name=lora", "optim.batch_size=32"],
    VIT_S + ["method.name=lora", "backbone.img_size=96"],
    VIT_S + ["method.name=lora", "data.val_per_class=2"],
    VIT_S + ["method.name=lora", "method.targets=all-linear", "method.rank=16"],
    VIT_S + ["method.name=lora", "method.blocks=last:4"],
    VIT_S + ["method.name=dora"],
    VIT_S + ["method.name=mona"],
    VIT_S + ["method.name=full"],
    VIT_S + ["method.name=full", "optim.batch_size=8"],
    VIT_S + ["method.name=full", "backbone.grad_checkpointing=true"],
    VIT_S + ["method.name=lora", "backbone.grad_checkpointing=true", "optim.batch_size=32"],
    DINOV3_S + ["method.name=lora"],
    DINOV3_S + ["method.name=full"],
]


RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0"}
"""glibc settings under which freed memory goes back to the OS at once, so peak RSS tracks the live tensors."""


def measure(overrides: list[str], workdir: Path, extra_env: dict[str, str] | None = None) -> dict:
    """Train in a fresh `visiontune train` process; the run's metrics.json train section."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {}))
    cmd = [sys.executable, "-m", "visiontune.cli", "train", *overrides, f"run.dir={workdir}", "run.name=run",
           "run.overwrite=true"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return json.loads((workdir / "run" / "metrics.json").read_text())["train"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "estimate-cpu"))
    ap.add_argument("--reuse", action="store_true",
                    help="keep the measurements in <out>.json and recompute only the estimates (after a change to them)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import visiontune as vt
    from visiontune.estimate import CPU_CALIBRATION, LIVE_CALIBRATION, estimate_memory

    rows = []
    out = Path(args.out)
    stored = {r["config"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]} if args.reuse else {}
    with tempfile.TemporaryDirectory() as tmp:
        for ov in CONFIGS:
            overrides = COMMON + ov
            t0 = time.perf_counter()
            if args.reuse:
                old = stored[" ".join(ov)]
                measured, live = old["measured_mib"], old["measured_returned_mib"]
            else:
                measured = float(measure(overrides, Path(tmp))["peak_memory_delta_mb"])
                live = float(measure(overrides, Path(tmp), RETURN_FREED)["peak_memory_delta_mb"])
            cfg = vt.load_config(None, overrides=overrides)
            est = estimate_memory(cfg, device="cpu")
            est_live = estimate_memory(cfg, device="cpu", calibration=LIVE_CALIBRATION)
            row = {"config": " ".join(ov), "measured_mib": round(measured, 1),
                   "estimate_mib": round(est.training_added / 2**20, 1),
                   "ratio": round(est.training_added / 2**20 / measured, 3),
                   "measured_returned_mib": round(live, 1),
                   "estimate_live_mib": round(est_live.training_added / 2**20, 1),
                   "ratio_live": round(est_live.training_added / 2**20 / live, 3),
                   "saved_tensors_mib": round(est.activations / CPU_CALIBRATION.activation_factor / 2**20, 1),
                   "seconds": stored[" ".join(ov)]["seconds"] if args.reuse else round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    measured_on = json.loads(out.with_suffix(".json").read_text())["meta"]["date"] if args.reuse else time.strftime("%Y-%m-%d")
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cores": os.cpu_count(),
            "calibration": {"activation_factor": CPU_CALIBRATION.activation_factor,
                            "runtime_mib": CPU_CALIBRATION.runtime_bytes / 2**20},
            "live_calibration": {"activation_factor": LIVE_CALIBRATION.activation_factor,
                                 "runtime_mib": LIVE_CALIBRATION.runtime_bytes / 2**20},
            "common": COMMON, "return_freed_env": RETURN_FREED, "date": measured_on,
            "estimates_computed": time.strftime("%Y-%m-%d %H:%M")}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    ratios, live = [r["ratio"] for r in rows], [r["ratio_live"] for r in rows]
    lines = [
        "# `visiontune estimate` vs measured CPU training peaks",
        "",
        f"Generated by `python benchmarks/estimate_cpu.py` on {meta['date']} ({meta['cores']} cores, {meta['machine']})"
        + (f"; estimates recomputed from those measurements by `--reuse` on {meta['estimates_computed']}." if args.reuse else "."),
        "Each run: one epoch in a fresh `visiontune train` process, " + " ".join(f"`{c}`" for c in COMMON) + ".",
        "",
        "- **measured**: `metrics.json` `train.peak_memory_delta_mb`, the peak process RSS while training minus the",
        "  RSS when training began (the loaded model's weights are in both, so this is what training adds), with",
        "  glibc's default allocator; **estimate**: `visiontune estimate` for the same config on CPU, peak minus weights",
        (f"  (activations x {CPU_CALIBRATION.activation_factor}, +{CPU_CALIBRATION.runtime_bytes / 2**20:.0f} MiB during "
         "the backward pass, activations and gradients added up: fitted to this column)."),
        "- **freed returned**: the same run with `MALLOC_MMAP_THRESHOLD_=16384 MALLOC_TRIM_THRESHOLD_=0`, so freed",
        "  memory goes back to the OS at once and the peak is the live tensors (what CUDA's `max_memory_allocated`",
        (f"  counts); **live estimate**: saved tensors x {LIVE_CALIBRATION.activation_factor:g} "
         f"+{LIVE_CALIBRATION.runtime_bytes / 2**20:.0f} MiB, the larger of activations and gradients in the backward "
         "pass: the model the CUDA estimate uses (which adds AdamW's foreach temporary at the step)."),
        "- **saved**: what autograd holds at the end of the forward pass (the meta-device count).",
        "",
        "| config | measured | estimate | ratio | freed returned | live estimate | ratio | saved |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| `{r['config']}` | {r['measured_mib']:.1f} | {r['estimate_mib']:.1f} | {r['ratio']:.2f} | "
              f"{r['measured_returned_mib']:.1f} | {r['estimate_live_mib']:.1f} | {r['ratio_live']:.2f} | "
              f"{r['saved_tensors_mib']:.1f} |" for r in rows]
    lines += ["", "MiB throughout.", ""]
    within = sum(abs(r - 1) <= 0.15 for r in ratios)
    within_live = sum(abs(r - 1) <= 0.15 for r in live)
    lines.append(
        f"Default allocator: {within} of {len(rows)} within 15 % (range {min(ratios):.2f}-{max(ratios):.2f}). "
        "The others differ in how much freed memory glibc keeps for reuse (DoRA's allocations are reused, "
        "Mona's, DINOv3's RoPE blocks' and checkpointing's recomputation are not), which no shape count predicts. "
        f"Freed memory returned: {within_live} of {len(rows)} within 15 % (range {min(live):.2f}-{max(live):.2f})."
    )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
