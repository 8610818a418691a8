"""``visiontune estimate`` (issue 19 part 4): the meta-device count equals what autograd really saves, and the
estimate is within 15 % of the peak that real CPU training runs measure (metrics.json peak_memory_delta_mb)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import visiontune as vt
from visiontune.cli import main
from visiontune.errors import ConfigError
from visiontune.estimate import _blocks_of, _trace, estimate_memory, parse_size

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _cfg(*overrides: str):
    return vt.load_config(None, overrides=["data.dataset=digits", "backbone.weights=none", *overrides])


@pytest.mark.parametrize("backbone,method", [("test_vit", "lora"), ("test_vit_reg", "mona"), ("test_vit", "full"),
                                             ("test_vit_reg", "dora")])
def test_meta_count_is_what_autograd_saves_on_real_tensors(backbone, method):
    """The estimate's activation count, done on meta tensors, equals the same count on a real CPU model."""
    from visiontune.backbones import create_meta_backbone
    from visiontune.registry import METHODS
    from visiontune.runs import build_model
    from visiontune.train.speed import fast_forward

    cfg = _cfg(f"backbone.name={backbone}", "backbone.img_size=32", f"method.name={method}")
    real = build_model(cfg, METHODS.get(method)(cfg.method), 10).train()
    meta = create_meta_backbone(cfg.backbone, 10)
    METHODS.get(method)(cfg.method).apply_on_meta(meta)
    meta.train()
    counts = []
    for model, device in ((real, "cpu"), (meta, "meta")):
        x = torch.randn(3, 3, 32, 32, device=device)
        counts.append(_trace(model, fast_forward(model, check=False), x, _blocks_of(model)))
    assert counts[0].activations == counts[1].activations and sum(counts[0].activations.values()) > 0
    assert counts[0].norm_inputs == counts[1].norm_inputs


@pytest.mark.parametrize("backbone,method", [("test_vit", "lora"), ("test_vit_reg", "full"), ("test_vit_reg", "mona")])
def test_bf16_count_matches_real_cpu_autocast(backbone, method):
    """Autocast cannot run on the meta device, so under bf16 the estimate counts saved values at 2 bytes (LayerNorm
    inputs at 4) and adds bf16 copies of the saved weights; real CPU autocast saves within 10 % of that."""
    from visiontune.estimate import Calibration
    from visiontune.registry import METHODS
    from visiontune.runs import build_model
    from visiontune.train.speed import fast_forward

    cfg = _cfg(f"backbone.name={backbone}", "backbone.img_size=32", f"method.name={method}", "optim.precision=bf16",
               "optim.batch_size=8")
    model = build_model(cfg, METHODS.get(method)(cfg.method), 10).train()
    x = torch.randn(8, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = sum(_trace(model, fast_forward(model), x, _blocks_of(model)).activations.values())  # copies included
    est = estimate_memory(cfg, device="cpu", calibration=Calibration(1.0, 0.0, True, "saved tensors only"))
    assert est.precision == "bf16" and est.weight_copies > 0
    assert est.activations - x.numel() * 4 + est.weight_copies == pytest.approx(real, rel=0.10)


def _train_subprocess(tmp_path: Path, name: str, overrides: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "visiontune.cli", "train", *overrides, f"run.dir={tmp_path}",
                             f"run.name={name}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


MEASURED = [
    "data.dataset=digits", "data.train_per_class=5", "data.test_per_class=2", "backbone.name=vit_small_patch16_224",
    "backbone.weights=none", "backbone.img_size=64", "optim.epochs=1", "optim.batch_size=16", "optim.head_init=zero",
    "run.progress=false", "run.measure_speed=false", "run.threads=2",
]


def test_estimate_within_15_percent_of_measured_cpu_peaks(tmp_path):
    """Two real training runs (ViT-S/16 at 64 px, batch 16: LoRA and full fine-tuning), each in a fresh process so
    that no earlier test's freed memory hides part of its peak; run side by side to halve the wait."""
    runs = {"lora": ["method.name=lora"], "full": ["method.name=full"]}
    procs = {name: _train_subprocess(tmp_path, name, MEASURED + ov) for name, ov in runs.items()}
    for proc in procs.values():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    for name, ov in runs.items():
        train = json.loads((tmp_path / name / "metrics.json").read_text())["train"]
        assert train["memory_kind"] == "cpu_rss_peak"
        measured = train["peak_memory_delta_mb"] * 2**20  # what training added to the loaded model's RSS
        est = estimate_memory(vt.load_config(None, overrides=MEASURED + ov), device="cpu")
        print(f"{name}: measured {measured / 2**20:.1f} MiB, estimate {est.training_added / 2**20:.1f} MiB")
        assert est.training_added == pytest.approx(measured, rel=0.15), (name, est.training_added / 2**20, measured / 2**20)


def test_cli_estimate_qlora_checkpointing_and_fit(capsys):
    base = ["estimate", "backbone.name=vit_base_patch16_dinov3", "method.name=qlora", "method.targets=all-linear",
            "method.rank=64", "backbone.grad_checkpointing=true", "optim.batch_size=8", "--device", "cuda"]
    assert main([*base, "--device-memory", "24GB"]) == 0
    text = capsys.readouterr().out
    assert "bf16 autocast · gradient checkpointing · cuda" in text and "4-bit (NF4)" in text
    assert "an estimate, not a measurement" in text and "fits" in text and "host RAM to build" in text
    assert main([*base, "--device-memory", "1GB"]) == 1 and "does NOT fit" in capsys.readouterr().out
    assert main([*base, "--device-memory", "24GB", "--json"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert q["linears_4bit"] == 12 * 6 and q["params_4bit"] > 0.95 * 85e6  # q, k, v, proj, fc1, fc2 per block
    # NF4 with double quantization: 0.5 byte + 1/64 + 4/(64*256) per weight; the rest fp32.
    rest = (q["params_total"] - q["params_4bit"]) * 4
    assert q["weights"] == pytest.approx(q["params_4bit"] * (0.5 + 1 / 64 + 4 / 64 / 256) + rest, rel=0.01)
    assert q["fits"] is True and q["device_memory"] == 24 * 2**30
    assert q["gradients"] == q["params_trainable"] * 4 and q["optimizer"] == 2 * q["gradients"]


def test_estimate_follows_precision_checkpointing_and_quantization():
    common = ["backbone.name=vit_small_patch16_dinov3", "backbone.img_size=64", "method.targets=all-linear", "optim.batch_size=8"]
    lora32 = estimate_memory(_cfg(*common, "method.name=lora", "optim.precision=fp32"), device="cuda", device_mem=8 * 2**30)
    lora16 = estimate_memory(_cfg(*common, "method.name=lora"), device="cuda", device_mem=8 * 2**30)
    ckpt = estimate_memory(_cfg(*common, "method.name=lora", "backbone.grad_checkpointing=true"), device="cuda", device_mem=8 * 2**30)
    qlora = estimate_memory(_cfg(*common, "method.name=qlora"), device="cuda", device_mem=8 * 2**30)
    assert lora16.precision == "bf16" and lora32.precision == "fp32"
    assert 0.5 < lora16.activations / lora32.activations < 0.75  # halved, but LayerNorm inputs stay fp32
    assert lora16.weight_copies > 0.4 * lora16.weights and lora32.weight_copies == 0  # bf16 copies of frozen weights
    assert ckpt.activations < 0.5 * lora16.activations and ckpt.weight_copies < lora16.weight_copies / 4
    assert qlora.weights < 0.3 * lora16.weights and qlora.weight_copies < 0.05 * lora16.weight_copies
    assert lora16.params_trainable == qlora.params_trainable


def test_parse_size():
    assert parse_size("24GB") == parse_size("24 GiB") == parse_size("24") == 24 * 2**30
    assert parse_size("512MB") == 512 * 2**20 and parse_size("1.5t") == 1.5 * 2**40
    with pytest.raises(ConfigError, match="--device-memory 'lots' is not a size; write e.g. 24GB"):
        parse_size("lots")
