"""The predictor: input kinds, top-k semantics, merged fast path, and agreement with evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

import visiontune as vt
from visiontune.errors import ConfigError, DataError
from visiontune.infer import Predictor
from visiontune.methods.lora import lora_layers


def test_input_kinds_give_the_same_answer_and_the_right_label(adapter_runs: dict[str, Path], tmp_path: Path, runs_helper: ModuleType) -> None:
    predict = vt.pipeline(str(adapter_runs["colors"]), top_k=2)
    red = runs_helper.noisy_image(runs_helper.COLORS["red"], seed=7)
    red.save(tmp_path / "red.png")
    arr = np.asarray(red)
    single = predict(red)
    assert [p["label"] for p in single][:1] == ["red"]  # a trained model, a known right answer
    assert len(single) == 2 and single[0]["score"] >= single[1]["score"]
    for item in (tmp_path / "red.png", str(tmp_path / "red.png"), arr, runs_helper.png_bytes(red)):
        got = predict(item)
        assert [p["label"] for p in got] == [p["label"] for p in single]
        assert np.allclose([p["score"] for p in got], [p["score"] for p in single], atol=1e-6), type(item)
    # Gray and RGBA inputs go through the same RGB conversion as training data.
    assert predict(red.convert("RGBA"))[0]["label"] == "red"
    # Batches: a list (mixed kinds) or an N x H x W x C array -> one list per image, input order kept.
    blue = np.asarray(runs_helper.noisy_image(runs_helper.COLORS["blue"], seed=8))
    batch = predict([red, blue, tmp_path / "red.png"])
    assert [b[0]["label"] for b in batch] == ["red", "blue", "red"]
    stacked = predict(np.stack([arr, blue]))
    assert [b[0]["label"] for b in stacked] == ["red", "blue"]
    assert np.isclose(stacked[0][0]["score"], single[0]["score"], atol=1e-5)


def test_top_k_clips_orders_and_scores_are_probabilities(adapter_runs: dict[str, Path], runs_helper: ModuleType) -> None:
    predict = vt.pipeline(str(adapter_runs["tone"]))  # 2 labels, default top_k=5 -> all of them
    out = predict(runs_helper.noisy_image(runs_helper.TONES["dark"], seed=3))
    assert [p["label"] for p in out][0] == "dark" and {p["label"] for p in out} == {"dark", "light"}
    assert np.isclose(sum(p["score"] for p in out), 1.0, atol=1e-5)
    assert len(predict(Image.new("RGB", (9, 9)), top_k=1)) == 1
    for bad in (0, -2, 1.5, "3", True):
        with pytest.raises(ConfigError, match=r"top_k=.* is invalid; use an integer >= 1"):
            predict(Image.new("RGB", (9, 9)), top_k=bad)


def test_merged_fast_path_matches_unmerged(adapter_runs: dict[str, Path], runs_helper: ModuleType) -> None:
    merged = vt.pipeline(str(adapter_runs["colors"]))
    plain = vt.pipeline(str(adapter_runs["colors"]), merge=False)
    assert merged.merged and not plain.merged and merged.info["method"] == "lora"
    # The merged model is a plain timm model: no peft layers left.
    assert not lora_layers(merged.model) and lora_layers(plain.model)
    x = torch.stack([merged.preprocess(runs_helper.noisy_image(c, seed=i)) for i, c in enumerate(runs_helper.COLORS.values())])
    assert torch.allclose(merged.probabilities(x), plain.probabilities(x), atol=1e-5)
    # Mona has nothing to fold: the predictor says so rather than pretending.
    assert not vt.pipeline(str(adapter_runs["tone"])).merged


def test_predictions_on_the_test_split_reproduce_the_runs_test_accuracy(adapter_runs: dict[str, Path], runs_helper: ModuleType) -> None:
    """Same preprocessing and weights as evaluation: the predictor's argmax gives the recorded accuracy."""
    from visiontune.data import load_records, make_splits

    run_dir = adapter_runs["colors"]
    run = vt.load(str(run_dir))
    test = make_splits(load_records(run.config.data.dataset), run.config.data)["test"]
    predict = vt.pipeline(str(run_dir), top_k=1, batch_size=5)
    preds = [p[0]["label"] for p in predict(list(test.items))]
    acc = float(np.mean([p == test.classes[y] for p, y in zip(preds, test.labels)]))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert acc == pytest.approx(metrics["test"]["accuracy"])
    assert len(preds) == metrics["test"]["num_samples"]


def test_bad_inputs_are_reported_per_item(adapter_runs: dict[str, Path], tmp_path: Path, runs_helper: ModuleType) -> None:
    predict = vt.pipeline(str(adapter_runs["colors"]), batch_size=2)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"broken\.png"):
        predict(tmp_path / "broken.png")
    with pytest.raises(DataError, match="not an image PIL can decode"):
        predict(b"GIF89a-truncated-garbage")
    with pytest.raises(DataError, match="shape"):
        predict(np.zeros((2, 3, 4, 5, 6), dtype=np.uint8)[0])  # a 4-d array is a batch; its items are 4-d: not images
    with pytest.raises(TypeError, match="cannot predict on a int"):
        predict(3)
    # predict_many: the bad ones get an error, the others their predictions, in input order.
    red = runs_helper.noisy_image(runs_helper.COLORS["red"], seed=1)
    red.save(tmp_path / "red.png")
    items = [tmp_path / "red.png", tmp_path / "broken.png", tmp_path / "missing.jpg", red, b"", tmp_path / "red.png"]
    results = list(predict.predict_many(items, top_k=1))
    assert [r.error is None for r in results] == [True, False, False, True, False, True]
    assert [r.predictions[0]["label"] for r in results if r.error is None] == ["red"] * 3
    assert "does not exist" in results[2].error and "0 bytes" in results[4].error
    assert results[0].source == str(tmp_path / "red.png") and results[3].source == "<Image #3>"


def test_predictor_checks_its_settings(adapter_runs: dict[str, Path], tmp_path: Path, runs_helper: ModuleType) -> None:
    with pytest.raises(ConfigError, match="not a visiontune run directory"):
        vt.pipeline(str(tmp_path))
    with pytest.raises(ConfigError, match="batch_size=0"):
        vt.pipeline(str(adapter_runs["colors"]), batch_size=0)
    p = Predictor.from_run(adapter_runs["tone"], top_k=1)
    assert p.input_size == (3, 32, 32) and p.classes == ["dark", "light"]


def test_bf16_precision_predicts_like_fp32_and_says_so(adapter_runs: dict[str, Path], runs_helper: ModuleType,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``precision="bf16"``: bf16 autocast whatever the run trained in; the same labels, near-equal scores."""
    import warnings

    from visiontune.infer.evaluate import evaluate_run

    fp32 = vt.pipeline(str(adapter_runs["colors"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU without native bf16 warns that it is emulated (checked below)
        bf16 = vt.pipeline(str(adapter_runs["colors"]), precision="bf16")
        m16 = evaluate_run(str(adapter_runs["colors"]), progress=False, precision="bf16")
    assert fp32.amp is None and fp32.info["precision"] == "fp32"
    assert bf16.amp is torch.bfloat16 and bf16.info["precision"] == "bf16"
    x = torch.stack([fp32.preprocess(runs_helper.noisy_image(c, seed=i)) for i, c in enumerate(runs_helper.COLORS.values())])
    p32, p16 = fp32.probabilities(x), bf16.probabilities(x)
    assert p16.dtype == torch.float32 and torch.equal(p32.argmax(1), p16.argmax(1))
    assert torch.allclose(p32, p16, atol=0.05) and not torch.equal(p32, p16)  # bf16 did run: not bit-equal
    m32 = evaluate_run(str(adapter_runs["colors"]), progress=False, precision="fp32")
    assert m16["precision"] == "bfloat16" and m32["precision"] == "fp32"
    assert m16["accuracy"] == pytest.approx(m32["accuracy"], abs=0.05)
    # A CPU that would emulate bf16 is told so; an export computes in its own precision.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16 .* use --precision fp32"):
        vt.pipeline(str(adapter_runs["colors"]), precision="bf16")
    with pytest.raises(ConfigError, match="--precision bf16 applies to the torch backend"):
        vt.pipeline(str(adapter_runs["colors"]), backend="onnxruntime", precision="bf16")
    with pytest.raises(ConfigError, match="--precision bf16 applies to the torch backend"):
        evaluate_run(str(adapter_runs["colors"]), backend="onnxruntime", precision="bf16")
    with pytest.raises(ConfigError, match="precision 'fp16' is invalid; use one of run, fp32, bf16"):
        vt.pipeline(str(adapter_runs["colors"]), precision="fp16")
