"""The DINOv3 cow study's grid on the real timm model classes, on both of bitsandbytes' CPU paths.

The study swept {QLoRA, DoRA} x targets {q, all-linear} x rank {8, 16, 64} against the linear probe, full
fine-tuning and from-scratch ResNet-18 / ViT-S. Tiny test models hid a crash that every real timm ViT hit
on CPUs with AVX-512 BF16 (bitsandbytes repacks 4-bit weights there after an eval pass, and its packed
path cannot train), so this grid runs the real classes: random init (no hub), one block per stage, a few
tokens, the real layer widths. Each cell: an eval pass (as the head initialisation does), one training
step, merged == unmerged, and save -> load -> the same predictions.

Both CPU kinds: bitsandbytes decides per layer, when the layer is built, whether the AVX-512 BF16 path
applies (``bitsandbytes.nn.modules.has_avx512bf16``). ``cpu_path`` runs cells once with the machine's own
answer and once with the opposite one, so an AVX2-only machine exercises the AVX-512 BF16 branch and an
AVX-512 machine the portable one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from visiontune.methods.lora import lora_layers
from visiontune.registry import METHODS

bnb = pytest.importorskip("bitsandbytes")

# Real architectures at toy sizes: the real layer widths (384, 768, 192, 96 ...), one block per stage.
ARCHS = {
    "vit_small_patch16_dinov3": dict(img_size=32, depth=1),
    "vit_small_patch16_dinov3_qkvb": dict(img_size=32, depth=1),
    "vit_small_patch14_reg4_dinov2": dict(img_size=28, depth=1),
    "vit_base_patch16_clip_224": dict(img_size=32, depth=1),
    "eva02_tiny_patch14_224": dict(img_size=28, depth=1),
    "swin_tiny_patch4_window7_224": dict(img_size=32, window_size=4, depths=(1, 1, 1, 1)),
    # The study's from-scratch baselines.
    "resnet18": dict(),
    "vit_small_patch16_224": dict(img_size=32, depth=1),
}
STUDY_CELLS = [(m, t, r) for m in ("qlora", "dora") for t in ("q", "all-linear") for r in (8, 16, 64)]
MERGE_TOL = 1e-4  # merged vs unmerged logits of a random 768-wide model: float32 summation order


@pytest.fixture(params=["native", "other"])
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Whether bitsandbytes believes the CPU has AVX-512 BF16 while layers are built (native or flipped)."""
    native = bool(bnb.functional.has_avx512bf16())
    flag = native if request.param == "native" else not native
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: flag)
    return flag


def _build(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, num_classes=3, **ARCHS[arch])


def _method(name: str, **kw: object):
    cls = METHODS.get(name)
    return cls(cls.config_cls(name=name, **kw))


def _x(arch: str, n: int = 2) -> torch.Tensor:
    s = ARCHS[arch].get("img_size", 32)
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(5))


def _check_cell(arch: str, method_name: str, tmp_path: Path, **method_kw: object) -> None:
    method = _method(method_name, **method_kw)
    model = method.apply(_build(arch))
    x, y = _x(arch), torch.tensor([0, 2])
    # An eval pass before training, as the probe-initialised head and validation epochs do: on AVX-512 BF16
    # CPUs this is what made bitsandbytes repack the 4-bit weights into its untrainable inference layout.
    with torch.no_grad():
        model.eval()(x)
    model.train()
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-2, head_lr=1e-2, weight_decay=0.0))
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(after, before)), "nothing trained"
    for m in model.modules():
        assert not getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)

    model.eval()
    with torch.no_grad():
        expected = model(x)
        merged = method.merge(model)(x)
    assert (merged - expected).abs().max().item() < MERGE_TOL
    if lora_layers(model):
        assert not lora_layers(method.merge(model))

    path = tmp_path / "trained.safetensors"
    save_file({k: v.contiguous() for k, v in method.trainable_state_dict(model).items()}, str(path))
    fresh_method = _method(method_name, **method_kw)
    fresh = fresh_method.apply(_build(arch))  # same seed: the same frozen backbone, as a run reloads it
    fresh_method.load_trainable_state_dict(fresh, load_file(str(path)))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)


@pytest.mark.parametrize("method_name, targets, rank", STUDY_CELLS)
@pytest.mark.parametrize("arch", list(ARCHS)[:6])
def test_study_grid_cell(arch: str, method_name: str, targets: str, rank: int, tmp_path: Path) -> None:
    _check_cell(arch, method_name, tmp_path, targets=[targets], rank=rank)


@pytest.mark.parametrize("method_name", ["qlora", "qdora"])
@pytest.mark.parametrize("targets", ["q", "qv", "all-linear"])
@pytest.mark.parametrize("arch", ["vit_small_patch16_dinov3", "swin_tiny_patch4_window7_224"])
def test_4bit_cells_on_both_cpu_paths(arch: str, targets: str, method_name: str, cpu_path: bool, tmp_path: Path) -> None:
    _check_cell(arch, method_name, tmp_path, targets=[targets], rank=8)


@pytest.mark.parametrize("method_name", ["linear", "full"])
@pytest.mark.parametrize("arch", ["vit_small_patch16_dinov3", "swin_tiny_patch4_window7_224"])
def test_study_baselines(arch: str, method_name: str, tmp_path: Path) -> None:
    _check_cell(arch, method_name, tmp_path)


@pytest.mark.parametrize("arch", ["resnet18", "vit_small_patch16_224"])
def test_study_scratch_baselines(arch: str, tmp_path: Path) -> None:
    _check_cell(arch, "scratch", tmp_path)


def test_4bit_layers_never_take_the_repacked_cpu_path(cpu_path: bool) -> None:
    """Our layers are pinned to bitsandbytes' portable layout whatever the CPU (the root cause of the crash)."""
    from visiontune.methods.lora import quantize_linears

    raw = bnb.nn.Linear4bit(96, 32, quant_type="nf4")
    # The attribute we switch off must still exist in the locked release, and follow the detected CPU.
    assert raw.support_avx512bf16_for_cpu == cpu_path
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=3, num_classes=3)
    quantize_linears(model)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 4 and all(m.support_avx512bf16_for_cpu is False for m in layers)
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, 16, 16))  # 32- and 96-wide inputs: not a multiple of the 64-value block
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
