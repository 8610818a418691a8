"""fp32 vs bf16 autocast on this CPU, for evaluation and for training steps, with the accuracy bf16 costs.

Issue 20, part 4: does bf16 pay on a CPU? This measures, for one finished run (the demo's DINOv2-S at
112 px), in alternating rounds (fp32, bf16, fp32, ...; medians over rounds):

- evaluation: images/s of the merged model's forward pass at the run's eval batch, under
  ``torch.autocast("cpu", torch.bfloat16)`` or not, and test-split accuracy / weighted F1 both ways;
- training: images/s of forward + backward + AdamW step of the run's model as trained (adapters
  unmerged, the run's trainable parameters), at the run's training batch.

Channels-last memory format only changes convolutions; a ViT has one (the patch embedding), so it is
not measured separately here. The CPU's flags are printed: bf16 matrix products are native with
AVX-512 BF16 (``avx512_bf16``) and much faster with AMX (``amx_bf16``); without either, PyTorch emulates.

Usage: .venv/bin/python benchmarks/bench_precision.py RUN [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-time", type=float, default=2.0)
    args = p.parse_args(argv)

    import torch

    from visiontune.data import ImageDataset, load_records, make_splits
    from visiontune.eval import compute_metrics
    from visiontune.infer.backends import cpu_info
    from visiontune.runs import load_run
    from visiontune.train.loop import make_loader

    torch.set_num_threads(args.threads)
    run = load_run(args.run, merge=False)
    cfg = run.config
    merged = run.method.merge(load_run(args.run, merge=False).model).eval()
    train_model = run.model
    params = [q for q in train_model.parameters() if q.requires_grad]
    if not params:  # a linear probe's backbone is frozen and its head comes from a closed-form fit: train the head
        for q in train_model.get_classifier().parameters():
            q.requires_grad_(True)
        params = [q for q in train_model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    c, h, w = 3, cfg.backbone.img_size, cfg.backbone.img_size
    xe = torch.randn(cfg.optim.eval_batch_size, c, h, w)
    xt, yt = torch.randn(cfg.optim.batch_size, c, h, w), torch.randint(0, len(run.classes), (cfg.optim.batch_size,))

    def amp(bf16: bool) -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)

    def eval_step(bf16: bool) -> None:
        with torch.inference_mode(), amp(bf16):
            merged(xe)

    def train_step(bf16: bool) -> None:
        train_model.train()
        with amp(bf16):
            loss = torch.nn.functional.cross_entropy(train_model(xt).float(), yt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def rate(step: Any, bf16: bool, batch: int) -> float:
        step(bf16)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.min_time or n < 2:
            step(bf16)
            n += 1
        return batch * n / (time.perf_counter() - t0)

    samples: dict[str, list[float]] = {}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for kind, step, batch in (("eval", eval_step, len(xe)), ("train", train_step, len(xt))):
            for bf16 in (False, True):
                samples.setdefault(f"{kind} {'bf16' if bf16 else 'fp32'}", []).append(rate(step, bf16, batch))
        loads.append(os.getloadavg()[0])
    records = load_records(cfg.data.dataset, root=cfg.data.root)
    test = make_splits(records, cfg.data)["test"]
    loader = make_loader(ImageDataset(test, run.transform), cfg.optim.eval_batch_size, False, 0, 0)
    preds: dict[str, list[torch.Tensor]] = {"fp32": [], "bf16": []}
    labels = []
    with torch.inference_mode():
        for x, y in loader:
            for name in preds:
                with amp(name == "bf16"):
                    preds[name].append(merged(x).float().argmax(1))
            labels.append(y)
    y = torch.cat(labels).numpy()
    acc = {k: compute_metrics(y, torch.cat(v).numpy(), run.classes) for k, v in preds.items()}
    out = {
        "run": args.run, "method": cfg.method.name, "machine": cpu_info(), "threads": args.threads, "rounds": args.rounds,
        "capability": torch.backends.cpu.get_cpu_capability(), "mkldnn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        "img_s": {k: statistics.median(v) for k, v in samples.items()}, "img_s_rounds": samples, "load": loads,
        "test": {k: {"accuracy": v["accuracy"], "f1_weighted": v["f1_weighted"]} for k, v in acc.items()},
        "test_agreement": float((torch.cat(preds["fp32"]) == torch.cat(preds["bf16"])).float().mean()), "test_images": len(y),
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
