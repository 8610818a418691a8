"""Decoding to RGB (every PIL mode we meet in datasets), validate_images and the torch Dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.data import ImageDataset, ImageRecords, load_image, validate_images
from visiontune.errors import DataError


def _rgb(path_or_array, id=None) -> np.ndarray:
    img = load_image(path_or_array, id)
    assert img.mode == "RGB"
    return np.asarray(img)


def test_grayscale_png_becomes_rgb_with_equal_channels(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = _rgb(str(tmp_path / "g.png"))
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "d.png")
    out = _rgb(str(tmp_path / "d.png"))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_rgba_and_transparent_palette_composite_onto_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [200, 100, 50, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = _rgb(str(tmp_path / "a.png"))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0]
    assert np.abs(out[0, 2].astype(int) - [227, 177, 152]).max() <= 1

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.putpixel((1, 0), 0)
    pal.info["transparency"] = 1  # colour index 1 (green) is transparent
    pal.save(tmp_path / "p.png")
    out = _rgb(str(tmp_path / "p.png"))
    assert out[0].tolist() == [[255, 255, 255], [0, 0, 0]]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (4, 2), (10, 20, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "o.jpg", exif=exif)
    assert load_image(str(tmp_path / "o.jpg")).size == (2, 4)


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((2, 3), 7, np.uint8), [7, 7, 7]),
        (np.full((2, 3, 1), 9, np.uint8), [9, 9, 9]),
        (np.tile(np.array([1, 2, 3], np.uint8), (2, 3, 1)), [1, 2, 3]),
        (np.tile(np.array([1, 2, 3, 255], np.uint8), (2, 3, 1)), [1, 2, 3]),
        (np.full((2, 3), 0.5, np.float32), [128, 128, 128]),
        (np.full((2, 3), 65535, np.uint16), [255, 255, 255]),
    ],
)
def test_arrays_become_rgb(array, expected):
    out = _rgb(array, "arr:0")
    assert out.shape == (2, 3, 3)
    assert out[1, 2].tolist() == expected


def test_bad_arrays_raise_naming_the_id():
    with pytest.raises(DataError, match=r"image arr:5 has shape \(2, 3, 2\)"):
        load_image(np.zeros((2, 3, 2), np.uint8), "arr:5")
    with pytest.raises(DataError, match="arr:6 contains NaN"):
        load_image(np.full((2, 2), np.nan, np.float32), "arr:6")


def test_unreadable_and_missing_files_name_the_file_and_fix(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    with pytest.raises(DataError, match=r"cannot decode image manifest row 3 \(.*bad.png\).*Fix: re-export or delete"):
        load_image(str(bad), "manifest row 3")
    with pytest.raises(DataError, match=r"image .*gone.png does not exist.*Fix"):
        load_image(str(tmp_path / "gone.png"))


def test_validate_images_decode_catches_truncated_jpeg(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "t.jpg", quality=95)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    rec = ImageRecords([str(tmp_path / "t.jpg")], np.array([0]), ["t.jpg"], ["a"], None, "trunc")
    with pytest.raises(DataError, match=r"1 of 1 images in trunc are unusable:\n  - t\.jpg \(.*t\.jpg\): OSError"):
        validate_images(rec, decode=True)


def test_validate_images_checks_arrays_and_missing_paths(tmp_path):
    rec = ImageRecords(
        [np.zeros((2, 2), np.uint8), np.zeros((2,), np.uint8), str(tmp_path / "nope.png"), str(tmp_path)],
        np.zeros(4, np.int64), ["ok", "flat", "nope", "dir"], ["a"], None, "mixed",
    )
    with pytest.raises(DataError) as e:
        validate_images(rec)
    msg = str(e.value)
    assert "3 of 4 images" in msg
    assert "flat: array of shape (2,) is not an image" in msg
    assert "nope (" in msg and "file does not exist" in msg
    assert "dir (" in msg and "not a regular file" in msg
    assert "  - ok" not in msg


def test_image_dataset_with_and_without_transform(tmp_path):
    Image.new("L", (5, 4), 51).save(tmp_path / "x.png")
    rec = ImageRecords(
        [str(tmp_path / "x.png"), np.full((4, 5), 255, np.uint8)], np.array([1, 0]), ["x", "y"], ["a", "b"], None, "t"
    )
    ds = ImageDataset(rec)
    x, y = ds[0]
    assert len(ds) == 2 and y == 1 and isinstance(y, int)
    assert x.shape == (3, 4, 5) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, 0.2))
    batch_x, batch_y = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch_x.shape == (2, 3, 4, 5) and batch_y.tolist() == [1, 0]

    sized = ImageDataset(rec, transform=lambda im: im.size)
    assert sized[1] == ((5, 4), 0)
