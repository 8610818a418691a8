"""The fused-qkv split: exact outputs on every attention variant it claims, and an honest refusal elsewhere."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.eva import Eva
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from visiontune.backbones.qkv import SplitQKV, fuse_qkv, split_qkv, unsplittable_qkv

TOL = 1e-6


def _vit(**kw: object) -> nn.Module:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=3)
    return VisionTransformer(**{**args, **kw})


def _eva(qkv_bias: bool) -> nn.Module:
    # DINOv3 as timm builds it: EVA blocks with RoPE, 4 register tokens, layer-scale, no abs pos-embed.
    return Eva(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=qkv_bias,
        init_values=1e-5, rope_type="dinov3", use_rot_pos_emb=True, use_abs_pos_emb=False, num_reg_tokens=4,
        rope_rotate_half=True, num_classes=3,
    )


MODELS = {
    "vit": lambda: _vit(),
    "vit_bias_qknorm": lambda: _vit(qkv_bias=True, qk_norm=True),
    "dinov2_reg_layerscale": lambda: _vit(reg_tokens=4, init_values=1e-5, no_embed_class=True),
    "dinov3_eva_rope": lambda: _eva(qkv_bias=False),
    "eva_q_v_bias": lambda: _eva(qkv_bias=True),
    "swin": lambda: SwinTransformer(
        img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=3
    ),
}


def _randomize_biases(model: nn.Module) -> None:
    # Fresh timm models zero their biases; random ones make the bias split observable.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or n.endswith("q_bias") or n.endswith("v_bias"):
                p.normal_(0, 0.5)


@pytest.mark.parametrize("fused_attn", [True, False], ids=["sdpa", "manual"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_split_keeps_outputs(kind: str, fused_attn: bool) -> None:
    torch.manual_seed(0)
    model = MODELS[kind]().eval()
    _randomize_biases(model)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused_attn
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        names = split_qkv(model)
        out = model(x)
    assert len(names) == 2 and all(isinstance(model.get_submodule(n), SplitQKV) for n in names)
    assert (out - ref).abs().max().item() <= TOL
    # The second call is a no-op (idempotent, no SplitQKV inside a SplitQKV).
    assert split_qkv(model) == names
    assert not any(isinstance(m, SplitQKV) for s in names for m in model.get_submodule(s).children())


def test_parts_are_the_query_key_value_rows() -> None:
    torch.manual_seed(0)
    model = _vit(qkv_bias=True)
    _randomize_biases(model)
    fused = copy.deepcopy(model.blocks[0].attn.qkv)
    split_qkv(model)
    part = model.blocks[0].attn.qkv
    tokens = torch.randn(3, 5, 32)
    with torch.no_grad():
        whole = fused(tokens)
        assert torch.allclose(part.q(tokens), whole[..., :32], atol=TOL)
        assert torch.allclose(part.k(tokens), whole[..., 32:64], atol=TOL)
        assert torch.allclose(part.v(tokens), whole[..., 64:], atol=TOL)
    assert part.in_features == 32 and part.out_features == 96


@pytest.mark.parametrize("kind", ["vit", "dinov2_reg_layerscale", "dinov3_eva_rope", "swin"])
def test_fuse_restores_a_plain_timm_model(kind: str) -> None:
    torch.manual_seed(0)
    model = MODELS[kind]().eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    split_qkv(model)
    assert fuse_qkv(model) == 2
    assert not any(isinstance(m, SplitQKV) for m in model.modules())
    # Same parameter names and values as before the split: the model is timm's again.
    ref_state, state = original.state_dict(), model.state_dict()
    assert list(state) == list(ref_state)
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    with torch.no_grad():
        assert (model(x) - original(x)).abs().max().item() <= TOL


def test_eva_biases_move_into_the_split_and_back() -> None:
    torch.manual_seed(0)
    model = _eva(qkv_bias=True).eval()
    _randomize_biases(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        split_qkv(model)
        attn = model.blocks[0].attn
        assert attn.q_bias is None and "q_bias" not in dict(model.named_parameters())
        assert attn.qkv.q.bias is not None and torch.count_nonzero(attn.qkv.k.bias) == 0  # EVA has no key bias
        assert (model(x) - ref).abs().max().item() <= TOL
        fuse_qkv(model)
        assert (model(x) - ref).abs().max().item() <= TOL


def test_attention_that_reads_qkv_weight_is_left_fused() -> None:
    # Swin-V2 computes F.linear(x, self.qkv.weight, bias): a replacement module would be bypassed.
    model = SwinTransformerV2(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2))
    assert split_qkv(model) == []
    blocked = unsplittable_qkv(model)
    assert set(blocked) == {"layers.0.blocks.0.attn.qkv", "layers.1.blocks.0.attn.qkv"}
    assert all("WindowAttention" in why for why in blocked.values())
