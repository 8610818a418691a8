"""Multi-band arrays: reading (.npy, .tif, multi-page .tif, bytes, arrays), the checks and their messages, per-band
statistics, band selection, the N-band transform, and the widened first layer of an RGB backbone."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from visiontune.backbones import create_backbone
from visiontune.backbones.bands import rgb_init
from visiontune.config import BackboneConfig, load_config
from visiontune.data import ImageLimits, ImageTooLargeError, load_records
from visiontune.data.bands import (
    BandSpec, BandTransform, band_statistics, check_arrays, decode_for, load_bands, read_bands,
)
from visiontune.errors import ConfigError, DataError

tifffile = pytest.importorskip("tifffile")


def _hwc(seed: int = 0, bands: int = 13, size: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10_000, (size, size + 4, bands)).astype(np.uint16)


def test_every_layout_and_container_reads_to_the_same_bands(tmp_path):
    hwc = _hwc()
    chw = np.moveaxis(hwc, 2, 0)
    np.save(tmp_path / "a.npy", hwc)
    np.save(tmp_path / "b.npy", chw)
    tifffile.imwrite(tmp_path / "c.tif", hwc)  # one page, 13 samples per pixel
    tifffile.imwrite(tmp_path / "d.tif", chw)  # 13 pages grouped in one series
    with tifffile.TiffWriter(tmp_path / "e.tif") as w:  # 13 separate pages, one per band (not one series)
        for band in chw:
            w.write(band, metadata=None)
    for name in ("a.npy", "b.npy", "c.tif", "d.tif", "e.tif"):
        got = read_bands(str(tmp_path / name), 13)
        assert got.shape == (13, 20, 24) and got.dtype == np.uint16 and np.array_equal(got, chw), name
        # the same file sent as bytes (an upload), and as an in-memory array
        assert np.array_equal(read_bands((tmp_path / name).read_bytes(), 13), chw), name
    assert np.array_equal(read_bands(hwc, 13), chw)
    assert load_bands(str(tmp_path / "a.npy"), 13).dtype == torch.float32


def test_bad_arrays_get_an_error_naming_the_file_and_the_problem(tmp_path):
    np.save(tmp_path / "bands4.npy", _hwc(bands=4))
    np.save(tmp_path / "bool.npy", np.zeros((20, 20, 13), dtype=bool))
    nan = _hwc().astype(np.float32)
    nan[3, 4, 5] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "obj.npy", np.zeros((20, 20, 13), dtype=np.complex64))
    (tmp_path / "junk.npy").write_bytes(b"not an array at all")
    with pytest.raises(DataError, match=r"bands4\.npy has shape \(20, 24, 4\), with no axis of 13 bands.*data.channels"):
        read_bands(str(tmp_path / "bands4.npy"), 13)
    with pytest.raises(DataError, match=r"bool\.npy has dtype bool; multi-band arrays must hold integers or floats"):
        read_bands(str(tmp_path / "bool.npy"), 13)
    with pytest.raises(DataError, match=r"nan\.npy contains 1 NaN or infinite value"):
        read_bands(str(tmp_path / "nan.npy"), 13)
    with pytest.raises(DataError, match="does not exist"):
        read_bands(str(tmp_path / "missing.npy"), 13)
    with pytest.raises(ImageTooLargeError, match="max_pixels"):
        read_bands(str(tmp_path / "bands4.npy"), 4, limits=ImageLimits(max_pixels=100))
    with pytest.raises(DataError, match="neither a .npy nor a TIFF"):
        read_bands(b"GIF89a....", 13, "the uploaded image")
    # A dataset check reports every bad file at once, from the headers.
    with pytest.raises(DataError) as info:
        check_arrays([str(tmp_path / f) for f in ("bands4.npy", "bool.npy", "obj.npy", "junk.npy")], 13)
    text = str(info.value)
    assert "4 of 4 arrays are unusable with data.channels=13" in text
    assert all(f in text for f in ("bands4.npy", "bool.npy", "obj.npy", "junk.npy: unreadable"))


def test_pickled_npy_is_refused_not_executed(tmp_path):
    np.save(tmp_path / "p.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="dtype object"):
        read_bands(str(tmp_path / "p.npy"), 1)
    with pytest.raises(DataError):
        read_bands((tmp_path / "p.npy").read_bytes(), 1)


def _folder(root, n=4, bands=13, classes=("a", "b")):
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(n):
            np.save(root / c / f"{i}.npy", _hwc(10 * k + i, bands) + 1000 * k)
    return root


def test_folders_and_manifests_of_arrays_load_with_channels(tmp_path):
    root = _folder(tmp_path / "d")
    (root / "a" / "notes.txt").write_text("ignored")
    recs = load_records(str(root), channels=13)
    assert len(recs) == 8 and recs.channels == 13 and recs.classes == ["a", "b"]
    assert recs.subset([0, 5]).channels == 13
    (tmp_path / "m.csv").write_text("path,label\nd/a/0.npy,x\nd/b/1.npy,y\n")
    man = load_records(str(tmp_path / "m.csv"), channels=13)
    assert man.channels == 13 and man.classes == ["x", "y"]
    with pytest.raises(DataError, match="arrays are unusable with data.channels=12"):
        load_records(str(root), channels=12)
    with pytest.raises(ConfigError, match="built-in dataset of photos"):
        load_records("digits", channels=13)


def test_statistics_are_per_band_over_every_pixel(tmp_path):
    root = _folder(tmp_path / "d", n=2, bands=3)
    recs = load_records(str(root), channels=3)
    mean, std = band_statistics(recs.items, 3)
    stack = np.stack([read_bands(p, 3) for p in recs.items]).astype(np.float64)
    assert np.allclose(mean, stack.mean(axis=(0, 2, 3))) and np.allclose(std, stack.std(axis=(0, 2, 3)))


def test_transform_selects_bands_normalises_and_augments_geometrically_only():
    spec = BandSpec(5, (3, 0), mean=(0.0, 1.0, 2.0, 3.0, 4.0), std=(1.0, 1.0, 1.0, 2.0, 1.0))
    x = torch.arange(5, dtype=torch.float32)[:, None, None].repeat(1, 16, 16)  # band b holds the value b
    out = BandTransform(spec, 8, train=False)(x)
    assert out.shape == (2, 8, 8) and torch.allclose(out, torch.zeros(2, 8, 8))  # (3-3)/2 and (0-0)/1
    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, 16)[None, None].repeat(5, 16, 1)
    train = BandTransform(spec, 8, train=True, crop_scale=0.3)
    views = {tuple(train(ramp)[0, 0, :2].tolist()) for _ in range(8)}
    assert len(views) > 1  # random crops / flips
    # an RGB transform's input type is refused by a band transform's reader, with the supported types named
    with pytest.raises(TypeError, match="npy/.tif path"):
        decode_for(train, object())


def test_band_settings_are_validated_and_in_chans_follows_the_data():
    assert load_config(None, ["data.dataset=x", "data.channels=13"]).backbone.in_chans == 13
    assert load_config(None, ["data.dataset=x", "data.channels=13", "data.bands=[3,2,1]"]).backbone.in_chans == 3
    assert load_config(None, ["data.dataset=x"]).backbone.in_chans is None
    for bad, msg in [
        (["data.bands=[3,2,1]"], "data.channels is null"),
        (["data.channels=4", "data.bands=[3,4]"], r"in \[0, 4\)"),
        (["data.channels=4", "data.band_mean=[1,2]"], "needs one per band"),
        (["data.channels=4", "data.band_std=[1,1,1,0]"], "must be > 0"),
        (["data.channels=4", "backbone.in_chans=3"], "leave backbone.in_chans=null"),
        (["data.channels=4", "backbone.rgb_bands=[0,1,4]"], "must index the model's 4 input bands"),
        (["data.channels=4", "backbone.rgb_bands=[0,1]"], "three distinct"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, ["data.dataset=x", *bad])


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_rgb_backbone_is_widened_with_the_documented_init(tmp_path, name):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    rgb = create_backbone(BackboneConfig(name=name, weights="none"), 0)
    save_file(rgb.state_dict(), str(tmp_path / "w.safetensors"))
    wide = create_backbone(BackboneConfig(name=name, weights=str(tmp_path / "w.safetensors"), in_chans=13,
                                          rgb_bands=[3, 2, 1]), 4)
    first = rgb.pretrained_cfg["first_conv"]
    w, w13 = rgb.get_submodule(first).weight, wide.get_submodule(first).weight
    assert w13.shape[1] == 13
    for colour, band in enumerate([3, 2, 1]):
        assert torch.allclose(w13[:, band], w[:, colour] * 3 / 13)
    for band in (0, 4, 12):
        assert torch.allclose(w13[:, band], w.mean(1) * 3 / 13)
    # a flat input gives the same first-layer response as the same value on the three colours
    conv13, conv3 = wide.get_submodule(first), rgb.get_submodule(first)
    assert torch.allclose(conv13(torch.ones(1, 13, 32, 32)), conv3(torch.ones(1, 3, 32, 32)), atol=1e-5)
    assert wide.pretrained_cfg["input_init"].startswith("widened from RGB: RGB filters copied to bands [3, 2, 1]")
    assert rgb_init(w, 1, None).shape[1] == 1
    # the rest of the network is the pretrained one
    other = [k for k in rgb.state_dict() if not k.startswith(first) and not k.startswith(("head", "fc"))]
    assert all(torch.equal(rgb.state_dict()[k], wide.state_dict()[k]) for k in other)
