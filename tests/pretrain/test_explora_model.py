"""ExPLoRA surgery on tiny ViTs: the exact freezing pattern, recipe notation, masks, multi-crop, multi-band input, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from visiontune.backbones import create_backbone
from visiontune.config import BackboneConfig
from visiontune.errors import ConfigError, DataError
from visiontune.pretrain import load_pretrain_config, parse_recipe, resolve_unfrozen
from visiontune.data.bands import check_arrays, load_bands as load_array
from visiontune.pretrain.model import (
    apply_explora, enable_multicrop, export_backbone, install_mask_hook, make_teacher, masked, replace_patch_embed,
    tokens, trained_pairs,
)


def _vit(depth: int = 4, reg: int = 0) -> VisionTransformer:
    torch.manual_seed(0)
    extra = dict(reg_tokens=reg, init_values=1e-5, no_embed_class=True) if reg else {}
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=2.0,
                             num_classes=0, **extra)


@pytest.mark.parametrize("spec,full,reg", [("L", {3}, 0), ("1,L", {0, 3}, 0), ("[1,L]", {0, 3}, 4)])
def test_freezing_pattern_is_exactly_blocks_norms_and_qv_lora(spec, full, reg):
    model = _vit(reg=reg)
    unfrozen = resolve_unfrozen(spec, 4)
    assert set(unfrozen) == full
    surgery = apply_explora(model, unfrozen, rank=4)
    lora = set(range(4)) - full
    assert set(surgery.lora_blocks) == lora
    assert surgery.lora_modules == [f"blocks.{i}.attn.qkv.{p}" for i in sorted(lora) for p in ("q", "v")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = set()
    for n, _ in model.named_parameters():
        parts = n.split(".")
        in_block = parts[0] == "blocks"
        if in_block and int(parts[1]) in full:
            expected.add(n)  # every parameter of an unfrozen block (attention, MLP, layer-scale, norms)
        elif n.startswith("norm.") or (in_block and parts[2] in ("norm1", "norm2")):
            expected.add(n)  # every normalisation layer
        elif in_block and ".lora_" in n:
            expected.add(n)
    assert trainable == expected
    # LoRA only on q and v of the other blocks: never k, proj, MLP, embeddings or tokens.
    lora_params = {n for n in trainable if ".lora_" in n}
    assert lora_params and all(".qkv.q." in n or ".qkv.v." in n for n in lora_params)
    assert all(int(n.split(".")[1]) in lora for n in lora_params)
    assert not any(n.startswith(("patch_embed", "pos_embed", "cls_token", "reg_token")) for n in trainable)
    assert surgery.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_norms_can_stay_frozen_and_unfrozen_none_means_lora_everywhere():
    model = _vit()
    apply_explora(model, resolve_unfrozen("none", 4), rank=2, norms=False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n
    }


def test_recipe_notation_resolves_from_config():
    r = parse_recipe("D-ExPLoRA-[L]-r64")
    assert (r.objective, r.unfrozen, r.rank, r.name) == ("dino", "L", 64, "D-ExPLoRA-[L]-r64")
    assert parse_recipe("d-explora-[1, L]-r32").name == "D-ExPLoRA-[1,L]-r32"
    assert resolve_unfrozen("1,L", 12) == [0, 11] and resolve_unfrozen("L-1,L", 12) == [10, 11]
    cfg = load_pretrain_config(None, ["data.dataset=digits", "explora.recipe=D-ExPLoRA-[1,L]-r16"])
    assert (cfg.explora.unfrozen, cfg.explora.rank, cfg.ssl.objective) == ("1,L", 16, "dino")
    assert cfg.recipe_name() == "D-ExPLoRA-[1,L]-r16"
    with pytest.raises(ConfigError) as e:
        load_pretrain_config(None, ["data.dataset=digits", "explora.recipe=D-ExPLoRA-[L]-r64", "explora.rank=8"])
    assert "explora.rank=8 contradicts explora.recipe" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_pretrain_config(None, ["data.dataset=digits", "explora.recipe=M-ExPLoRA-[L]-r64"])
    assert "MAE" in str(e.value) and "not available" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_pretrain_config(None, ["explora.recipe=ExPLoRA-L-64", "optim.steps=0", "explora.unfrozen=last"])
    msg = str(e.value)
    assert "paper's notation" in msg and "optim.steps=0" in msg and "explora.unfrozen='last'" in msg and "data.dataset" in msg
    with pytest.raises(ConfigError, match="has 4 blocks"):
        resolve_unfrozen("5,L", 4)


def test_mask_token_replaces_exactly_the_masked_patches():
    model = _vit(depth=2)
    install_mask_hook(model)
    x = torch.randn(2, 3, 32, 32)
    plain = model.patch_embed(x)  # [2, 16, 32]
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = mask[1, 0, 0] = mask[1, 3, 3] = True
    token = torch.randn(1, 32)
    with masked(model, mask, token):
        out = model.patch_embed(x)
    flat = mask.flatten(1)
    torch.testing.assert_close(out[flat], token.expand(3, -1))
    torch.testing.assert_close(out[~flat], plain[~flat])
    torch.testing.assert_close(model.patch_embed(x), plain)  # outside the context the hook is inert
    # The mask token receives gradient through the whole network.
    token.requires_grad_(True)
    with masked(model, mask, token):
        tokens(model, x)[1].sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0


def test_multicrop_sizes_and_unchanged_output_at_built_size():
    model = _vit(depth=2, reg=4).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model.forward_features(x)
    enable_multicrop(model)
    install_mask_hook(model)
    torch.testing.assert_close(model.forward_features(x), before)
    cls, patches = tokens(model, torch.randn(3, 3, 16, 16))  # a local crop: 2x2 patches
    assert cls.shape == (3, 32) and patches.shape == (3, 4, 32)


def test_teacher_shares_frozen_tensors_and_ema_moves_only_trained_ones():
    student = _vit(depth=2)
    apply_explora(student, [1], rank=2)
    teacher = make_teacher(student)
    s_named, t_named = dict(student.named_parameters()), dict(teacher.named_parameters())
    for n, p in s_named.items():
        assert (t_named[n] is p) != p.requires_grad  # frozen: the same tensor; trained: a separate copy
    assert not any(p.requires_grad for p in teacher.parameters())
    t_list, s_list = trained_pairs(student, teacher)
    with torch.no_grad():
        for p in s_list:
            p.add_(1.0)
    from visiontune.pretrain.losses import ema_update

    before = [t.clone() for t in t_list]
    ema_update(t_list, s_list, 0.5)
    for t, b, s in zip(t_list, before, s_list):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * s)


def test_export_merges_lora_and_loads_through_the_weight_mechanism(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = create_backbone(BackboneConfig(name="test_vit_reg", weights="none"), num_classes=0)
    apply_explora(model, [1], rank=4)
    enable_multicrop(model)
    install_mask_hook(model)
    with torch.no_grad():  # stand-in for training: non-zero LoRA B, moved block and norms
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model.forward_features(x)
    merged = export_backbone(model)
    assert not any(".lora_" in k or ".qkv.q." in k for k in merged.state_dict())  # plain timm keys, fused qkv
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, str(path))
    loaded = create_backbone(BackboneConfig(name="test_vit_reg", weights=str(path)), num_classes=3).eval()
    torch.testing.assert_close(loaded.forward_features(x), expected, atol=1e-5, rtol=1e-5)


def test_multispectral_patch_embedding_and_band_arrays(tmp_path):
    model = _vit(depth=2)
    proj = replace_patch_embed(model, 13)
    assert proj.weight.shape == (32, 13, 8, 8)
    surgery = apply_explora(model, [1], rank=2, new_patch_embed=True)
    assert surgery.new_patch_embed and model.patch_embed.proj.weight.requires_grad
    assert model.forward_features(torch.randn(2, 13, 32, 32)).shape == (2, 17, 32)
    merged = export_backbone(model)
    assert merged.state_dict()["patch_embed.proj.weight"].shape == (32, 13, 8, 8)
    # Bands last (HxWxC) and bands first (CxHxW) both load as [C, H, W].
    hwc = np.random.default_rng(0).random((20, 24, 13)).astype(np.float32)
    np.save(tmp_path / "a.npy", hwc)
    np.save(tmp_path / "b.npy", np.moveaxis(hwc, 2, 0))
    a, b = load_array(str(tmp_path / "a.npy"), 13), load_array(str(tmp_path / "b.npy"), 13)
    assert a.shape == (13, 20, 24) and torch.equal(a, b)
    np.save(tmp_path / "bad.npy", np.zeros((20, 24, 4), dtype=np.float32))
    with pytest.raises(DataError, match="bad.npy has shape"):
        check_arrays([str(tmp_path / "a.npy"), str(tmp_path / "bad.npy")], 13)
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "c.tif", hwc)
    assert torch.equal(load_array(str(tmp_path / "c.tif"), 13), a)


def test_non_vit_backbone_is_refused_clearly():
    model = create_backbone(BackboneConfig(name="test_resnet", weights="none"), num_classes=0)
    with pytest.raises(ConfigError, match="not a timm VisionTransformer"):
        apply_explora(model, [0], rank=2, label="test_resnet")
