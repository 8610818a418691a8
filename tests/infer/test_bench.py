"""`visiontune bench-infer`: every variant timed at each batch size (PyTorch merged / as trained, ONNX fp32 / INT8),
ratios over the baseline; the table and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visiontune.cli import main
from visiontune.errors import ConfigError
from visiontune.infer.bench import bench_infer, format_bench


def test_bench_merged_and_unmerged(adapter_runs: dict[str, Path]) -> None:
    rows = bench_infer(adapter_runs["colors"], batch_sizes=[1, 3], iters=2, warmup=0, backends=["torch"])
    assert [(r["variant"], r["batch"]) for r in rows] == [("merged", 1), ("merged", 3), ("unmerged", 1), ("unmerged", 3)]
    for r in rows:
        assert r["iters"] == 2 and r["forward_ms"] > 0 and r["predictor_ms"] > 0
        # With two passes the median is the mean: img/s = batch / (ms per batch).
        assert r["forward_img_s"] == pytest.approx(r["batch"] / (r["forward_ms"] / 1000), rel=1e-9)
        assert r["predictor_img_s"] == pytest.approx(r["batch"] / (r["predictor_ms"] / 1000), rel=1e-9)
    table = format_bench(rows)
    assert table.splitlines()[0].startswith("| model | batch | forward ms/batch")
    assert "| merged | 3 |" in table and "batch 1: merged forward" in table
    assert all(r["speedup"] == 1.0 for r in rows if r["variant"] == "unmerged")  # the baseline


@pytest.mark.filterwarnings("ignore:this CPU has no native bf16")
def test_bench_bf16_variant_is_the_fast_model_under_bf16_autocast(adapter_runs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    rows = bench_infer(adapter_runs["colors"], batch_sizes=[2], iters=1, warmup=0, backends=["torch"], bf16=True)
    assert [(r["variant"], r["precision"]) for r in rows] == [("merged", "fp32"), ("merged bf16", "bf16"), ("unmerged", "fp32")]
    assert "bf16 = the same PyTorch model under bf16 autocast" in format_bench(rows)
    # A method with nothing to merge: its one model, both ways; the baseline stays the fp32 one.
    assert main(["bench-infer", str(adapter_runs["tone"]), "--batch-sizes", "2", "--iters", "1", "--json", "--backends", "torch",
                 "--bf16"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["variant"], r["precision"]) for r in rows] == [("as trained", "fp32"), ("as trained bf16", "bf16")]
    assert rows[0]["speedup"] == 1.0


def test_bench_method_without_merge_and_cli(adapter_runs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert main(["bench-infer", str(adapter_runs["tone"]), "--batch-sizes", "2", "--iters", "1", "--json", "--backends", "torch"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["variant"], r["batch"]) for r in rows] == [("as trained", 2)]
    table = format_bench(rows)
    assert "| as trained | 2 |" in table and "nothing to merge" in table
    assert main(["bench-infer", str(adapter_runs["tone"]), "--batch-sizes", "1,x"]) == 2
    assert "--batch-sizes '1,x' is invalid" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"batch sizes \[0\] are invalid"):
        bench_infer(adapter_runs["tone"], batch_sizes=[0])


def test_bench_every_backend_side_by_side(exported_runs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """The run's fp32 and INT8 exports join the PyTorch variants, in alternating rounds, with ratios to the baseline."""
    assert main(["bench-infer", str(exported_runs["colors"]), "--batch-sizes", "1,2", "--iters", "1", "--rounds", "2"]) == 0
    table = capsys.readouterr().out
    for variant in ("merged", "unmerged", "onnxruntime fp32", "onnxruntime int8"):
        assert f"| {variant} | 1 |" in table and f"| {variant} | 2 |" in table, table
    assert "x baseline" in table and "medians over 2 alternating rounds" in table
    assert f"the run's exports in {exported_runs['colors'] / 'export'}" in table
    rows = bench_infer(exported_runs["colors"], batch_sizes=[1], iters=1, warmup=0, backends=["onnxruntime"])
    assert [(r["variant"], r["precision"]) for r in rows] == [("onnxruntime fp32", "fp32"), ("onnxruntime int8", "int8")]
    assert all(r["speedup"] is None for r in rows)  # no baseline timed: no ratio rather than a wrong one
    with pytest.raises(ConfigError, match="'tensorrt' is not a known inference backend"):
        bench_infer(exported_runs["colors"], backends=["tensorrt"])
