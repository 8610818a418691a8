"""ONNX Runtime as a backend of predict / eval, INT8 export with its accuracy guard, and the errors around them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import visiontune as vt
from visiontune.cli import main
from visiontune.errors import ConfigError
from visiontune.infer.backends import find_export, load_export, resolve_backend

pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev/onnx extras")


def _images(runs_helper: ModuleType, colors: dict) -> list:
    return [runs_helper.noisy_image(rgb, seed=70 + i, size=30 + 4 * i) for i, rgb in enumerate(colors.values()) for _ in range(2)]


def test_export_metadata_records_backend_precision_accuracy_and_machine(exported_runs: dict[str, Path]) -> None:
    folder = exported_runs["colors"] / "export"
    fp32, int8 = (json.loads((folder / n).read_text()) for n in ("model.json", "model.int8.json"))
    assert (fp32["backend"], fp32["precision"], int8["precision"]) == ("onnxruntime", "fp32", "int8")
    assert fp32["model"] == "model.onnx" and int8["model"] == "model.int8.onnx" and int8["classes"] == fp32["classes"]
    assert len(fp32["run"]["adapter_sha256"]) == 64 and fp32["backbone"]["name"] == "test_vit"
    assert {"cpu", "isa", "vnni", "onnxruntime"} <= set(int8["machine"])
    acc = int8["accuracy"]
    assert acc["split"] == "test" and acc["images"] == json.loads((exported_runs["colors"] / "metrics.json").read_text())["test"]["num_samples"]
    assert acc["pytorch"]["accuracy"] == acc["onnx_fp32"]["accuracy"] and acc["onnx_fp32"]["top1_agreement"] == 1.0
    assert acc["accepted"] is True and acc["max_drop_points"] == 1.0 and "onnx_int8" not in fp32["accuracy"]
    q = int8["quantization"]
    assert q["format"] == "QDQ" and q["quantized_ops"]["MatMul"] == 8 and q["quantized_ops"]["Conv"] == 1  # 2 blocks x qkv/proj/fc1/fc2
    # Attention's activation x activation products and the 3-class head stay fp32; every candidate strength was tried.
    assert sum("activation x activation" in k for k in q["kept_fp32"]) == 4 and "head (small)" in q["kept_fp32"]
    assert [c["smoothquant_alpha"] for c in q["smoothquant"]["tried"]] == [0.0, 0.5, 0.8]
    assert 1 <= q["calibration"]["images"] <= 128


def test_fp32_export_predicts_like_pytorch_and_int8_agrees(exported_runs: dict[str, Path], runs_helper: ModuleType) -> None:
    """export -> load -> predict: fp32 equals PyTorch (tolerance) through every way of naming the export."""
    run = exported_runs["colors"]
    images = _images(runs_helper, runs_helper.COLORS)
    ref = vt.pipeline(str(run), top_k=3)(images)
    for path, backend in ((run, "onnxruntime"), (run / "export", None), (run / "export" / "model.onnx", None),
                          (run / "export" / "model.json", "onnxruntime")):
        pred = vt.pipeline(str(path), top_k=3, backend=backend)
        assert pred.info["backend"] == "onnxruntime" and pred.info["precision"] == "fp32" and pred.merged
        got = pred(images)
        assert [[p["label"] for p in g] for g in got] == [[p["label"] for p in r] for r in ref]
        assert np.allclose([[p["score"] for p in g] for g in got], [[p["score"] for p in r] for r in ref], atol=1e-5)
    int8 = vt.pipeline(str(run), int8=True, top_k=1)
    assert int8.info["precision"] == "int8" and int8.model.path.name == "model.int8.onnx"
    assert [g[0]["label"] for g in int8(images)] == [r[0]["label"] for r in ref] == [c for c in runs_helper.COLORS for _ in (0, 1)]
    # Same batching and per-item errors as the torch predictor.
    results = list(int8.predict_many([images[0], b"", images[1]], top_k=1))
    assert [r.error is None for r in results] == [True, False, True] and "0 bytes" in results[1].error


def test_eval_and_predict_cli_with_onnxruntime(exported_runs: dict[str, Path], tmp_path: Path, runs_helper: ModuleType,
                                               capsys: pytest.CaptureFixture) -> None:
    run = exported_runs["tone"]  # Mona: nothing merged, exported by torch's dynamo exporter
    torch_m = vt.evaluate(str(run))
    for kwargs in ({"backend": "onnxruntime"}, {"int8": True}):
        m = vt.evaluate(str(run), **kwargs)
        assert m["backend"] == "onnxruntime" and m["accuracy"] == torch_m["accuracy"] and m["num_samples"] == torch_m["num_samples"]
    assert torch_m["backend"] == "torch" and torch_m["precision"] == "fp32"
    assert main(["eval", str(run / "export" / "model.int8.onnx"), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "int8"
    dark = tmp_path / "dark.png"
    runs_helper.noisy_image(runs_helper.TONES["dark"], seed=5).save(dark)
    outs = []
    for extra in ([], ["--backend", "onnxruntime"], ["--backend", "onnxruntime", "--int8"]):
        assert main(["predict", str(run), str(dark), "--format", "json", "--top-k", "2", *extra]) == 0
        outs.append(json.loads(capsys.readouterr().out)[0]["predictions"])
    assert [p["label"] for p in outs[0]] == [p["label"] for p in outs[1]] == [p["label"] for p in outs[2]] == ["dark", "light"]
    assert abs(outs[0][0]["score"] - outs[1][0]["score"]) < 1e-5
    # An export moved away from its run: predict works from the folder alone, eval needs --data for its labels.
    moved = tmp_path / "moved"
    shutil.copytree(run / "export", moved)
    meta = json.loads((moved / "model.json").read_text())
    meta["run"]["run_dir"] = str(tmp_path / "gone")
    (moved / "model.json").write_text(json.dumps(meta))
    assert vt.pipeline(str(moved))(dark)[0]["label"] == "dark"
    with pytest.raises(ConfigError, match="pass --data"):
        vt.evaluate(str(moved))
    assert vt.evaluate(str(moved), data=str(exported_runs["tone"].parent.parent / "data" / "tones"))["accuracy"] == 1.0


def test_backend_errors_name_the_fix(exported_runs: dict[str, Path], adapter_runs: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    run = exported_runs["colors"]
    for args in (["predict", str(run), "x.png", "--backend", "openvino"], ["eval", str(run), "--backend", "openvino"]):
        assert main(args) == 2  # another backend's export is not there: the command that makes it is named
        assert "has no fp32 OpenVINO export" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--int8 runs an INT8 export and needs a backend that has one \(onnxruntime"):
        resolve_backend("torch", run, int8=True)
    with pytest.raises(ConfigError, match="is an ONNX export, which the torch backend cannot run; use --backend onnxruntime"):
        resolve_backend("torch", run / "export")
    with pytest.raises(ConfigError, match="--backend='tensorrt' is not a known inference backend"):
        resolve_backend("tensorrt", run)
    with pytest.raises(ConfigError, match="runs on the CPU here"):
        vt.pipeline(str(run), backend="onnxruntime", device="cuda")
    with pytest.raises(ConfigError, match=r"has no INT8 ONNX export .* make it with: visiontune export .* --int8"):
        find_export(adapter_runs["big"], int8=True)
    with pytest.raises(ConfigError, match="is a fp32 export, not INT8"):
        find_export(run / "export" / "model.onnx", int8=True)
    with pytest.raises(ConfigError, match="does not exist"):
        find_export(tmp_path / "nothing.onnx")
    # A retrained run (another adapter file) refuses its old export instead of answering with the old weights.
    copy = tmp_path / "colors"
    shutil.copytree(run, copy)
    from safetensors.torch import load_file, save_file

    state = load_file(str(copy / "adapter.safetensors"))
    save_file({k: v + 1e-3 for k, v in state.items()}, str(copy / "adapter.safetensors"))
    with pytest.raises(ConfigError, match=r"made from an older adapter.safetensors .* re-export with: visiontune export"):
        load_export(copy)
    assert load_export(copy / "export").classes == ["blue", "green", "red"]  # the folder itself is self-contained


def test_int8_guard_refuses_or_warns_with_the_numbers(adapter_runs: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """More than --max-drop lost: refused (INT8 file removed, fp32 kept) or, with warn_only, kept and flagged."""
    import visiontune.infer.export as ex

    real = ex.compare_on_test

    def worse(*args, **kwargs):  # the measured INT8 numbers, 2.5 accuracy points and 3 F1 points lower
        out = real(*args, **kwargs)
        out["onnx_int8"].update(accuracy=out["pytorch"]["accuracy"] - 0.025, f1_weighted=out["pytorch"]["f1_weighted"] - 0.03)
        return out

    monkeypatch.setattr(ex, "compare_on_test", worse)
    out = tmp_path / "m.onnx"
    with pytest.raises(ConfigError, match=r"refusing the INT8 model: .*\(-2\.50 points\).*\(-3\.00 points\).*more than the "
                                          r"allowed 1 points .* fp32 export is kept"):
        ex.export_run(adapter_runs["colors"], out=out, int8=True, exporter="legacy", smoothing=0.5, calibration=4)
    assert out.is_file() and not (tmp_path / "m.int8.onnx").exists()
    res = ex.export_run(adapter_runs["colors"], out=out, int8=True, exporter="legacy", smoothing=0.5, max_drop=5)
    assert res.int8_accepted is True and res.warning is None
    with pytest.warns(UserWarning, match=r"visiontune export: INT8 vs PyTorch .* more than the allowed 1 points"):
        res = ex.export_run(adapter_runs["colors"], out=out, int8=True, exporter="legacy", smoothing=0.5, warn_only=True)
    meta = json.loads(res.int8_metadata_path.read_text())
    assert res.int8_accepted is False and meta["accuracy"]["accepted"] is False and res.int8_path.is_file()
    q = meta["quantization"]
    assert q["calibration"]["images"] == 12 and [c["smoothquant_alpha"] for c in q["smoothquant"]["tried"]] == [0.5]
    for bad, match in (({"calibration": 0}, "calibration=0 is invalid"), ({"max_drop": -1}, "max_drop=-1 is invalid"),
                       ({"keep_fp32": ["head"]}, "add --int8"), ({"int8": True, "smoothing": 1.0}, r"smoothing=1.0 is invalid"),
                       ({"int8": True, "keep_fp32": ["a b"]}, "keep-fp32 pattern 'a b' is invalid")):
        with pytest.raises(ConfigError, match=match):
            ex.export_run(adapter_runs["colors"], out=out, exporter="legacy", **bad)


def test_keep_fp32_patterns_reach_the_quantizer(adapter_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "k.onnx"
    assert main(["export", str(adapter_runs["colors"]), "--out", str(out), "--exporter", "legacy", "--int8", "--keep-fp32",
                 "*.mlp.fc2,blocks.0.*", "--smoothing", "0", "--calibration", "6"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["int8_accepted"] is True and printed["test"]["onnx_int8"]["top1_agreement"] == 1.0
    q = json.loads(Path(printed["int8_metadata"]).read_text())["quantization"]
    assert q["quantized_ops"] == {"Conv": 1, "MatMul": 3}  # block 1's qkv, proj, fc1 + the patch embedding
    assert "blocks.1.mlp.fc2 (keep-fp32)" in q["kept_fp32"] and "blocks.0.attn.qkv (keep-fp32)" in q["kept_fp32"]
    assert q["calibration"]["images"] == 6 and q["keep_fp32_patterns"] == ["*.mlp.fc2", "blocks.0.*"]


@pytest.mark.slow
def test_real_dinov2_export_fp32_equals_and_int8_agrees(tmp_path: Path, runs_helper: ModuleType) -> None:
    """On the real converted DINOv2-S (112 px): fp32 ONNX equals PyTorch, INT8 agrees on >= 95 % of top-1 labels."""
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (onnx extra)")
    from visiontune.infer.export import export_run

    run_dir = runs_helper.real_dinov2_linear_run(tmp_path)
    res = export_run(run_dir, int8=True, smoothing=0.5, calibration=16, exporter="legacy")
    acc = res.accuracy
    assert acc["images"] == 40 and acc["onnx_fp32"]["top1_agreement"] == 1.0 and acc["onnx_fp32"]["logit_max_abs_diff"] < 1e-3
    assert acc["onnx_int8"]["top1_agreement"] >= 0.95 and res.int8_accepted
    images = [runs_helper.noisy_image(rgb, seed=900 + i, size=48) for i, rgb in enumerate(runs_helper.REAL_PALETTE.values()) for _ in range(3)]
    ref = vt.pipeline(str(run_dir), top_k=2)(images)
    fp32 = vt.pipeline(str(run_dir), top_k=2, backend="onnxruntime")(images)
    int8 = vt.pipeline(str(run_dir), top_k=1, int8=True)(images)
    for r, f in zip(ref, fp32):
        assert [p["label"] for p in r] == [p["label"] for p in f]
        assert np.allclose([p["score"] for p in r], [p["score"] for p in f], atol=1e-4)
    assert np.mean([r[0]["label"] == q[0]["label"] for r, q in zip(ref, int8)]) >= 0.95
    assert torch.get_num_threads() >= 1
