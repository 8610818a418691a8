"""Mona adapters: the module against the paper's equations, insertion into ViT / DINOv2 / DINOv3 /
Swin / Swin V2 blocks, what trains, adapter save/load/switching, config checks, a real run."""

from __future__ import annotations

import copy
import io
from typing import Callable

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from visiontune.backbones import create_backbone
from visiontune.config import BackboneConfig, load_config
from visiontune.errors import ConfigError, WeightsError
from visiontune.eval.params import count_parameters
from visiontune.methods.base import head_parameter_ids
from visiontune.methods.mona import Mona, MonaConfig, MonaMethod, PatchGrid, adapters, mona_blocks


# ----------------------------------------------------------------------------- tiny backbones


def _registered(name: str) -> Callable[[], nn.Module]:
    return lambda: create_backbone(BackboneConfig(name=name, weights="none"), num_classes=3)


def _timm(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=3, **kw)


BACKBONES = {
    "vit": _registered("test_vit"),  # class token, fused qkv
    "vit_reg": _registered("test_vit_reg"),  # DINOv2 layout: 4 register tokens + layer-scale
    "swin": _registered("test_swin"),  # (B, H, W, C) window blocks, two stages
    # Not registered as test backbones: the timm classes at toy sizes.
    "dinov3": _timm("vit_small_patch16_dinov3", img_size=32, embed_dim=32, depth=2, num_heads=2),  # Eva + RoPE
    "swinv2": _timm("swinv2_tiny_window8_256", img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4),
}


@pytest.fixture(params=list(BACKBONES))
def backbone(request) -> nn.Module:
    torch.manual_seed(0)
    return BACKBONES[request.param]().eval()


def _images(n: int = 2, seed: int = 0, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _is_mona_param(name: str) -> bool:
    return ".mona1." in name or ".mona2." in name


# ----------------------------------------------------------------------------- the module


def reference_mona(m: Mona, x: torch.Tensor, grid: tuple[int, int], prefix: int) -> torch.Tensor:
    """The issue's equations written out literally, with three separate depthwise convs."""
    b, n, c = x.shape
    h, w = grid
    d = m.down.out_features
    scaled = F.layer_norm(x, (c,), m.norm.weight, m.norm.bias, m.norm.eps) * m.gamma + x * m.gamma_x
    z = scaled @ m.down.weight.T + m.down.bias
    cls, patches = z[:, :prefix], z[:, prefix:]
    g = patches.transpose(1, 2).reshape(b, d, h, w)  # row-major patch order, as timm flattens
    c3, c5, c7 = m.mixer.convs
    g = (F.conv2d(g, c3.weight, c3.bias, padding=1, groups=d) + F.conv2d(g, c5.weight, c5.bias, padding=2, groups=d)
         + F.conv2d(g, c7.weight, c7.bias, padding=3, groups=d)) / 3.0 + g
    g = g + F.conv2d(g, m.mixer.projector.weight, m.mixer.projector.bias)
    patches = g.reshape(b, d, h * w).transpose(1, 2)
    # Prefix tokens: no spatial convs (their multi-scale term is zero), the 1x1 projector with its residual.
    p = m.mixer.projector.weight[:, :, 0, 0]
    cls = cls + cls @ p.T + m.mixer.projector.bias
    z = torch.cat([cls, patches], dim=1)
    return x + F.gelu(z) @ m.up.weight.T + m.up.bias


def _random_mona(prefix_tokens: str = "skip_conv") -> Mona:
    torch.manual_seed(1)
    m = Mona(6, inner_dim=5, dropout=0.1, prefix_tokens=prefix_tokens)
    with torch.no_grad():
        for p in m.parameters():  # every weight non-trivial, gamma included, so each term matters
            p.normal_(0.0, 0.5)
    return m.eval()


def test_mona_defaults_follow_the_paper():
    m = Mona(384)
    assert (m.down.in_features, m.down.out_features, m.up.out_features) == (384, 64, 384)
    assert m.dropout.p == 0.1
    assert torch.all(m.gamma == 1e-6) and torch.all(m.gamma_x == 1.0)
    assert [c.kernel_size for c in m.mixer.convs] == [(3, 3), (5, 5), (7, 7)]
    assert all(c.groups == 64 for c in m.mixer.convs) and m.mixer.projector.kernel_size == (1, 1)
    # The authors' init: normal(0, 0.02) linears (timm/torch trunc_normal_ cuts at +-2 absolute), zero biases.
    assert torch.all(m.up.bias == 0) and 0.018 < m.up.weight.std() < 0.022
    zero = Mona(384, init="zero")
    assert torch.all(zero.up.weight == 0) and torch.all(zero.up.bias == 0)
    # One adapter at d=64: 2C (LN) + 2C (gammas) + 64C+64 (down) + 64C+C (up) + 64*83+3*64 (dw) + 64*64+64 (1x1).
    assert sum(p.numel() for p in m.parameters()) == 133 * 384 + 9728


@pytest.mark.parametrize("prefix", [0, 2])
def test_mona_matches_reference_equations(prefix):
    m = _random_mona()
    x = torch.randn(2, prefix + 3 * 4, 6, generator=torch.Generator().manual_seed(2))  # a non-square 3x4 grid
    torch.testing.assert_close(m(x, (3, 4), prefix), reference_mona(m, x, (3, 4), prefix), rtol=1e-5, atol=1e-5)
    # The channels-last map form (Swin) is the same computation without prefix tokens.
    if prefix == 0:
        torch.testing.assert_close(m(x.reshape(2, 3, 4, 6)), reference_mona(m, x, (3, 4), 0).reshape(2, 3, 4, 6),
                                   rtol=1e-5, atol=1e-5)


def test_prefix_tokens_never_mix_with_the_grid_inside_the_adapter():
    m = _random_mona()
    x = torch.randn(1, 2 + 9, 6)
    y = m(x, (3, 3), 2)
    x2 = x.clone()
    x2[:, :2] += 5.0  # change only the class/register tokens
    y2 = m(x2, (3, 3), 2)
    torch.testing.assert_close(y2[:, 2:], y[:, 2:])
    assert not torch.allclose(y2[:, :2], y[:, :2])
    x3 = x.clone()
    x3[:, 2:] += 5.0  # change only the patches
    torch.testing.assert_close(m(x3, (3, 3), 2)[:, :2], y[:, :2])


def test_bypass_leaves_prefix_tokens_unchanged():
    m = _random_mona("bypass")
    x = torch.randn(2, 4 + 6, 6)
    y = m(x, (2, 3), 4)
    assert torch.equal(y[:, :4], x[:, :4])
    torch.testing.assert_close(y[:, 4:], reference_mona(m, x[:, 4:], (2, 3), 0), rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
    m = _random_mona().train()
    x = torch.randn(2, 9, 6)
    assert not torch.allclose(m(x, (3, 3)), m(x, (3, 3)))
    m.eval()
    assert torch.equal(m(x, (3, 3)), m(x, (3, 3)))


def test_patch_grid_resolution():
    g = PatchGrid(num_prefix_tokens=1)
    assert g.resolve(1 + 16) == (4, 4)  # no recorded input: square inference
    g.size = (2, 5)
    assert g.resolve(1 + 10) == (2, 5)
    with pytest.raises(RuntimeError, match="patch_drop"):
        g.resolve(1 + 7)  # neither the recorded grid nor a square: e.g. dropped tokens


# ----------------------------------------------------------------------------- inside backbones


def test_zero_up_projection_leaves_the_network_unchanged(backbone):
    x = _images()
    n_blocks = len(mona_blocks(backbone))
    with torch.no_grad():
        before = backbone(x)
        model = MonaMethod(MonaConfig(init="zero")).apply(backbone)
        after = model(x)
    assert n_blocks == 2 and len(adapters(model)) == 2 * n_blocks
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_only_mona_and_head_get_gradients(backbone):
    model = MonaMethod(MonaConfig(init="paper")).apply(backbone).train()
    head = head_parameter_ids(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, p in model.named_parameters() if _is_mona_param(n) or id(p) in head}
    assert trainable == expected and any(_is_mona_param(n) for n in trainable)
    F.cross_entropy(model(_images(4)), torch.tensor([0, 1, 2, 0])).backward()
    # A class-token-pooled model ignores the patch tokens after the last attention, so the spatial convs of
    # its last block get exactly zero gradient (a property of token pooling, not of Mona's wiring).
    dead = ".1.mona" if getattr(model, "global_pool", None) == "token" else "no such parameter"
    for n, p in model.named_parameters():
        if n not in trainable:
            assert p.grad is None, n
        elif dead in n and ".mixer.convs." in n:
            assert p.grad is not None and torch.all(p.grad == 0), n
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    counts = count_parameters(model)
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)


def _train_steps(method: MonaMethod, model: nn.Module, seed: int, steps: int = 1) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(method.param_groups(model, 1e-2, 1e-2, 0.05))
    model.train()
    for i in range(steps):
        loss = F.cross_entropy(model(_images(4, seed=seed + i)), torch.tensor([0, 1, 2, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_adapter_file_round_trip_and_switching(backbone, tmp_path):
    method = MonaMethod(MonaConfig())
    x = _images(3, seed=7)
    trained = {}
    for tag, seed in (("a", 1), ("b", 2)):
        model = method.apply(copy.deepcopy(backbone))
        _train_steps(method, model, seed)
        save_file({k: v.contiguous() for k, v in method.trainable_state_dict(model).items()}, str(tmp_path / f"{tag}.safetensors"))
        with torch.no_grad():
            trained[tag] = model(x)
    assert not torch.allclose(trained["a"], trained["b"])

    host = method.apply(copy.deepcopy(backbone)).eval()
    for tag in ("a", "b", "a"):  # one host model, adapters swapped through the base-class interface
        method.load_trainable_state_dict(host, load_file(str(tmp_path / f"{tag}.safetensors")))
        with torch.no_grad():
            torch.testing.assert_close(host(x), trained[tag], rtol=0, atol=0)

    other = MonaMethod(MonaConfig(inner_dim=8))
    with pytest.raises(WeightsError, match="shape mismatch"):
        other.load_trainable_state_dict(other.apply(copy.deepcopy(backbone)), load_file(str(tmp_path / "a.safetensors")))


@pytest.mark.parametrize("name", ["vit_reg", "swin"])
def test_multi_adapter_host_serves_mona_tasks_over_one_backbone(name):
    from visiontune.methods.mona import MonaBlock
    from visiontune.multi import AdapterHost

    torch.manual_seed(0)
    backbone = BACKBONES[name]().eval()
    x = _images(2, seed=3)
    expected, states = {}, {}
    for task, (seed, classes) in {"a": (1, 3), "b": (2, 5)}.items():
        method = MonaMethod(MonaConfig())
        model = copy.deepcopy(backbone)
        model.reset_classifier(classes)
        model = method.apply(model)
        _train_steps(method, model, seed)
        states[task] = method.trainable_state_dict(model)
        with torch.no_grad():
            expected[task] = model(x)
    host = AdapterHost(copy.deepcopy(backbone), identity={})
    for task, state in states.items():
        host.add(task, MonaMethod(MonaConfig()), state, [f"c{i}" for i in range(expected[task].shape[1])])
    for task in ("a", "b", "a"):
        torch.testing.assert_close(host.logits(task, x), expected[task], rtol=1e-6, atol=1e-6)
    assert not any(isinstance(m, MonaBlock) for m in host._bases[""].modules())  # the shared backbone stays plain


@pytest.mark.parametrize("name", ["vit_reg", "swin"])
def test_grad_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = MonaMethod(MonaConfig(dropout=0.0)).apply(BACKBONES[name]()).train()
    x, y = _images(2), torch.tensor([0, 2])
    grads = []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_adapted_model_deepcopies_and_pickles():
    torch.manual_seed(0)
    model = MonaMethod(MonaConfig()).apply(BACKBONES["vit_reg"]()).eval()
    twin = copy.deepcopy(model)
    assert twin.blocks[0].mona_grid is twin.blocks[1].mona_grid is not model.blocks[0].mona_grid
    assert any(h is twin.blocks[0].mona_grid for h in twin.patch_embed._forward_pre_hooks.values())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)


def test_vit_grid_follows_the_actual_input_size():
    torch.manual_seed(0)
    base = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=3, img_size=28, patch_size=7, embed_dim=24,
        depth=1, num_heads=2, dynamic_img_size=True,
    ).eval()
    x = _images(1, size=(28, 42))  # non-square: a 4 x 6 patch grid, not the 4 x 4 of the default size
    with torch.no_grad():
        reference = base(x)
        zero = MonaMethod(MonaConfig(init="zero")).apply(copy.deepcopy(base))
        torch.testing.assert_close(zero(x), reference, rtol=1e-6, atol=1e-6)

    model = MonaMethod(MonaConfig()).apply(base)
    seen = {}
    model.blocks[0].mona1.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        model(x)
        assert model.blocks[0].mona_grid.size == (4, 6)
        assert seen["x"].shape[1] == 5 + 24  # class + 4 registers + 4x6 patches
        torch.testing.assert_close(model.blocks[0].mona1(seen["x"], (4, 6), 5), seen["y"])


def test_blocks_selects_where_adapters_go():
    torch.manual_seed(0)
    swin = MonaMethod(MonaConfig(blocks="last:1")).apply(BACKBONES["swin"]())
    adapted = [n for n, m in swin.named_modules() if hasattr(m, "mona1")]
    assert adapted == ["layers.1.blocks.0"]  # blocks counted across stages
    vit = MonaMethod(MonaConfig(blocks="0")).apply(BACKBONES["vit"]())
    assert [n for n, m in vit.named_modules() if hasattr(m, "mona1")] == ["blocks.0"]
    with pytest.raises(ConfigError, match="2 blocks"):
        MonaMethod(MonaConfig(blocks="5")).apply(BACKBONES["vit"]())


# ----------------------------------------------------------------------------- config and refusals


def test_config_reports_every_problem():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[
            "data.dataset=digits", "method.name=mona", "method.inner_dim=0", "method.dropout=1.5",
            "method.blocks=later", "method.prefix_tokens=drop",
        ])
    text = str(err.value)
    for key in ("method.inner_dim", "method.dropout", "method.blocks", "method.prefix_tokens"):
        assert key in text
    cfg = load_config(overrides=["data.dataset=digits", "method.name=mona", "method.blocks=last:4", "method.init=zero"])
    assert isinstance(cfg.method, MonaConfig) and cfg.method.blocks == "last:4"


def test_unsupported_backbones_are_refused_clearly():
    with pytest.raises(ConfigError, match="Swin") as err:
        load_config(overrides=["data.dataset=digits", "method.name=mona", "backbone.name=resnet18"])
    assert "resnet18" in str(err.value) and "lora" in str(err.value)
    with pytest.raises(ConfigError, match="no transformer block"):
        MonaMethod(MonaConfig()).apply(create_backbone(BackboneConfig(name="test_resnet", weights="none"), 3))
    model = MonaMethod(MonaConfig()).apply(BACKBONES["vit"]())
    with pytest.raises(ConfigError, match="already has Mona"):
        MonaMethod(MonaConfig()).apply(model)


@pytest.mark.parametrize(
    "arch,low,high",
    [
        ("swin_base_patch4_window7_224", 4.0, 4.5),  # the paper's COCO setting (Swin-B)
        ("swin_large_patch4_window7_224", 2.5, 3.0),  # the paper's ADE20K / VOC / classification setting (Swin-L)
        ("vit_small_patch14_dinov2", 6.0, 7.0),  # visiontune's real offline backbone
    ],
)
def test_trainable_share_of_the_standard_setting(arch, low, high):
    """The paper's title says '5%': adapters stay under 5% of the backbone on Swin (both sizes it uses)."""
    with torch.device("meta"):  # real architecture sizes, no memory
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    backbone_params = sum(p.numel() for p in model.parameters())
    MonaMethod(MonaConfig()).apply(model)
    mona = sum(p.numel() for n, p in model.named_parameters() if _is_mona_param(n))
    assert low < 100 * mona / backbone_params < high


# ----------------------------------------------------------------------------- through the training loop


def test_trains_and_reloads_through_the_run_directory(tiny_overrides):
    from visiontune.infer.evaluate import evaluate_run
    from visiontune.train.loop import train

    cfg = load_config(overrides=[*tiny_overrides, "method.name=mona", "backbone.name=test_vit_reg", "optim.epochs=1",
                                     "data.test_per_class=4"])
    result = train(cfg)
    assert result.metrics["run"]["method"] == "mona"
    params = result.metrics["params"]
    assert 0 < params["trainable"] < params["total"]
    again = evaluate_run(result.run_dir, progress=False)
    assert again["accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    assert again["confusion"] == result.metrics["test"]["confusion"]


def test_default_zero_init_starts_at_the_pretrained_function_and_still_learns():
    from visiontune.backbones import create_backbone
    from visiontune.config import BackboneConfig

    torch.manual_seed(0)
    base = create_backbone(BackboneConfig(name="test_vit_reg", weights="none"), num_classes=3).eval()
    x = _images(2)
    with torch.no_grad():
        ref = base(x)
    model = MonaMethod(MonaConfig()).apply(base).train()
    assert MonaConfig().init == "zero"
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-6)
    model.train()
    F.cross_entropy(model(_images(4)), torch.tensor([0, 1, 2, 0])).backward()
    ups = [p for n, p in model.named_parameters() if _is_mona_param(n) and p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0]
    assert ups, "the up-projections must receive gradient at step 0"
