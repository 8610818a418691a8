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

from visiontune.methods.qkv import SplitQKV, fuse_qkv, split_qkv, unsplittable_qkv

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


def _peft_split(kind: str, targets: str, dora: bool, bias: bool = True, dropout: float = 0.0) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = MODELS[kind]()
    if bias:
        _randomize_biases(model)
    split_qkv(model)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora, lora_dropout=dropout)
    model = get_peft_model(model, cfg)
    with torch.no_grad():  # peft starts B at zero (and DoRA's magnitude at the norm), which would hide a wrong term
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
            if "lora_magnitude_vector" in n:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    return model


def _outputs_and_grads(model: nn.Module, x: torch.Tensor, per_part: bool, monkeypatch: pytest.MonkeyPatch):
    import visiontune.methods.qkv as qkv_mod

    from peft.tuners.lora.dora import DoraLinearLayer

    calls, dora_calls = [], []
    real, real_dora = qkv_mod._fused_forward, DoraLinearLayer.forward
    monkeypatch.setattr(qkv_mod, "_fused_forward", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(DoraLinearLayer, "forward", lambda *a, **k: dora_calls.append(1) or real_dora(*a, **k))
    if per_part:
        monkeypatch.setattr(qkv_mod, "_fusable_bases", lambda parts: None)
    model.train()
    model.zero_grad()
    torch.manual_seed(3)  # LoRA dropout draws in the same order on both paths (parts called q, k, v)
    y = model(x)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    with torch.inference_mode():
        ev = model(x)
    monkeypatch.undo()
    return y.detach(), grads, ev, (len(calls), len(dora_calls))


@pytest.mark.parametrize(
    "kind,targets,dora,dropout",
    [
        ("vit_bias_qknorm", r".*qkv\.(q|k|v)", False, 0.0),
        ("vit", r".*qkv\.(q|v)", False, 0.0),  # k stays a plain Linear inside the fused GEMM
        ("dinov2_reg_layerscale", r".*qkv\.(q|k|v)", True, 0.0),
        ("dinov3_eva_rope", r".*qkv\.q", True, 0.0),
        ("eva_q_v_bias", r".*(qkv\.(q|k|v)|proj|fc1|fc2)", False, 0.0),
        # DoRA with dropout in training: peft's own DoRA forward on each part's slice of the fused output.
        ("vit", r".*qkv\.(q|v)", True, 0.2),
    ],
)
def test_fused_qkv_path_equals_calling_the_parts(kind, targets, dora, dropout, monkeypatch) -> None:
    """One GEMM on the concatenated q/k/v weights + per-part adapters == peft's per-layer forward."""
    model = _peft_split(kind, targets, dora, dropout=dropout)
    x = torch.randn(2, 3, 32, 32)
    ref, ref_g, ref_eval, (ref_calls, ref_dora) = _outputs_and_grads(model, x, True, monkeypatch)
    out, g, ev, (calls, dora_calls) = _outputs_and_grads(model, x, False, monkeypatch)
    assert ref_calls == 0 and calls >= 2  # the fused path ran in every block, the reference never
    # The reference is peft's DoRA forward; the fused path rescales in place of it (train and eval), unless
    # dropout is on in training.
    assert (dora_calls > 0) == (dropout > 0) and (ref_dora > 0) == dora
    assert (out - ref).abs().max().item() <= TOL
    assert (ev - ref_eval).abs().max().item() <= TOL
    assert ref_g.keys() == g.keys() and len(g) > 0
    for n in g:
        assert torch.allclose(g[n], ref_g[n], rtol=1e-4, atol=1e-6), n


def test_fused_qkv_path_follows_merge_disable_and_adapter_switch(monkeypatch) -> None:
    import visiontune.methods.qkv as qkv_mod
    from peft import LoraConfig

    model = _peft_split("vit", r".*qkv\.(q|k|v)", False).eval()
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=r".*qkv\.(q|v)"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.other" in n:
                p.normal_(0, 0.3)
    x = torch.randn(2, 3, 32, 32)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            fused = model(x)
            with monkeypatch.context() as m:
                m.setattr(qkv_mod, "_fusable_bases", lambda parts: None)
                ref = model(x)
        return fused, ref

    outs = {}
    for state in ("default", "other", "disabled", "merged"):
        if state == "other":
            model.set_adapter("other")
        elif state == "disabled":
            with model.disable_adapter():
                outs[state] = both()
            continue
        elif state == "merged":
            model.set_adapter("default")
            model.merge_adapter()
        outs[state] = both()
    for state, (fused, ref) in outs.items():
        assert (fused - ref).abs().max().item() <= TOL, state
    # The states really differ (the adapters do something), and merging keeps the default adapter's function.
    assert (outs["default"][0] - outs["other"][0]).abs().max() > 1e-3
    assert (outs["default"][0] - outs["disabled"][0]).abs().max() > 1e-3
    assert (outs["default"][0] - outs["merged"][0]).abs().max() <= 1e-4


def test_a_hooked_part_is_called_itself() -> None:
    model = _vit().eval()
    split_qkv(model)
    seen = []
    model.blocks[0].attn.qkv.k.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert len(seen) == 1  # block 0 took the per-part path so the hook ran; block 1 is unaffected


def test_four_bit_parts_accumulate_like_peft(monkeypatch) -> None:
    """QLoRA's 4-bit q/k/v parts: base per part, LoRA products accumulated in place == calling the parts."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, inject_adapter_in_model

    import visiontune.methods.qkv as qkv_mod
    from visiontune.methods.lora import quantize_linears

    torch.manual_seed(0)
    model = _vit(qkv_bias=True)
    _randomize_biases(model)
    split_qkv(model)
    quantize_linears(model, "nf4", True, "float32")
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=r".*qkv\.(q|v)"), model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    x = torch.randn(2, 3, 32, 32)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        y = model(x)
        y.square().sum().backward()
        return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    import visiontune.methods.lean_lora as lean

    calls = []
    orig = lean.lean_terms
    monkeypatch.setattr(lean, "lean_terms", lambda *a, **k: calls.append(orig(*a, **k)) or calls[-1])
    out, grads = run()
    assert len(calls) >= 4 and all(calls)  # the lean per-part path ran, with adapter terms for q and v
    monkeypatch.setattr(qkv_mod, "_per_part_forward", lambda x, parts: torch.cat([p(x) for p in parts], dim=-1))
    ref, ref_grads = run()
    assert (out - ref).abs().max().item() <= 1e-5
    assert grads.keys() == ref_grads.keys() and any("lora_A" in k for k in grads)
    for k in grads:
        assert torch.allclose(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6), k


def test_fused_weight_is_shared_then_released_when_parts_are_replaced() -> None:
    model = _vit().eval().requires_grad_(False)  # a frozen backbone, as under adapters
    split_qkv(model)
    split = model.blocks[0].attn.qkv
    fused = split._fused_weight
    assert fused is not None and split.q.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    assert split._fused_weight is fused  # still the parts' storage: used as the fused GEMM's weight
    split.k.weight = nn.Parameter(split.k.weight.detach().clone(), requires_grad=False)  # e.g. .to(), a DoRA merge
    with torch.no_grad():
        out = model(x)
    assert split._fused_weight is None and torch.isfinite(out).all()
