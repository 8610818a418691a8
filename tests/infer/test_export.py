"""ONNX export: onnxruntime matches PyTorch on real images at any batch size, and the metadata is truthful."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

import visiontune as vt
from visiontune.cli import main
from visiontune.errors import ConfigError
from visiontune.infer.export import export_run

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev/onnx extras")
import onnx  # noqa: E402

HAS_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None


def _apply_metadata_preprocessing(img: Image.Image, steps: list[dict]) -> np.ndarray:
    """Preprocess with PIL + numpy from the JSON alone, as a consumer without visiontune would."""
    arr = None
    for s in steps:
        if s["op"] == "to_rgb":
            img = img.convert("RGB")
        elif s["op"] == "resize_shorter_side":
            w, h = img.size
            scale = s["size"] / min(w, h)
            size = (round(w * scale), round(h * scale)) if w != h else (s["size"], s["size"])
            img = img.resize(size, {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[s["interpolation"]])
        elif s["op"] == "center_crop":
            ch, cw = s["size"]
            left, top = round((img.width - cw) / 2), round((img.height - ch) / 2)
            img = img.crop((left, top, left + cw, top + ch))
        elif s["op"] == "to_float_chw":
            arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        elif s["op"] == "normalize":
            arr = (arr - np.array(s["mean"], np.float32)[:, None, None]) / np.array(s["std"], np.float32)[:, None, None]
        else:
            raise AssertionError(f"unexpected step {s}")
    return arr


def _check(result_path: Path, run_dir: Path, runs_helper: ModuleType, labels: dict) -> None:
    meta = json.loads(result_path.with_suffix(".json").read_text())
    predict = vt.pipeline(str(run_dir))
    assert meta["classes"] == predict.classes and meta["input"]["shape"] == ["batch", 3, 32, 32]
    session = ort.InferenceSession(str(result_path), providers=["CPUExecutionProvider"])
    images = [runs_helper.noisy_image(rgb, seed=i, size=40 + 3 * i) for i, rgb in enumerate(labels.values())]
    # Preprocessing from the metadata alone reproduces the run's transform.
    x_meta = np.stack([_apply_metadata_preprocessing(im, meta["preprocessing"]["steps"]) for im in images])
    x = torch.stack([predict.preprocess(im) for im in images])
    assert np.allclose(x_meta, x.numpy(), atol=2e-2), np.abs(x_meta - x.numpy()).max()  # PIL vs torchvision rounding
    # Dynamic batch: 1 and len(images), neither the export's example batch of 2.
    with torch.inference_mode():
        ref = predict.model(x).numpy()
    for batch in (x[:1], x):
        got = session.run([meta["output"]["name"]], {meta["input"]["name"]: batch.numpy()})[0]
        scale = max(1.0, float(np.abs(ref).max()))
        assert np.allclose(got, ref[: len(batch)], rtol=1e-4, atol=1e-4 * scale), np.abs(got - ref[: len(batch)]).max()
    # Same labels as PyTorch, and the right ones for clean images.
    got = session.run(None, {"pixel_values": x.numpy()})[0]
    assert [meta["classes"][i] for i in got.argmax(1)] == list(labels)
    props = {p.key: p.value for p in onnx.load(str(result_path)).metadata_props}
    assert json.loads(props["visiontune.classes"]) == predict.classes


def test_export_lora_run_merged_with_the_legacy_exporter_via_cli(
    adapter_runs: dict[str, Path], tmp_path: Path, runs_helper: ModuleType, capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "colors" / "model.onnx"
    assert main(["export", str(adapter_runs["colors"]), "--format", "onnx", "--out", str(out), "--exporter", "legacy"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == str(out) and printed["metadata"] == str(out.with_suffix(".json"))
    assert printed["merged"] is True and printed["exporter"] == "legacy" and printed["max_abs_diff_vs_pytorch"] < 1e-2
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["run"]["merged"] and meta["run"]["method"] == "lora" and meta["exporter"] == "legacy"
    # Merged means a plain graph: no LoRA weights left, q/k/v fused again as in timm.
    names = [i.name for i in onnx.load(str(out)).graph.initializer]
    assert not any("lora" in n for n in names) and any("qkv" in n for n in names), names[:20]
    _check(out, adapter_runs["colors"], runs_helper, runs_helper.COLORS)


@pytest.mark.skipif(not HAS_ONNXSCRIPT, reason="Mona exports only with torch's dynamo exporter, which needs onnxscript (onnx extra)")
def test_export_mona_run_unmerged_with_auto_exporter(adapter_runs: dict[str, Path], tmp_path: Path, runs_helper: ModuleType) -> None:
    res = export_run(adapter_runs["tone"], out=tmp_path / "tone.onnx")
    assert not res.merged and res.exporter == "dynamo" and res.max_abs_diff is not None and res.max_abs_diff < 1e-4
    _check(res.model_path, adapter_runs["tone"], runs_helper, runs_helper.TONES)
    # The legacy tracer cannot do it: asking for it alone gives an error naming the exporter and the cause.
    with pytest.raises(ConfigError, match=r"ONNX export failed:\n  - legacy exporter: .*convolution"):
        export_run(adapter_runs["tone"], out=tmp_path / "legacy.onnx", exporter="legacy")


def test_export_errors(adapter_runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="should end in .onnx"):
        export_run(adapter_runs["tone"], out=tmp_path / "model.bin")
    with pytest.raises(ConfigError, match="export format 'tflite' is not supported"):
        export_run(adapter_runs["tone"], fmt="tflite")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="exporter='jit' is invalid"):
        export_run(adapter_runs["tone"], out=tmp_path / "m.onnx", exporter="jit")
