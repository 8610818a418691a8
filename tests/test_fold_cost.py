"""benchmarks/fold_cost.py on a tiny random ViT: the fold job and the train run timed phase by phase, the summary and
the report, the peer's target regexes; and the whole script once, through its fresh-process workers. Nothing here
depends on how fast the machine is: only which phases ran, how they add up, and what the report shows."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fold_cost.py"
TINY = ["backbone.name=test_vit", "backbone.weights=none", "backbone.img_size=32"]
CAND = "lora q,v r8"


@pytest.fixture(scope="module")
def fold_cost(script_module):
    return script_module("visiontune_bench_fold_cost", SCRIPT)


def _args(fold_cost, tmp: Path, contenders=("fold", "train")) -> argparse.Namespace:
    return argparse.Namespace(data="digits", task=[*fold_cost.TASK, *TINY], candidates=[CAND], epochs=3,
                              contenders=list(contenders), out=str(tmp / "out"))


def _job(prep: dict, tmp: Path, side: str, args: argparse.Namespace) -> dict:
    return {"threads": 1, "data": args.data, "task": args.task, "candidate": CAND, "epochs": args.epochs,
            "straight": False, "features": prep["features"], "run_dir": str(tmp / "runs" / side), "spec": None,
            "launched": time.time()}


def test_fold_and_train_phases_summary_and_report(fold_cost, tmp_path: Path) -> None:
    from visiontune.train import loop

    original = loop.train_one_epoch
    args = _args(fold_cost, tmp_path)
    prep = fold_cost.prepare(args, tmp_path)
    # auto's fold 1 of 5 on 10 per class of digits: 80 training images (too few for an inner validation), 20 held out
    assert (prep["n_train"], prep["n_val"], prep["n_test"], prep["k"]) == (80, 0, 20, 5)
    assert list(prep["plans"]) == [CAND] and prep["plans"][CAND]["spec"] is None  # no peer asked for
    runs = {}
    for side in ("fold", "train"):
        res = fold_cost.WORKERS[side](_job(prep, tmp_path, side, args))
        assert loop.train_one_epoch is original  # the timers put the loop's functions back
        res.update(process_s=res["imports_s"] + res["task_s"] + res["in_process_s"] + 0.5, load_before=0.0, load_after=0.0)
        runs[side] = res
        phases = res["phases"]
        assert set(phases) == {*fold_cost.PHASES, "other"}
        assert sum(phases.values()) == pytest.approx(res["in_process_s"])
        assert phases["steps"] > 0 and phases["build"] > 0 and phases["score"] > 0 and phases["head_init"] > 0
        assert res["steps"] == 3 * 5  # 3 epochs of ceil(80 / 16) steps
    fold = runs["fold"]
    assert fold["jobs"] == 2 and fold["rung_accuracy"] is not None  # first rung paused and scored, then resumed
    assert fold["head_features"] is True  # the cheap stage's features went to the LP-FT head
    assert fold["phases"]["epoch_end"] > 0  # each epoch checkpointed

    result = {"command": "python benchmarks/fold_cost.py", "machine": {"cpu": "test cpu", "cores": 2, "torch": "x"},
              "prep": {**prep, "task": args.task}, "total_s": 60.0, "load": (0.1, 0.2),
              "settings": {"data": "digits", "epochs": 3, "repeats": 1, "threads": 1, "straight": False},
              "candidates": {CAND: {"runs": {k: [v] for k, v in runs.items()},
                                    **{k: fold_cost.summarize([v], 1) for k, v in runs.items()},
                                    "peer_why": "the peer has no such method"}}}
    summary = result["candidates"][CAND]["fold"]
    assert summary["s_per_step"] == pytest.approx(fold["phases"]["steps"] / 15)
    assert summary["exit_s"] == pytest.approx(0.5)
    text = fold_cost.render(result)
    row = next(line for line in text.splitlines() if line.startswith(f"| {CAND} | fold |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[2]) == pytest.approx(summary["process_s"], abs=0.06)
    assert f"| {CAND} | peer | n/a: the peer has no such method |" in text
    ratio = next(line for line in text.splitlines() if line.startswith(f"| {CAND} | ") and "fold" not in line
                 and "train" not in line and "peer" not in line)
    assert re.search(r"\| n/a \| n/a \| n/a \|$", ratio)  # no peer: no train / peer ratio
    expected = summary["process_s"] / result["candidates"][CAND]["train"]["process_s"]
    assert float(ratio.split("|")[2]) == pytest.approx(expected, abs=0.006)
    assert "fold 1 of 5: 80 training images" in text and "120 steps" in text  # auto's full schedule on this fold


def test_peer_targets_follow_the_candidate(fold_cost) -> None:
    from visiontune.config import load_config

    rx = fold_cost.last_blocks_regex("last:4", 12)
    assert re.fullmatch(rx, "blocks.8.attn.qkv") and re.fullmatch(rx, "blocks.11.mlp.fc2")
    assert not re.fullmatch(rx, "blocks.7.attn.qkv") and not re.fullmatch(rx, "blocks.1.attn.proj")

    def cfg(*o):
        return load_config(None, ["data.dataset=digits", *o])

    assert fold_cost.peer_method(cfg("method.name=lora", "method.targets=qv"), 12) == {"method": "lora", "target": "qkv"}
    last = fold_cost.peer_method(cfg("method.name=lora", "method.targets=all-linear", "method.blocks=last:4"), 12)
    assert last["target"] == "all" and last["target_regex"] == rx
    assert fold_cost.peer_method(cfg("method.name=dora", "method.targets=all-linear"), 12) == {"method": "dora", "target": "all"}
    assert fold_cost.peer_method(cfg("method.name=mona"), 12) == {"method": "mona"}
    assert fold_cost.peer_method(cfg("method.name=prototype"), 12) is None


def test_script_end_to_end_in_a_fresh_process(fold_cost, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert fold_cost.main(["--epochs", "2", "--contenders", "fold", "--candidates", CAND, "--data", "digits",
                           "--out", str(out), *TINY]) == 0
    result = json.loads((out / "results.json").read_text())
    run = result["candidates"][CAND]["runs"]["fold"][0]
    assert run["process_s"] >= run["imports_s"] + run["in_process_s"]
    assert run["steps"] == 2 * 5 and "load_before" in run and "load_after" in run
    assert (out / "results.md").read_text().count(f"| {CAND} | fold") == 1
