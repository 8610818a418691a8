"""Decoded-image cache and gray-aware transforms: the same tensors as ImageDataset, decoded once, bounded memory."""

from __future__ import annotations

import gc
import random

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.backbones import build_transform
from visiontune.backbones.tiny import TINY_IMG_SIZE
from visiontune.data import ImageDataset, ImageRecords
from visiontune.data import cache as dc


def _noise(path, mode: str, seed: int, size=(37, 29)):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        arr = rng.integers(0, 65535, size=size[::-1], dtype=np.uint16)
        Image.fromarray(arr).save(path)
    else:
        bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        arr = rng.integers(0, 256, size=(*size[::-1], bands), dtype=np.uint8)
        Image.fromarray(arr[..., 0] if bands == 1 else arr, mode).save(path)
    return str(path)


@pytest.fixture
def records(tmp_path) -> ImageRecords:
    """Gray, RGB, RGBA and 16-bit PNGs, a gray JPEG and in-memory gray / RGB arrays."""
    items: list = [
        _noise(tmp_path / "g.png", "L", 0), _noise(tmp_path / "c.png", "RGB", 1), _noise(tmp_path / "a.png", "RGBA", 2),
        _noise(tmp_path / "w.png", "I;16", 3), _noise(tmp_path / "j.jpg", "L", 4),
        np.random.default_rng(5).integers(0, 256, (20, 24), dtype=np.uint8),
        np.random.default_rng(6).integers(0, 256, (20, 24, 3), dtype=np.uint8),
    ]
    return ImageRecords(items=items, labels=np.arange(len(items)) % 2, ids=[f"im{i}" for i in range(len(items))], classes=["a", "b"])


@pytest.fixture(scope="module")
def model():
    import timm

    import visiontune.backbones  # noqa: F401  (registers test_vit)

    return timm.create_model("test_vit", num_classes=2)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("cache", [False, True])
def test_same_tensors_as_image_dataset(records, model, train, cache):
    tf = build_transform(model, TINY_IMG_SIZE, train=train)
    ref = ImageDataset(records, tf)
    fast = dc.image_dataset(records, tf, cache=cache)
    for i in range(len(records)):
        for seed in range(3):  # random crops/flips: same draws, same pixels
            torch.manual_seed(seed)
            random.seed(seed)
            a, ya = ref[i]
            torch.manual_seed(seed)
            random.seed(seed)
            b, yb = fast[i]
            assert ya == yb and torch.equal(a, b), (records.ids[i], train, cache)


def test_gray_images_stored_with_one_channel_and_shared(records):
    store = dc.decoded_images(records)
    assert store.cached == len(records)
    shapes = {records.ids[i]: a.shape for i, a in enumerate(store.arrays)}
    assert shapes["im0"] == (29, 37) and shapes["im4"] == (29, 37) and shapes["im5"] == (20, 24)
    assert shapes["im1"] == (29, 37, 3) and shapes["im3"] == (29, 37, 3)  # 16-bit goes through load_image -> RGB
    assert dc.decoded_images(records) is store  # one store per records object, shared by its datasets
    assert dc.decoded_images(records.subset(range(len(records)))) is not store


def test_store_released_with_its_records(tmp_path):
    recs = ImageRecords(items=[np.zeros((4, 4), np.uint8)], labels=[0], ids=["x"], classes=["a"])
    key = id(recs)
    dc.decoded_images(recs)
    assert key in dc._STORES
    del recs
    gc.collect()
    assert key not in dc._STORES


def test_budget_keeps_the_rest_on_disk(records, model):
    tf = build_transform(model, TINY_IMG_SIZE, train=False)
    store = dc.DecodedImages(records, budget_mb=(29 * 37 * 2 + 1) / 2**20).fill()  # room for two gray images
    assert store.cached == 1 and store.nbytes <= store.budget_bytes
    ds = dc.CachedImageDataset(records, tf, store)
    ref = ImageDataset(records, tf)
    assert all(torch.equal(ds[i][0], ref[i][0]) for i in range(len(records)))


def test_bad_file_still_raises_data_error(tmp_path):
    from visiontune.errors import DataError

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    recs = ImageRecords(items=[str(bad)], labels=[0], ids=["bad.png"], classes=["a"])
    with pytest.raises(DataError, match="bad.png"):
        dc.DecodedImages(recs).fill()
