"""The OpenVINO backend, added as one plug-in module: export fp32 / INT8 (NNCF) behind the same accuracy guard as
ONNX, predict and eval on it, the registry it joined, and the errors around it."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import visiontune as vt
from visiontune.cli import build_parser, main
from visiontune.errors import ConfigError
from visiontune.infer.backends import all_backends, export_backend, get_backend, resolve_backend
from visiontune.registry import INFERENCE_BACKENDS, INFERENCE_PLUGINS


def test_the_plugin_list_names_what_each_module_registers() -> None:
    """INFERENCE_PLUGINS (read by the command line without importing torch) equals the registry it fills."""
    assert [b.name for b in all_backends()] == [name for name, _, _ in INFERENCE_PLUGINS] == list(INFERENCE_BACKENDS.names())
    for name, fmt, module in INFERENCE_PLUGINS:
        backend = get_backend(name)
        assert backend.format == fmt and type(backend).__module__ == module
        if fmt:
            assert export_backend(fmt) is backend
    choices = {a.dest: a.choices for a in build_parser()._subparsers._group_actions[0].choices["predict"]._actions}
    assert choices["backend"] == ["auto", *(n for n, _, _ in INFERENCE_PLUGINS)]
    with pytest.raises(ValueError, match="already registered"):
        INFERENCE_BACKENDS.register("openvino", object())
    with pytest.raises(ConfigError, match="'tensorrt' is not a known inference backend"):
        resolve_backend("tensorrt", ".")
    with pytest.raises(ConfigError, match="export format 'tflite' is not supported; use one of onnx, openvino"):
        export_backend("tflite")


pytest.importorskip("openvino", reason="openvino is in the dev/openvino extras")
pytest.importorskip("nncf", reason="nncf is in the dev/openvino extras")


@pytest.fixture(scope="module")
def ov_run(adapter_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the ``colors`` LoRA run with fp32 + INT8 OpenVINO exports in its ``export/``."""
    from visiontune.infer.export import export_run

    run = tmp_path_factory.mktemp("ov") / "colors"
    shutil.copytree(adapter_runs["colors"], run, ignore=shutil.ignore_patterns("export"))
    export_run(run, fmt="openvino", int8=True, calibration=16)
    return run


def _images(runs_helper: ModuleType) -> list:
    return [runs_helper.noisy_image(rgb, seed=70 + i, size=30 + 4 * i) for i, rgb in enumerate(runs_helper.COLORS.values())
            for _ in range(2)]


def test_export_writes_ir_pairs_with_metadata_and_the_int8_guard(ov_run: Path) -> None:
    folder = ov_run / "export"
    for stem in ("openvino_model", "openvino_model.int8"):
        assert all((folder / f"{stem}{s}").is_file() for s in (".xml", ".bin", ".json"))
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # nothing staged is left
    fp32, int8 = (json.loads((folder / n).read_text()) for n in ("openvino_model.json", "openvino_model.int8.json"))
    assert (fp32["format"], fp32["backend"], fp32["precision"], int8["precision"]) == (
        "visiontune-openvino/1", "openvino", "fp32", "int8")
    assert fp32["exporter"] == "openvino.convert_model" and fp32["parity_max_abs_diff"] < 1e-4
    acc = int8["accuracy"]
    assert acc["openvino_fp32"]["top1_agreement"] == 1.0 and acc["openvino_fp32"]["logit_max_abs_diff"] < 1e-4
    assert acc["accepted"] is True and acc["max_drop_points"] == 1.0 and "openvino_int8" not in fp32["accuracy"]
    q = int8["quantization"]
    assert q["method"].startswith("nncf.quantize") and q["fake_quantize_ops"] > 0 and q["calibration"]["images"] <= 16
    assert q["model_type"].startswith("transformer")  # a ViT: attention found
    assert {"cpu", "isa", "openvino"} <= set(int8["machine"])


def test_predict_and_eval_on_openvino_agree_with_pytorch(ov_run: Path, runs_helper: ModuleType, capsys) -> None:
    images = _images(runs_helper)
    ref = vt.pipeline(str(ov_run), top_k=3)(images)
    folder = ov_run / "export"
    for path, backend in ((ov_run, "openvino"), (folder / "openvino_model.xml", None), (folder / "openvino_model.json", None)):
        pred = vt.pipeline(str(path), top_k=3, backend=backend)
        assert pred.info["backend"] == "openvino" and pred.info["precision"] == "fp32"
        got = pred(images)
        assert [[p["label"] for p in g] for g in got] == [[p["label"] for p in r] for r in ref]
        assert np.allclose([[p["score"] for p in g] for g in got], [[p["score"] for p in r] for r in ref], atol=1e-5)
    int8 = vt.pipeline(str(ov_run), backend="openvino", int8=True, top_k=1)
    assert int8.info["precision"] == "int8" and int8.model.path.name == "openvino_model.int8.xml"
    assert [g[0]["label"] for g in int8(images)] == [r[0]["label"] for r in ref]
    torch_m = vt.evaluate(str(ov_run))
    for kwargs in ({"backend": "openvino"}, {"backend": "openvino", "int8": True}):
        m = vt.evaluate(str(ov_run), **kwargs)
        assert m["backend"] == "openvino" and m["num_samples"] == torch_m["num_samples"]
        assert abs(m["accuracy"] - torch_m["accuracy"]) * 100 <= 1.0  # the export's guard
    assert main(["eval", str(folder / "openvino_model.int8.xml"), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)[
        "precision"] == "int8"


def test_openvino_errors_name_the_fix(ov_run: Path, adapter_runs: dict[str, Path], monkeypatch, capsys) -> None:
    assert main(["export", str(ov_run), "--format", "openvino", "--int8", "--keep-fp32", "head"]) == 2
    assert "--keep-fp32 does not apply to --format openvino" in capsys.readouterr().err
    assert main(["export", str(ov_run), "--format", "openvino", "--opset", "17"]) == 2
    assert "--opset does not apply to --format openvino" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"has no INT8 OpenVINO export .* visiontune export .* --format openvino --int8"):
        vt.pipeline(str(adapter_runs["big"]), backend="openvino", int8=True)
    with pytest.raises(ConfigError, match="is an OpenVINO export, which the onnxruntime backend cannot run"):
        resolve_backend("onnxruntime", ov_run / "export" / "openvino_model.xml")
    with pytest.raises(ConfigError, match="is an OpenVINO export, which the torch backend cannot run; use --backend openvino"):
        resolve_backend("torch", ov_run / "export" / "openvino_model.json")
    with pytest.raises(ConfigError, match="runs on the CPU here"):
        vt.pipeline(str(ov_run), backend="openvino", device="cuda")
    # Without the extra: one line naming the extra that installs it.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("openvino", "nncf") else real(name, *a))
    for args in (["predict", str(ov_run), "x.png", "--backend", "openvino"], ["export", str(ov_run), "--format", "openvino"]):
        assert main(args) == 2
        assert "pip install 'visiontune[openvino]'" in capsys.readouterr().err


@pytest.mark.slow
def test_real_dinov2_openvino_fp32_equals_and_int8_passes_the_guard(tmp_path: Path, runs_helper: ModuleType) -> None:
    """On the real converted DINOv2-S (112 px): OpenVINO fp32 logits equal PyTorch's, INT8 passes the accuracy guard."""
    from visiontune.infer.export import export_run

    run_dir = runs_helper.real_dinov2_linear_run(tmp_path)
    res = export_run(run_dir, fmt="openvino", int8=True, calibration=16)
    acc = res.accuracy
    assert acc["images"] == 40 and acc["openvino_fp32"]["top1_agreement"] == 1.0
    assert acc["openvino_fp32"]["logit_max_abs_diff"] < 1e-3 and res.max_abs_diff < 1e-3
    assert res.int8_accepted and acc["openvino_int8"]["top1_agreement"] >= 0.95
    images = [runs_helper.noisy_image(rgb, seed=900 + i, size=48) for i, rgb in enumerate(runs_helper.REAL_PALETTE.values()) for _ in range(3)]
    ref = vt.pipeline(str(run_dir), top_k=2)(images)
    fp32 = vt.pipeline(str(run_dir), top_k=2, backend="openvino")(images)
    assert [[p["label"] for p in g] for g in fp32] == [[p["label"] for p in r] for r in ref]
    assert np.allclose([[p["score"] for p in g] for g in fp32], [[p["score"] for p in r] for r in ref], atol=1e-4)
    m = vt.evaluate(str(run_dir), backend="openvino", int8=True)
    assert m["backend"] == "openvino" and m["precision"] == "int8"
    assert abs(m["accuracy"] - vt.evaluate(str(run_dir))["accuracy"]) * 100 <= 1.0
