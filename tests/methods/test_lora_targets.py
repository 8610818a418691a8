"""Target presets and block ranges select exactly the intended modules, and fail clearly otherwise."""

from __future__ import annotations

import pytest
import torch
from timm.models.convnext import ConvNeXt
from timm.models.eva import Eva
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch import nn

from visiontune.backbones import create_backbone
from visiontune.backbones.qkv import split_qkv
from visiontune.config import BackboneConfig, load_config
from visiontune.errors import ConfigError
from visiontune.methods.targets import PRESETS, parse_blocks, resolve_targets, supported_presets, target_problems


def _backbone(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone(BackboneConfig(name=name, weights="none"), num_classes=3)


def _dinov3_style() -> nn.Module:
    return Eva(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=False,
        init_values=1e-5, rope_type="dinov3", use_rot_pos_emb=True, use_abs_pos_emb=False, num_reg_tokens=4,
        num_classes=3,
    )


VITS = {
    "test_vit": lambda: _backbone("test_vit"),
    "test_vit_reg": lambda: _backbone("test_vit_reg"),  # DINOv2 style: 4 registers + layer-scale
    "dinov3_style": _dinov3_style,  # EVA + RoPE + registers + layer-scale
}

# Per block, relative names of what each preset must select (nothing more, nothing less).
EXPECTED = {
    "q": ["attn.qkv.q"],
    "v": ["attn.qkv.v"],
    "qv": ["attn.qkv.q", "attn.qkv.v"],
    "qkv": ["attn.qkv.q", "attn.qkv.k", "attn.qkv.v"],
    "attn": ["attn.qkv.q", "attn.qkv.k", "attn.qkv.v", "attn.proj"],
    "mlp": ["mlp.fc1", "mlp.fc2"],
    "all-linear": ["attn.qkv.q", "attn.qkv.k", "attn.qkv.v", "attn.proj", "mlp.fc1", "mlp.fc2"],
}


def _split(model: nn.Module) -> nn.Module:
    split_qkv(model)
    return model


@pytest.mark.parametrize("preset", list(EXPECTED))
@pytest.mark.parametrize("vit", list(VITS))
def test_vit_presets_select_exactly(vit: str, preset: str) -> None:
    model = _split(VITS[vit]())
    got = resolve_targets(model, [preset])
    assert got == [f"blocks.{b}.{rel}" for b in range(2) for rel in EXPECTED[preset]]


@pytest.mark.parametrize("vit", list(VITS))
def test_conv_preset_is_refused_on_vit_naming_what_works(vit: str) -> None:
    model = _split(VITS[vit]())
    with pytest.raises(ConfigError, match=r"'conv' selects nothing.*supports: q, v, qv, qkv, attn, mlp, all-linear"):
        resolve_targets(model, ["conv"])


def test_presets_combine_and_blocks_restrict() -> None:
    model = _split(_backbone("test_vit_reg"))
    assert resolve_targets(model, ["q", "mlp"], blocks="last:1") == [
        "blocks.1.attn.qkv.q", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2",
    ]
    assert resolve_targets(model, ["v"], blocks="0") == ["blocks.0.attn.qkv.v"]
    assert resolve_targets(model, ["qv", "q"], blocks="first:1") == ["blocks.0.attn.qkv.q", "blocks.0.attn.qkv.v"]


def test_patterns_match_names_and_suffixes() -> None:
    model = _split(_backbone("test_vit"))
    assert resolve_targets(model, ["mlp.fc1"]) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert resolve_targets(model, [r"blocks\.1\.attn\.qkv\.[qk]"]) == ["blocks.1.attn.qkv.q", "blocks.1.attn.qkv.k"]
    assert resolve_targets(model, ["fc2"], blocks="last:1") == ["blocks.1.mlp.fc2"]
    # Outside every block, a pattern still reaches a layer (here the patch-embedding conv).
    assert resolve_targets(model, ["patch_embed.proj"]) == ["patch_embed.proj"]


@pytest.mark.parametrize(
    "targets, message",
    [
        (["head"], "matches no module"),  # the classifier is never a target
        (["norm1"], "not Linear/Conv2d"),
        (["q_proj"], "selects nothing on"),
        (["qvk"], "'qvk' is not a preset; did you mean"),
    ],
)
def test_bad_patterns_say_why(targets: list[str], message: str) -> None:
    model = _split(_backbone("test_vit"))
    with pytest.raises(ConfigError, match=message):
        resolve_targets(model, targets)


def test_block_syntax() -> None:
    assert parse_blocks("all", 12) == list(range(12))
    assert parse_blocks("last:4", 12) == [8, 9, 10, 11]
    assert parse_blocks("first:2,10-11", 12) == [0, 1, 10, 11]
    assert parse_blocks("0-3,3,5", 12) == [0, 1, 2, 3, 5]
    with pytest.raises(ConfigError, match="has 12 blocks"):
        parse_blocks("10-12", 12)
    with pytest.raises(ConfigError, match="not a block selection"):
        parse_blocks("last4", 12)
    with pytest.raises(ConfigError, match="empty"):
        parse_blocks("3-1", 12)


@pytest.mark.parametrize("spec", ["last:9", "first:3", "last:3,0"])
def test_block_counts_beyond_the_depth_are_errors_naming_it(spec: str) -> None:
    """``last:9`` on a 2-block model used to be clamped to "all" without a word (issue 18, item 9)."""
    assert parse_blocks("last:2", 2) == [0, 1] and parse_blocks("first:1", 2) == [0]
    kind = spec.split(":")[0]
    with pytest.raises(ConfigError, match=rf"method.blocks='{spec}' asks for {kind} \d blocks, but this backbone has 2 "
                                          rf"blocks; use {kind}:N with N from 1 to 2, or all"):
        parse_blocks(spec, 2)
    with pytest.raises(ConfigError, match="this backbone has 2 blocks"):
        resolve_targets(_split(_backbone("test_vit")), ["q"], blocks=spec)


def test_swin_presets_cover_all_stages() -> None:
    model = _split(_backbone("test_swin"))
    blocks = ["layers.0.blocks.0", "layers.1.blocks.0"]
    assert resolve_targets(model, ["q"]) == [f"{b}.attn.qkv.q" for b in blocks]
    assert resolve_targets(model, ["all-linear"]) == [f"{b}.{rel}" for b in blocks for rel in EXPECTED["all-linear"]]
    assert resolve_targets(model, ["attn"], blocks="last:1") == [f"layers.1.blocks.0.{r}" for r in EXPECTED["attn"]]


def test_resnet_supports_conv_only() -> None:
    model = _split(_backbone("test_resnet"))
    got = resolve_targets(model, ["conv"])
    block_convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("layer")]
    assert got == block_convs and "conv1" not in got  # the stem is not inside a block
    assert supported_presets(model) == ["conv"]
    with pytest.raises(ConfigError, match=r"'q' selects nothing.*This ResNet has no attention.*supports: conv; use method"
                       r"\.targets=conv, or method\.name=linear / full"):
        resolve_targets(model, ["q"])
    for preset in ("all-linear", "mlp"):
        with pytest.raises(ConfigError, match=r"This ResNet has no Linear layer and no MLP.*'conv' preset.*supports: conv"):
            resolve_targets(model, [preset])


def test_convnext_supports_mlp_not_attention() -> None:
    model = _split(ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=3))
    assert resolve_targets(model, ["mlp"]) == [f"stages.{s}.blocks.0.mlp.fc{i}" for s in range(4) for i in (1, 2)]
    assert supported_presets(model) == ["mlp", "all-linear"]  # depthwise convs are not 'conv' targets
    with pytest.raises(ConfigError, match=r"'qv' selects nothing.*This ConvNeXt has no attention.*supports: mlp, all-linear"):
        resolve_targets(model, ["qv"])
    with pytest.raises(ConfigError, match=r"'conv' selects nothing.*depthwise.*conv_dw.*use method\.targets=mlp"):
        resolve_targets(model, ["conv"])


def test_unknown_layout_takes_patterns_only() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.fc = nn.Linear(4, 2)

        def get_classifier(self) -> nn.Module:
            return self.fc

    with pytest.raises(ConfigError, match="does not know the block layout of Odd.*'body'"):
        resolve_targets(Odd(), ["qv"])
    assert resolve_targets(Odd(), ["body"]) == ["body"]


def test_config_time_checks_report_everything() -> None:
    assert target_problems([]) and "empty" in target_problems([])[0]
    assert "did you mean 'all-linear'" in target_problems(["all_linear"])[0]
    assert "valid regex" in target_problems(["blocks.(1"])[0]
    assert target_problems(list(PRESETS) + [r"blocks\.1\..*", "fc1"]) == []
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[
            "data.dataset=digits", "method.name=lora", "method.rank=0", "method.targets=[all_linear]",
            "method.blocks=last4", "method.dropout=1.5",
        ])
    assert len(err.value.problems) == 4


def test_targets_from_the_command_line() -> None:
    cfg = load_config(overrides=["data.dataset=digits", "method.name=qlora", "method.targets=q,mlp", "method.rank=16"])
    assert cfg.method.targets == ["q", "mlp"] and cfg.method.rank == 16 and cfg.method.double_quant is True


def test_swin_v2_fused_qkv_is_never_a_target() -> None:
    # Swin-V2 computes F.linear(x, self.qkv.weight, ...): an adapter wrapping qkv would never run.
    model = _split(SwinTransformerV2(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)))
    with pytest.raises(ConfigError, match=r"'q' selects nothing.*cannot be split into q/k/v.*supports: attn, mlp, all-linear"):
        resolve_targets(model, ["q"])
    rels = ("attn.cpb_mlp.0", "attn.cpb_mlp.2", "attn.proj", "mlp.fc1", "mlp.fc2")  # cpb_mlp: position-bias MLP
    assert resolve_targets(model, ["all-linear"], blocks="0") == [f"layers.0.blocks.0.{r}" for r in rels]
    with pytest.raises(ConfigError, match="qkv cannot carry an adapter.*reads self.qkv.weight"):
        resolve_targets(model, ["attn.qkv"])
