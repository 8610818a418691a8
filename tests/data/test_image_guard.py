"""The one decoding guard (issue 18, items 7 and 8): size limits read from the header, reduced JPEG decoding,
every decoder failure reported as that file's DataError, and the up-front dataset check decoding fully."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from visiontune.cli import main
from visiontune.config import DataConfig
from visiontune.data import ImageRecords, load_image, load_records, validate_images
from visiontune.data.cache import decode_compact
from visiontune.data.images import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_PIXELS,
    ImageLimits,
    ImageTooLargeError,
    decode_image,
)
from visiontune.errors import ConfigError, DataError

# PIL warns about the 144-megapixel headers below at open; refusing them is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def fuzzed_dds() -> bytes:
    """A DDS header with no pixel-format flags: PIL's DDS plugin raises NotImplementedError on it."""
    header = bytearray(120)
    struct.pack_into("<3I", header, 0, 0x1007, 4, 4)  # flags, height, width
    return b"DDS " + struct.pack("<I", 124) + bytes(header) + bytes(64)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but whose pixel data is garbage: decoding it would fail."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib at all") + chunk(b"IEND", b"")


def jpeg(size: tuple[int, int], quality: int = 90) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_defaults_agree_with_the_config_and_the_cli() -> None:
    from visiontune.cli import build_parser

    assert DataConfig().max_pixels == DEFAULT_MAX_PIXELS and DataConfig().max_aspect == DEFAULT_MAX_ASPECT
    serve = build_parser().parse_args(["serve", "--adapter", "x"])
    assert serve.max_pixels == DEFAULT_MAX_PIXELS and serve.max_aspect == DEFAULT_MAX_ASPECT
    assert "data.max_pixels=0 must be >= 1" in str(DataConfig(dataset="x", max_pixels=0).problems())
    with pytest.raises(ConfigError, match="--max-aspect=0.5 is invalid"):
        ImageLimits(100, 0.5, "--max-pixels", "--max-aspect")


def test_too_many_pixels_is_refused_from_the_header_before_decoding(tmp_path: Path) -> None:
    # The pixel data is garbage: a size error (not a decode error) proves nothing was decoded.
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(12_000, 12_000))
    limits = DataConfig(dataset="x").image_limits()
    with pytest.raises(ImageTooLargeError) as e:
        load_image(str(path), "huge.png", limits)
    msg = str(e.value)
    assert "huge.png" in msg and "12000 x 12000 = 144,000,000 pixels" in msg and "40,000,000" in msg
    assert "raise data.max_pixels" in msg
    with pytest.raises(ImageTooLargeError, match=r"over the limit of 100 decoded pixels \(max_pixels\)"):
        decode_image(png_header_only(11, 10), "upload", ImageLimits(max_pixels=100))
    with pytest.raises(DataError, match="cannot decode"):  # within the limit: decoding it is what fails
        decode_image(png_header_only(10, 10), "upload", ImageLimits(max_pixels=100))


def test_thin_strips_are_refused_by_aspect_ratio(tmp_path: Path) -> None:
    Image.new("L", (60_000, 1)).save(tmp_path / "strip.png")
    with pytest.raises(ImageTooLargeError, match=r"60000 x 1 pixels, an aspect ratio of 6e\+04:1, beyond the limit of 20:1"):
        load_image(str(tmp_path / "strip.png"))
    with pytest.raises(ImageTooLargeError, match=r"beyond the limit of 20:1 \(max_aspect\)"):
        decode_image(np.zeros((1, 21), np.uint8), "arr")
    assert decode_image(np.zeros((1, 21), np.uint8), "arr", ImageLimits(max_aspect=21)).size == (21, 1)


def test_large_jpegs_decode_reduced_only_when_over_the_limit() -> None:
    data = jpeg((800, 600))
    assert decode_image(data).size == (800, 600)  # within the limit: the same pixels as always
    full = np.asarray(decode_image(data), dtype=np.float64)
    reduced = decode_image(data, limits=ImageLimits(max_pixels=100_000))  # 1/2 = 120,000 px: too many; 1/4 fits
    assert reduced.size == (200, 150) and reduced.mode == "RGB"
    # A DCT-scaled decode is close to the image's block means, not garbage.
    means = full.reshape(150, 4, 200, 4, 3).mean(axis=(1, 3))
    assert np.abs(np.asarray(reduced, dtype=np.float64) - means).mean() < 20
    with pytest.raises(ImageTooLargeError, match=r"\(decoded at 1/8 scale\) is 100 x 75 = 7,500 pixels"):
        decode_image(data, "big.jpg", ImageLimits(max_pixels=5_000))


@pytest.mark.skipif(not features.check("jpg_2000"), reason="PIL built without OpenJPEG")
def test_large_jpeg2000_decodes_reduced() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (256, 192), (10, 200, 30)).save(buf, "JPEG2000")
    img = decode_image(buf.getvalue(), limits=ImageLimits(max_pixels=20_000))
    assert img.size == (128, 96) and np.abs(np.asarray(img).astype(int) - (10, 200, 30)).max() <= 3


@pytest.mark.parametrize("as_path", [True, False])
def test_any_decoder_failure_is_that_files_data_error(tmp_path: Path, as_path: bool) -> None:
    """A fuzzed DDS made PIL raise NotImplementedError, which escaped every caller (issue 18, item 8)."""
    (tmp_path / "fuzz.png").write_bytes(fuzzed_dds())
    item = str(tmp_path / "fuzz.png") if as_path else fuzzed_dds()
    with pytest.raises(DataError, match=r"cannot decode .*NotImplementedError: Unknown pixel format flags 0") as e:
        decode_image(item, "fuzz.png")
    assert not isinstance(e.value, ImageTooLargeError) and isinstance(e.value.__cause__, NotImplementedError)
    with pytest.raises(DataError, match="NotImplementedError"):
        decode_compact(str(tmp_path / "fuzz.png"), "fuzz.png")


def test_validate_images_lists_every_bad_file_and_decodes_truncated_jpegs(tmp_path: Path) -> None:
    good = jpeg((64, 48))
    (tmp_path / "good.jpg").write_bytes(good)
    (tmp_path / "cut.jpg").write_bytes(good[:-10])  # only its last bytes missing: PIL's verify() accepts it
    (tmp_path / "fuzz.png").write_bytes(fuzzed_dds())
    (tmp_path / "huge.png").write_bytes(png_header_only(12_000, 12_000))
    names = ["good.jpg", "cut.jpg", "fuzz.png", "huge.png"]
    rec = ImageRecords([str(tmp_path / n) for n in names], np.zeros(4, np.int64), names, ["a"], None, "guard")
    with pytest.raises(DataError) as e:
        validate_images(rec, limits=DataConfig(dataset="x").image_limits())
    msg = str(e.value)
    assert "3 of 4 images in guard are unusable" in msg and "good.jpg" not in msg
    assert "cut.jpg" in msg and "image file is truncated" in msg
    assert "fuzz.png" in msg and "NotImplementedError: Unknown pixel format flags 0" in msg
    assert "huge.png" in msg and "data.max_pixels" in msg


def test_train_on_a_folder_with_a_fuzzed_file_is_a_clean_error(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture,
) -> None:
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / "data" / label / f"{i}.png")
    (tmp_path / "data" / "b" / "fuzz.png").write_bytes(fuzzed_dds())
    overrides = [o for o in tiny_overrides if not o.startswith("data.")]
    assert main(["train", *overrides, f"data.dataset={tmp_path / 'data'}", "data.train_per_class=1"]) == 2
    err = capsys.readouterr().err
    assert "visiontune: error: 1 of 7 images" in err and "fuzz.png" in err and "NotImplementedError" in err
    assert "Traceback" not in err
    with pytest.raises(DataError, match="fuzz.png"):
        load_records(str(tmp_path / "data"))
