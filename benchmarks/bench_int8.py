"""INT8 / fp32 ONNX Runtime vs PyTorch vs the hand-written timm + peft baseline: inference speed and accuracy.

For each run directory given (each exported first with ``visiontune export RUN --int8``, which measures
the test-split accuracy of PyTorch, the fp32 export and the INT8 export and records it in
``export/model.int8.json``), this times the forward pass of:

- ``peer``: the hand-written baseline of ``benchmarks/peer.py`` (timm + ``peft.get_peft_model``, or its
  hand-written Mona), unmerged, eager fp32 under ``torch.no_grad`` — what that loop evaluates;
- ``torch``: the project's PyTorch model, adapters merged (``vt.pipeline``'s model);
- ``ort-fp32`` / ``ort-int8``: the run's ONNX exports in onnxruntime;

at batch 1 (latency) and a larger batch (throughput), on a random preprocessed batch (the same for all).
Variants take turns within each round (peer, torch, fp32, int8, peer, ...), repeated ``--rounds`` times;
figures are medians over rounds, so a burst of load from another process hits every variant alike.
torch and onnxruntime get the same thread count. Weights: the peer gets the same backbone weights
(LoRA / Mona weights stay at their initial values, which changes no arithmetic).

Usage (repo root):
    visiontune export RUN --int8          # per run: writes export/ and the accuracy comparison
    .venv/bin/python benchmarks/bench_int8.py RUN [RUN ...] --threads 1,2 --rounds 5
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
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- bench_int8:begin -->", "<!-- bench_int8:end -->"


def peer_model(run_dir: Path, tmp: Path) -> Any:
    """The hand-written baseline's model for this run's method, on the run's backbone weights."""
    import torch
    from safetensors.torch import save_file

    import visiontune as vt
    from visiontune.backbones import create_backbone

    sys.path.insert(0, str(HERE))
    import peer

    cfg = vt.load_config(run_dir / "config.yaml")
    classes = json.loads((run_dir / "labels.json").read_text())
    weights = tmp / f"{run_dir.name}-backbone.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone(cfg.backbone, num_classes=0).state_dict().items()}, str(weights))
    spec: dict[str, Any] = {"arch": cfg.backbone.name, "img_size": cfg.backbone.img_size, "num_classes": len(classes),
                            "weights": str(weights)}
    torch.manual_seed(0)
    model = peer.build_model(spec)
    method = cfg.method.name
    if method in ("lora", "dora"):
        from visiontune.registry import METHODS

        m = METHODS.get(method)(cfg.method)
        # The peer puts peft on timm's fused qkv (the project splits q / k / v): the nearest hand-written equivalent.
        model = peer.add_lora(model, {"rank": cfg.method.rank, "alpha": m.alpha, "dropout": cfg.method.dropout,
                                      "use_dora": method == "dora", "quantize": False,
                                      "target_regex": r"blocks\.\d+\.attn\.qkv"})
        detail = f"timm + peft {method} r{cfg.method.rank} on the fused qkv, unmerged"
    elif method == "mona":
        model = peer.add_mona(model, {"inner_dim": cfg.method.inner_dim, "mona_dropout": cfg.method.dropout})
        detail = f"timm + hand-written Mona (inner {cfg.method.inner_dim})"
    elif method in ("linear", "full"):
        detail = "plain timm model"
    else:
        raise SystemExit(f"no peer model for method {method!r}")
    return model.eval(), detail


def timed(step: Callable[[], Any], min_time: float) -> float:
    """Images-per-call-agnostic: the median seconds per call over at least ``min_time`` seconds (after one warm-up)."""
    step()
    durations = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(durations) < 3:
        t0 = time.perf_counter()
        step()
        durations.append(time.perf_counter() - t0)
    return statistics.median(durations)


def bench_run(run_dir: Path, threads: int, batch_sizes: list[int], rounds: int, min_time: float, tmp: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    import visiontune as vt
    from visiontune.infer.backends import OnnxRuntimeModel

    torch.set_num_threads(threads)
    meta = json.loads((run_dir / "export" / "model.int8.json").read_text())
    project = vt.pipeline(str(run_dir)).model
    peer, detail = peer_model(run_dir, tmp)
    ort = {p: OnnxRuntimeModel(run_dir / "export" / n, threads=threads).session
           for p, n in (("fp32", "model.onnx"), ("int8", "model.int8.onnx"))}
    c, h, w = meta["input"]["shape"][1:]
    variants: dict[str, Callable[[np.ndarray], Any]] = {}

    def peer_step(x: np.ndarray) -> Any:
        with torch.no_grad():
            return peer(torch.from_numpy(x))

    def torch_step(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return project(torch.from_numpy(x))

    variants["peer"] = peer_step
    variants["torch"] = torch_step
    for p, s in ort.items():
        variants[f"ort-{p}"] = lambda x, s=s: s.run(None, {"pixel_values": x})
    rng = np.random.default_rng(0)
    xs = {b: rng.standard_normal((b, c, h, w)).astype(np.float32) for b in batch_sizes}
    samples: dict[tuple[str, int], list[float]] = {}
    loads = [os.getloadavg()[0]]
    for _ in range(rounds):
        for b in batch_sizes:
            for name, fn in variants.items():
                samples.setdefault((name, b), []).append(b / timed(lambda fn=fn, x=xs[b]: fn(x), min_time))
        loads.append(os.getloadavg()[0])
    acc = meta["accuracy"] or {}
    return {
        "run": str(run_dir), "method": meta["run"]["method"], "threads": threads, "peer": detail,
        "img_s": {f"{k[0]}@{k[1]}": statistics.median(v) for k, v in samples.items()},
        "img_s_rounds": {f"{k[0]}@{k[1]}": v for k, v in samples.items()},
        "accuracy": {k: acc.get(k) for k in ("images", "pytorch", "onnx_fp32", "onnx_int8")},
        "quantization": {k: meta["quantization"][k] for k in ("quantized_ops", "smoothquant", "calibration")},
        "load": loads,
    }


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, ISA flags {', '.join(m['isa'])} (VNNI: {'yes' if m['vnni'] else 'no'}; "
        f"no AMX), torch {m['torch']}, onnxruntime {m.get('onnxruntime')}. Shared with other jobs: 1-min load average "
        f"{min(min(r['load']) for r in result['runs']):.1f}-{max(max(r['load']) for r in result['runs']):.1f} during the runs.  ",
        f"Timing: forward pass on one random preprocessed batch, {result['rounds']} alternating rounds (peer, torch, ORT "
        f"fp32, ORT INT8, then again), >= {result['min_time']} s per measurement; img/s are medians over the rounds.",
        "",
    ]
    bs = result["batch_sizes"]
    big = max(bs)
    lines += [
        f"| run | threads | test acc. PyTorch / ONNX fp32 / INT8 (top-1 agreement INT8) | batch-1 img/s peer / torch / ORT fp32 / ORT INT8 "
        f"| batch-{big} img/s peer / torch / ORT fp32 / ORT INT8 | INT8 / peer, batch 1 | INT8 / peer, batch {big} |",
        "|:--|--:|--|--|--|--:|--:|",
    ]
    for r in result["runs"]:
        a = r["accuracy"]
        q = a.get("onnx_int8") or {}
        acc = (f"{100 * a['pytorch']['accuracy']:.1f} / {100 * a['onnx_fp32']['accuracy']:.1f} / {100 * q['accuracy']:.1f} "
               f"({100 * q['top1_agreement']:.1f}%)") if q else "not measured"
        s = r["img_s"]
        cells = []
        for b in (1, big):
            cells.append(" / ".join(f"{s[f'{v}@{b}']:.1f}" for v in ("peer", "torch", "ort-fp32", "ort-int8")))
        ratios = [f"**{s[f'ort-int8@{b}'] / s[f'peer@{b}']:.2f}x**" for b in (1, big)]
        lines.append(f"| {Path(r['run']).name} ({r['method']}) | {r['threads']} | {acc} | {cells[0]} | {cells[1]} | "
                     f"{ratios[0]} | {ratios[1]} |")
    lines += ["", "Peer models: " + "; ".join(sorted({f"{r['method']}: {r['peer']}" for r in result["runs"]})) + ".",
              "INT8 settings chosen per run (SmoothQuant strength by the calibration images): " + "; ".join(
                  f"{Path(r['run']).name}: alpha {r['quantization']['smoothquant']['alpha']}, "
                  f"{sum(r['quantization']['quantized_ops'].values())} layers quantized, "
                  f"{r['quantization']['calibration']['images']} calibration images"
                  for r in result["runs"] if r["threads"] == result["threads"][0]) + "."]
    return "\n".join(lines) + "\n"


def write_results(text: str, path: Path) -> None:
    """Replace the generated block in RESULTS.md (appending the block if it is not there yet)."""
    block = f"{BEGIN}\n{text}{END}"
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories, each exported with `visiontune export RUN --int8`")
    p.add_argument("--threads", default="2", help="comma-separated thread counts (torch and onnxruntime alike)")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--out", default=str(RESULTS), help="Markdown file whose bench_int8 block is replaced ('-' = print only)")
    args = p.parse_args(argv)
    from visiontune.infer.backends import cpu_info

    threads = [int(t) for t in args.threads.split(",")]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    command = " ".join(["python benchmarks/bench_int8.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    runs = []
    with tempfile.TemporaryDirectory(prefix="vt-int8-bench-") as tmp:
        for t in threads:
            for run in args.runs:
                r = bench_run(Path(run), t, sizes, args.rounds, args.min_time, Path(tmp))
                print(f"[bench_int8] {Path(run).name} threads {t}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["img_s"].items()),
                      flush=True)
                runs.append(r)
    result = {"command": command, "machine": cpu_info(), "threads": threads, "batch_sizes": sizes, "rounds": args.rounds,
              "min_time": args.min_time, "runs": runs}
    text = render(result)
    print(text)
    if args.out != "-":
        write_results(text, Path(args.out))
        (HERE / "results" / "int8").mkdir(parents=True, exist_ok=True)
        (HERE / "results" / "int8" / "bench_int8.json").write_text(json.dumps(result, indent=1))
        print(f"[bench_int8] wrote {args.out} and benchmarks/results/int8/bench_int8.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
