"""LoRA layer implementations side by side: the project's lean layers vs plain peft, memory and step time.

Each variant runs in a fresh process (peak RSS is per process): a ViT-S/14 (DINOv2 layout, random init,
112 px, batch 16) with LoRA on the named targets, ``--steps`` AdamW training steps at ``--threads`` threads.

* ``peft``: what a user writes: ``peft.get_peft_model`` on timm's model (one adapter on the fused ``qkv``).
* ``split``: the project's q/k/v split with each part called separately (the pre-fusion path), plain peft
  layers.
* ``lean``: the project's layers: fused q/k/v GEMM with separate q, k, v adapters, and
  :class:`visiontune.methods.lean_lora.LeanLoraLinear` on every other target.

Reported: process RSS when training starts, its peak while training, what training added, and the median
step time (wall clock and process CPU). Run on a quiet machine for the times:

    .venv/bin/python benchmarks/lora_layers.py --targets qkv all
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

TARGETS = {
    # project regex (split q/k/v), peer regex (fused qkv), rank
    "qkv": (r".*\.attn\.qkv\.(q|k|v)", r".*\.attn\.qkv", 8),
    "all": (r".*\.(attn\.qkv\.(q|k|v)|attn\.proj|mlp\.fc1|mlp\.fc2)", r".*\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)", 16),
}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def worker(variant: str, targets: str, steps: int, threads: int, quant: bool = False, dora: bool = False) -> dict:
    import timm
    import torch
    from peft import LoraConfig, get_peft_model

    import visiontune.methods.qkv as qkv
    from visiontune.methods.lean_lora import use_lean_layers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=112, num_classes=4)
    ours, peer, rank = TARGETS[targets]
    if variant != "peft":
        qkv.split_qkv(model)
    if variant == "split":
        qkv._fusable_bases = lambda parts: None  # the per-part path
        qkv._per_part_forward = lambda x, parts: torch.cat([p(x) for p in parts], dim=-1)
    if quant:  # QLoRA: every block Linear in NF4 (double quantization, fp32 compute), as `method.name=qlora`
        from visiontune.methods.lora import quantize_linears

        quantize_linears(model, "nf4", True, "float32")
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=peer if variant == "peft" else ours, modules_to_save=["head"],
                     use_dora=dora)
    if variant == "lean":
        use_lean_layers(cfg)
    model = get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(16, 3, 112, 112)
    start = _rss_mb()
    wall, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": variant, "targets": targets + ("-nf4" if quant else "") + ("-dora" if dora else ""), "rank": rank, "rss_start_mb": start, "rss_peak_mb": peak,
        "training_added_mb": peak - start, "step_s": statistics.median(wall[1:]), "step_cpu_s": statistics.median(cpu[1:]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", nargs="+", default=["qkv", "all"], choices=list(TARGETS))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats per variant")
    p.add_argument("--quant", action="store_true", help="QLoRA: block Linears in NF4 for every variant")
    p.add_argument("--dora", action="store_true", help="DoRA instead of LoRA for every variant")
    p.add_argument("--variants", nargs="+", default=["peft", "split", "lean"], choices=["peft", "split", "lean"])
    p.add_argument("--worker", nargs=2, metavar=("VARIANT", "TARGETS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps, args.threads, args.quant, args.dora)))
        return
    rows = []
    for targets in args.targets:
        for r in range(args.repeats):
            for variant in args.variants:
                cmd = [sys.executable, __file__, "--worker", variant, targets, "--steps", str(args.steps),
                       "--threads", str(args.threads)] + (["--quant"] if args.quant else []) + (["--dora"] if args.dora else [])
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                rows.append(json.loads(out))
                print(f"{targets} #{r} {variant}: {rows[-1]}", file=sys.stderr)
    print(f"| targets | variant | RSS start MB | peak MB | training added MB | step s (median of {args.repeats} runs) |")
    print("|:--|:--|--:|--:|--:|--:|")
    for targets in args.targets:
        for variant in args.variants:
            got = [r for r in rows if r["targets"].split("-")[0] == targets and r["variant"] == variant]
            med = lambda k, got=got: statistics.median(r[k] for r in got)  # noqa: E731
            print(f"| {got[0]['targets']} r{got[0]['rank']} | {variant} | {med('rss_start_mb'):.0f} | {med('rss_peak_mb'):.0f} | "
                  f"{med('training_added_mb'):.0f} | {med('step_s'):.3f} |")


if __name__ == "__main__":
    main()
