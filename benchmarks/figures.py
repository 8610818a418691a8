"""The measured figures that the README and the documentation quote, each computed from the result file that a
benchmark command wrote. This module is the one place where a quoted figure is defined.

A page marks a quoted figure as ``<!--fig:ID-->82.2 ± 0.4<!--/fig-->`` (the comments are invisible when the page
is rendered, on GitHub too). Three things keep the pages true:

* the site build (``docs/hooks.py``) puts the value computed here between the markers, and the generated
  *Measured figures* page lists every figure with its source file, command, machine and date;
* ``tests/test_docs.py`` fails when the text between a page's markers is not the computed value, or names
  an unknown figure;
* ``python benchmarks/figures.py --write`` rewrites the marked text of every page from the sources (after a
  new benchmark run), and ``python benchmarks/figures.py`` prints the table.

Nothing here is measured: each figure is arithmetic on a committed result file (a mean, a ratio, a range).
The date of a source is the one it records, else that of the last commit that changed its results.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"(?<!`)<!--fig:([\w.-]+)-->(.*?)<!--/fig-->", re.S)
"""A marked figure in a page: its id, then the text the page shows (not one shown as code: a backtick before it)."""


def _demo_table(text: str) -> list[dict[str, str]]:
    """The rows of the README's demo table (written by ``make demo``, held to a fresh demo by ``make demo-check``)."""
    from visiontune.demo import readme_block

    lines = [line for line in readme_block(text)[0].splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip().strip("*") for c in line.strip("|").split("|")))) for line in lines[2:]]


@dataclass(frozen=True)
class Source:
    """A result file a benchmark command wrote, and how to describe where it came from."""

    path: str
    command: str
    machine: str
    changed: str = ""
    """A regex of the lines that hold the results, when the file holds other text too: its date is then the last
    commit that changed such a line (``git log -G``)."""

    def read(self) -> Any:
        text = (ROOT / self.path).read_text()
        if self.path.endswith(".csv"):
            return list(csv.DictReader(text.splitlines()))
        return _demo_table(text) if self.path == "README.md" else json.loads(text)

    def date(self) -> str:
        """The date the result file records, else of the last commit that changed the results (``unknown`` outside a
        git checkout)."""
        content = self.read()
        if isinstance(content, dict) and isinstance(content.get("date"), str):
            return content["date"]
        pick = [f"-G{self.changed}"] if self.changed else []
        try:
            out = subprocess.run(["git", "log", "-1", "--format=%cs", *pick, "--", self.path], cwd=ROOT,
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return "unknown"
        return out.stdout.strip() or "unknown"


def _bench_machine(result: dict[str, Any]) -> str:
    m = result["machine"]
    return f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, torch {m['torch']}"


BENCH = Source("benchmarks/RESULTS.json", "make bench (python benchmarks/bench_peer.py)", "")
FMNIST50 = Source(
    "benchmarks/results/fashion-mnist-50/results.csv", "visiontune sweep configs/sweeps/fashion-mnist-50.yaml --quiet",
    "AMD EPYC, 2 cores (benchmarks/results/fashion-mnist-50/README.md)",
)


DEMO = Source("README.md", "make demo (python -m visiontune.demo run.progress=false); the table between the "
              "demo-table markers", "AMD EPYC, 2 cores, AVX-512 (the demo-machine line of the table)",
              changed=r"^\| (linear|lora|full|scratch) \| \w+ \| (offline|none) \|")
SWEEP_ELPV = Source(
    "benchmarks/results/dinov2-elpv-cpu-sweep/results.csv", "visiontune sweep configs/sweeps/dinov2-elpv-cpu.yaml --quiet",
    "AMD EPYC, 2 cores (docs/how-to/sweeps.md)",
)
SWEEP_FMNIST50 = Source(
    "benchmarks/results/dinov2-fmnist50-cpu/results.csv", "visiontune sweep configs/sweeps/dinov2-fmnist50-cpu.yaml --quiet",
    "AMD EPYC, 2 cores (docs/how-to/sweeps.md)",
)
_AUTO_MACHINE = "Intel Xeon (AVX-512 BF16/VNNI, AMX), 2 cores, quiet: nothing else running (docs/tutorials/choose-a-method.md)"
SUGGEST = Source(
    "benchmarks/suggest/results/auto_choice.json",
    "python benchmarks/suggest/analyze.py --choose (after the simulate.py runs of benchmarks/suggest/README.md)",
    "AMD EPYC, 2 cores, AVX-512, shared (benchmarks/suggest/README.md)",
)
AUTO_FMNIST10_LOADED = Source(
    "benchmarks/results/auto-fmnist10-loaded/leaderboard.json",
    "visiontune auto fashion-mnist data.train_per_class=10 data.test_per_class=100 backbone.weights=offline "
    "backbone.img_size=112 --backbone vit_small_patch14_dinov2 --prior benchmarks/results/auto-fmnist10-loaded/prior.json "
    "--budget 30m --out runs/auto/auto-fmnist10-loaded",
    "Intel Xeon (AVX-512 BF16/VNNI, AMX), 2 cores, beside `make test` (docs/tutorials/choose-a-method.md)",
)
AUTO_FMNIST10_V4 = Source(
    "benchmarks/results/auto-fmnist10-v4/leaderboard.json",
    "visiontune auto fashion-mnist data.train_per_class=10 data.test_per_class=100 backbone.weights=offline "
    "backbone.img_size=112 --backbone vit_small_patch14_dinov2 --prior benchmarks/results/auto-fmnist10-v4/prior.json "
    "--budget 30m --out runs/auto/auto-fmnist10-v4", _AUTO_MACHINE,
)
AUTO_ELPV20_V4 = Source(
    "benchmarks/results/auto-elpv20-v4/leaderboard.json",
    "visiontune auto elpv data.train_per_class=20 data.test_per_class=100 backbone.weights=offline backbone.img_size=112 "
    "--backbone vit_small_patch14_dinov2 --prior benchmarks/results/auto-elpv20-v4/prior.json --budget 20m "
    "--out runs/auto/auto-elpv20-v4", _AUTO_MACHINE,
)
AUTO_MRI40_V4 = Source(
    "benchmarks/results/auto-mri40-v4/leaderboard.json",
    "python benchmarks/datasets.py subset /work/data/brain_mri4 --per-class 10 --out /work/bench/mri40; "
    "visiontune auto /work/bench/mri40 backbone.weights=offline --prior benchmarks/results/auto-mri40-v4/prior.json "
    "--budget 15m --out runs/auto/auto-mri40-v4", _AUTO_MACHINE,
)
HEAD_INIT = Source(
    "benchmarks/results/head-init-views/results.json",
    "python benchmarks/head_init_views.py --runs /tmp/lpft/study --out benchmarks/results/head-init-views",
    "Intel Xeon, 2 cores, AVX-512 BF16/VNNI, AMX (benchmarks/results/head-init-views/results.md)",
)

EXPLORA = Source(
    "benchmarks/results/explora-elpv/results.json",
    "python benchmarks/explora_elpv.py --pretrain-run runs/pretrain/explora-elpv --probe-config configs/demo.yaml "
    "--out benchmarks/results/explora-elpv", "a shared 2-core CPU (docs/how-to/explora.md)",
)
AUTO_FMNIST10_RAY = Source(
    "benchmarks/results/auto-fmnist10-ray/leaderboard.json",
    "visiontune auto fashion-mnist data.train_per_class=10 data.test_per_class=100 backbone.weights=offline "
    "backbone.img_size=112 --backbone vit_small_patch14_dinov2 --prior benchmarks/results/auto-fmnist10-ray/prior.json "
    "--budget 30m --out runs/auto/auto-fmnist10-ray --executor ray --cpus-per-run 1 (the search, alone on the machine, "
    "commit 4e15d53); the decision and final retrain: the same command continuing a copy of that folder (--out "
    "runs/auto/ray2), commit c6529f9, beside `make test`", _AUTO_MACHINE,
)
PRECISION = Source(
    "benchmarks/results/precision-amx.json", "python benchmarks/bench_precision.py runs/demo/lora --rounds 5 --threads 2",
    "Intel Xeon, 2 cores, AVX-512 BF16/VNNI, AMX (the file's machine record)",
)
STREAM = Source(
    "benchmarks/results/stream-eval.json", "python benchmarks/bench_stream_eval.py --images 20000 --workers 2",
    "AMD EPYC, 2 cores, busy (docs/tutorials/scale-out.md)",
)
STARTUP = Source("benchmarks/results/startup.json", "python benchmarks/bench_startup.py --runs 5",
                 "AMD EPYC, 2 cores, AVX-512 (the file's machine record)")


# ----------------------------------------------------------------------------- the demo table (README.md)


def _demo_accuracy(rows: list[dict[str, str]], method: str, backbone: str | None = None) -> list[float]:
    return [float(r["test accuracy (%)"]) for r in rows if r["method"] == method and backbone in (None, r["backbone"])]


def _points_range(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f} points"


def _demo_probe_over_scratch(rows: list[dict[str, str]]) -> str:
    probe = _demo_accuracy(rows, "linear")[0]
    return _points_range([probe - a for a in _demo_accuracy(rows, "scratch")])


def _demo_finetune_under_probe(rows: list[dict[str, str]]) -> str:
    probe = _demo_accuracy(rows, "linear")[0]
    return _points_range([probe - a for m in ("lora", "full") for a in _demo_accuracy(rows, m)])


# ----------------------------------------------------------------------------- visiontune auto (leaderboard.json)


def _auto_accuracy(board: dict[str, Any]) -> str:
    return f"{100 * board['final']['test']['accuracy']:.1f} %"


def _auto_time(board: dict[str, Any]) -> str:
    used = board["elapsed_s"] / 60
    budget = board.get("budget_s")
    return f"{used:.1f} of {budget / 60:.0f} min" if budget else f"{used:.1f} min, no budget"


# ----------------------------------------------------------------------------- optim.head_init_views (results.json)


def _paired(key: str) -> Callable[[dict[str, Any]], str]:
    """Mean paired difference ± its standard error, points, with a typographic minus as the page writes it."""

    def value(result: dict[str, Any]) -> str:
        s = result["summary"][key]
        return f"{s['mean_diff']:+.1f} ± {s['se']:.1f}".replace("-", "\u2212")

    return value


# ----------------------------------------------------------------------------- ExPLoRA on ELPV (results.json)


def _probe(name: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: f"{100 * r['probes'][name]['probe_accuracy']:.1f}%"


def _student_minus_original(measure: Callable[[dict[str, Any]], float]) -> Callable[[dict[str, Any]], str]:
    def value(r: dict[str, Any]) -> str:
        p = r["probes"]
        return f"{100 * (measure(p['explora (student)']) - measure(p['original'])):+.1f}".replace("-", "\u2212")

    return value


# ----------------------------------------------------------------------------- bf16 inference, streamed evaluation


def _eval_img_s(r: dict[str, Any], precision: str) -> float:
    return r["img_s"][f"eval {precision}"]


def _stream_img_s(command: str) -> Callable[[dict[str, Any]], str]:
    """img/s of ``command`` over the largest folder of the streaming benchmark."""

    def value(r: dict[str, Any]) -> str:
        row = max((row for row in r["rows"] if row["command"] == command), key=lambda row: row["images"])
        return f"{row['img_per_s']:.0f} img/s"

    return value


# ----------------------------------------------------------------------------- start-up (startup.json)


def _startup_cpu(name: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: f"{r['commands'][name]['cpu_s_median']:.2f} s"


# ----------------------------------------------------------------------------- make bench (RESULTS.json)


def _sides(result: dict[str, Any], gradient_only: bool = False) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(project, peer) of every method of the bench, or of the gradient methods only (not the linear probe)."""
    return [(m["project"], m["peer"]) for name, m in result["methods"].items() if not (gradient_only and name == "linear")]


def _range(values: list[float], digits: int = 2) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}x"


def _bench_total(r: dict[str, Any]) -> str:
    return f"{r['total_s'] / 60:.1f} min"


def _bench_linear_e2e(r: dict[str, Any]) -> str:
    lin = r["methods"]["linear"]
    return f"{lin['peer']['e2e_s'] / lin['project']['e2e_s']:.2f}x"


def _bench_linear_points(r: dict[str, Any]) -> str:
    lin = r["methods"]["linear"]
    return f"{100 * (lin['project']['accuracy'] - lin['peer']['accuracy']):+.1f} points"


def _bench_linear_vs_loop(r: dict[str, Any]) -> str:
    lin = r["methods"]["linear"]
    return f"{lin['loop']['train_s'] / lin['project']['train_s']:.0f}x"


def _bench_peak(r: dict[str, Any]) -> str:
    return _range([p["peak_mb"] / q["peak_mb"] for p, q in _sides(r)])


def _bench_merged_eval(r: dict[str, Any]) -> str:
    # Methods that merge for evaluation: a merge time was measured.
    return _range([p["eval_ips"] / q["eval_ips"] for p, q in _sides(r) if p["merge_s"] > 0.001])


def _bench_train(r: dict[str, Any]) -> str:
    return _range([p["train_ips"] / q["train_ips"] for p, q in _sides(r, gradient_only=True)])


# ----------------------------------------------------------------------------- Fashion-MNIST 50/class sweep (results.csv)


def _accuracies(rows: list[dict[str, str]], method: str) -> list[float]:
    return [100 * float(row["test_accuracy"]) for row in rows if row["method"] == method]


def _mean_sd(rows: list[dict[str, str]], method: str) -> str:
    acc = _accuracies(rows, method)
    return f"{statistics.mean(acc):.1f} ± {statistics.stdev(acc):.1f}"


def _fmnist_probe(rows: list[dict[str, str]]) -> str:
    return f"{statistics.mean(_accuracies(rows, 'linear')):.1f}"


def _standard_error(acc: list[float], n_test: int) -> float:
    """Standard error (points) of a mean accuracy: binomial over the test images, plus the seeds' spread."""
    p = statistics.mean(acc) / 100
    seeds = statistics.stdev(acc) / math.sqrt(len(acc)) if len(acc) > 1 else 0.0
    return math.hypot(100 * math.sqrt(p * (1 - p) / n_test), seeds)


def _margin(better: list[float], probe: list[float], n_test: int) -> str:
    margin = statistics.mean(better) - statistics.mean(probe)
    return f"{margin:+.1f} ± {math.hypot(_standard_error(better, n_test), _standard_error(probe, n_test)):.1f}"


def _fmnist_margin(rows: list[dict[str, str]], n_test: int = 1000) -> str:
    return _margin(_accuracies(rows, "lora"), _accuracies(rows, "linear"), n_test)


def _best(rows: list[dict[str, str]]) -> list[float]:
    """The best single run's test accuracy (points) of a one-seed sweep."""
    return [max(100 * float(r["test_accuracy"]) for r in rows)]


def _sweep_margin(n_test: int) -> Callable[[list[dict[str, str]]], str]:
    """The best run over the linear probe ± one standard error, with ``n_test`` test images (the sweep's data section)."""
    return lambda rows: _margin(_best(rows), _accuracies(rows, "linear"), n_test)


def _one(value: Callable[[list[dict[str, str]]], list[float]]) -> Callable[[list[dict[str, str]]], str]:
    return lambda rows: f"{statistics.mean(value(rows)):.1f}"


@dataclass(frozen=True)
class Figure:
    """One quoted figure: what it is, its source and how it is computed from the source's content."""

    what: str
    source: Source
    compute: Callable[[Any], str]


FIGURES: dict[str, Figure] = {
    "bench.total": Figure("duration of the latest `make bench`", BENCH, _bench_total),
    "bench.linear-e2e": Figure("linear probe end to end, peer time / project time", BENCH, _bench_linear_e2e),
    "bench.linear-points": Figure("linear probe test accuracy, project minus peer", BENCH, _bench_linear_points),
    "bench.linear-vs-loop": Figure("linear probe training time: head trained by gradient / the project's probe", BENCH,
                                   _bench_linear_vs_loop),
    "bench.peak": Figure("peak memory, project / peer, range over the methods", BENCH, _bench_peak),
    "bench.merged-eval": Figure("evaluation img/s, project (merged) / peer (unmerged), range over the merging methods",
                                BENCH, _bench_merged_eval),
    "bench.train": Figure("training img/s, project / peer, range over the gradient methods", BENCH, _bench_train),
    "fmnist50.probe": Figure("linear probe test accuracy (%), mean over 3 seeds", FMNIST50, _fmnist_probe),
    "fmnist50.lora": Figure("LoRA q,v r8 test accuracy (%), mean ± SD over 3 seeds", FMNIST50,
                            lambda rows: _mean_sd(rows, "lora")),
    "fmnist50.dora": Figure("DoRA q,v r8 test accuracy (%), mean ± SD over 3 seeds", FMNIST50,
                            lambda rows: _mean_sd(rows, "dora")),
    "fmnist50.margin": Figure("LoRA minus the probe (points) ± one standard error (binomial over 1,000 test images, "
                              "plus the seeds' spread)", FMNIST50, _fmnist_margin),
}
FIGURES.update({
    "demo.probe-over-scratch": Figure("linear probe minus training from scratch (ResNet-18, ViT-S), points", DEMO,
                                      _demo_probe_over_scratch),
    "demo.finetune-under-probe": Figure("linear probe minus LoRA and minus full fine-tuning, points", DEMO,
                                        _demo_finetune_under_probe),
    "sweep-elpv.probe": Figure("linear probe test accuracy (%)", SWEEP_ELPV, _one(lambda rows: _accuracies(rows, "linear"))),
    "sweep-elpv.best": Figure("best run's test accuracy (%)", SWEEP_ELPV, _one(_best)),
    # elpv, test_per_class 50 x 4 classes (configs/sweeps/dinov2-elpv-cpu.yaml)
    "sweep-elpv.margin": Figure("best run minus the probe ± one standard error (binomial over 200 test images)",
                                SWEEP_ELPV, _sweep_margin(200)),
    "sweep-fmnist50.probe": Figure("linear probe test accuracy (%)", SWEEP_FMNIST50,
                                   _one(lambda rows: _accuracies(rows, "linear"))),
    "sweep-fmnist50.best": Figure("best run's test accuracy (%)", SWEEP_FMNIST50, _one(_best)),
    # fashion-mnist, test_per_class 100 x 10 classes (configs/sweeps/dinov2-fmnist50-cpu.yaml)
    "sweep-fmnist50.margin": Figure("best run minus the probe ± one standard error (binomial over 1,000 test images)",
                                    SWEEP_FMNIST50, _sweep_margin(1000)),
    "head-init.elpv": Figure("LoRA with optim.head_init_views=4 minus =1 on ELPV, mean ± SE over 3 draws, points",
                             HEAD_INIT, _paired("elpv lora")),
    "head-init.fmnist10": Figure("the same on Fashion-MNIST 10/class", HEAD_INIT, _paired("fashion-mnist lora")),
    "explora.time": Figure("pretraining wall time", EXPLORA,
                           lambda r: f"{r['pretraining']['training']['wall_time_s'] / 60:.1f} min"),
    "explora.original": Figure("linear probe on the original backbone (C by CV)", EXPLORA, _probe("original")),
    "explora.teacher": Figure("linear probe on the ExPLoRA teacher", EXPLORA, _probe("explora (teacher)")),
    "explora.student": Figure("linear probe on the ExPLoRA student", EXPLORA, _probe("explora (student)")),
    "explora.cka": Figure("student's CKA with the original (test features)", EXPLORA,
                          lambda r: f"{r['probes']['explora (student)']['cka_vs_original_test']:.2f}"),
    "explora.knn": Figure("student minus original, kNN (k=10) accuracy, points", EXPLORA,
                          _student_minus_original(lambda p: p["knn10_accuracy"])),
    "explora.probe-peak": Figure("student minus original, probe accuracy at its best C, points", EXPLORA,
                                 _student_minus_original(lambda p: max(p["probe_accuracy_by_c"].values()))),
    "auto-fmnist10-ray.accuracy": Figure("the chosen model's test accuracy (Ray executor)", AUTO_FMNIST10_RAY,
                                         _auto_accuracy),
    "auto-fmnist10-ray.minutes": Figure("wall time of the search's fine-tuning jobs (Ray executor)", AUTO_FMNIST10_RAY,
                                        lambda b: f"{b['finetune_s'] / 60:.1f} min"),
    **{f"{name}.fold-s": Figure("train seconds per fold of LoRA all-linear r16 on the last 4 blocks, mean of its folds",
                                src, lambda b: f"{next(c for c in b['leaderboard'] if 'last 4' in c['candidate'])['train_s_per_fold']:.1f} s")
       for name, src in (("auto-fmnist10-ray", AUTO_FMNIST10_RAY), ("auto-fmnist10-v4", AUTO_FMNIST10_V4))},
    "auto-fmnist10-v4.minutes": Figure("wall time of the search's fine-tuning jobs (one process)", AUTO_FMNIST10_V4,
                                       lambda b: f"{b['finetune_s'] / 60:.1f} min"),
    "bf16.speedup": Figure("evaluation img/s, bf16 autocast / fp32", PRECISION,
                           lambda r: f"{_eval_img_s(r, 'bf16') / _eval_img_s(r, 'fp32'):.2f}x"),
    "bf16.img-s": Figure("evaluation img/s, bf16 vs fp32", PRECISION,
                         lambda r: f"{_eval_img_s(r, 'bf16'):.1f} vs {_eval_img_s(r, 'fp32'):.1f} img/s"),
    "bf16.train": Figure("training img/s, bf16 autocast / fp32", PRECISION,
                         lambda r: f"{r['img_s']['train bf16'] / r['img_s']['train fp32']:.2f}x"),
    "bf16.unchanged": Figure("test predictions unchanged by bf16", PRECISION, lambda r: f"{100 * r['test_agreement']:.1f} %"),
    "stream.eval": Figure("visiontune eval, 20,000 PNGs, end to end", STREAM, _stream_img_s("eval")),
    "stream.predict": Figure("visiontune predict, 20,000 PNGs, end to end", STREAM, _stream_img_s("predict")),
    **{f"startup.{key}": Figure(f"CPU seconds of `visiontune {name}`, median of the runs", STARTUP, _startup_cpu(name))
       for key, name in (("help", "--help"), ("list", "list methods"), ("doctor", "doctor --offline"),
                         ("predict", "predict (tiny LoRA run)"))},
    "startup.load": Figure("1-minute load average when the start-up measurement began", STARTUP,
                           lambda r: f"{r['load_before']:.1f}"),
    "startup.wall-list": Figure("wall seconds of `visiontune list methods`, median of the runs", STARTUP,
                                lambda r: f"{r['commands']['list methods']['wall_s_median']:.1f} s"),
    "startup.predict-imports": Figure("what the predict process imported of peft / bitsandbytes", STARTUP,
                                      lambda r: "neither" if r["commands"]["predict (tiny LoRA run)"]["imported"] == "[]"
                                      else r["commands"]["predict (tiny LoRA run)"]["imported"]),
    **{f"{name}.accuracy": Figure("the chosen model's test accuracy (prior fitted without the task's dataset)", src,
                                  _auto_accuracy)
       for name, src in (("auto-fmnist10-v4", AUTO_FMNIST10_V4), ("auto-elpv20-v4", AUTO_ELPV20_V4),
                         ("auto-mri40-v4", AUTO_MRI40_V4), ("auto-fmnist10-loaded", AUTO_FMNIST10_LOADED))},
    **{f"{name}.time": Figure("selection time (of the budget)", src, _auto_time)
       for name, src in (("auto-fmnist10-v4", AUTO_FMNIST10_V4), ("auto-elpv20-v4", AUTO_ELPV20_V4),
                         ("auto-mri40-v4", AUTO_MRI40_V4), ("auto-fmnist10-loaded", AUTO_FMNIST10_LOADED))},
    # benchmarks/suggest: the whole policy `visiontune suggest --strategy auto` ships, and its criterion
    **{f"suggest.auto-{n}": Figure(f"labels per class `auto` needs to reach random's accuracy at {n}/class, over {n} "
                                   "(mean of 6 datasets)", SUGGEST, lambda c, n=n: f"{c['ratio'][str(n)]:.2f}")
       for n in (20, 50)},
    "suggest.gap-20": Figure("`auto` minus the runner-up policy in that ratio at 20/class, mean ± SE over the datasets",
                             SUGGEST, lambda c: "{mean:+.2f} ± {se:.2f}".format(**c["chosen_minus_runner_up_ratio"]["20"])),
})
"""Every figure a page may quote, by id."""


def values() -> dict[str, str]:
    """The text of every figure, computed from its source now."""
    cache: dict[str, Any] = {}
    out = {}
    for fid, fig in FIGURES.items():
        if fig.source.path not in cache:
            cache[fig.source.path] = fig.source.read()
        out[fid] = fig.compute(cache[fig.source.path])
    return out


def pages() -> list[Path]:
    """The pages that may quote figures: the README and every Markdown file of the documentation."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def render(text: str, figures: dict[str, str], keep_markers: bool = True) -> str:
    """``text`` with each marked figure's text replaced by its value (markers kept, or dropped for the site).

    Raises:
        KeyError: a marker names a figure that :data:`FIGURES` does not define.
    """

    def one(m: re.Match) -> str:
        value = figures[m.group(1)]
        return f"<!--fig:{m.group(1)}-->{value}<!--/fig-->" if keep_markers else value

    return MARKER.sub(one, text)


def figures_page(figures: dict[str, str]) -> str:
    """The generated *Measured figures* page: every figure, its value, where it is quoted and where it comes from."""
    quoted: dict[str, list[str]] = {}
    for page in pages():
        for fid in dict.fromkeys(m.group(1) for m in MARKER.finditer(page.read_text())):
            quoted.setdefault(fid, []).append(str(page.relative_to(ROOT)))
    lines = [
        "# Measured figures", "",
        "Every measured figure the README and these pages quote, computed from the result file its benchmark command "
        "wrote (`benchmarks/figures.py`); the pages show these values, and a test fails when a page's text differs.",
        "",
    ]
    sources = list(dict.fromkeys(fig.source for fig in FIGURES.values()))
    for src in sources:
        machine = src.machine or _bench_machine(src.read())
        lines += [f"## `{src.path}`", "", f"Command: `{src.command}`  ", f"Machine: {machine}  ",
                  f"Date: {src.date()}", "",
                  "| figure | value | what | quoted in |", "|:--|:--|:--|:--|"]
        for fid, fig in FIGURES.items():
            if fig.source == src:
                where = ", ".join(f"`{p}`" for p in quoted.get(fid, [])) or "nowhere"
                lines.append(f"| `{fid}` | {figures[fid]} | {fig.what} | {where} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the marked figures of every page from the sources")
    args = parser.parse_args(argv)
    figures = values()
    if not args.write:
        for fid, value in figures.items():
            print(f"{fid:24} {value:16} {FIGURES[fid].source.path}")
        return 0
    for page in pages():
        text = page.read_text()
        new = render(text, figures)
        if new != text:
            page.write_text(new)
            print(f"rewrote {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
