"""Built-in datasets: digits, ELPV (the real 2,624 images) and Fashion-MNIST (tiny IDX files and the real ones)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from visiontune.data import SplitConfig, load_image, load_records, make_splits, read_idx
from visiontune.data.builtin import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_FILES
from visiontune.errors import ConfigError, DataError
from visiontune.registry import DATASETS


def write_idx(path: Path, arr: np.ndarray, code: int = 0x08) -> Path:
    """Write ``arr`` as an IDX file (gzip-compressed when the name ends in .gz)."""
    dtype = {0x08: ">u1", 0x0C: ">i4"}[code]
    data = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(dtype).tobytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def test_builtins_are_registered():
    assert {"digits", "elpv", "fashion-mnist"} <= set(DATASETS.names())


def test_digits():
    rec = load_records("digits")
    assert len(rec) == 1797 and rec.classes == [str(d) for d in range(10)]
    assert sum(rec.class_counts().values()) == 1797
    assert rec.items[0].dtype == np.uint8 and rec.items[0].shape == (8, 8)
    assert max(int(a.max()) for a in rec.items[:50]) == 255
    assert load_image(rec.items[0], rec.ids[0]).size == (8, 8)
    with pytest.raises(ConfigError, match="takes no root"):
        load_records("digits", root="/tmp")


def test_elpv_real_dataset():
    pytest.importorskip("elpv_dataset", reason="pip package elpv-dataset not installed")
    rec = load_records("elpv")
    counts = rec.class_counts()
    assert list(counts) == ["functional", "possibly-defective", "likely-defective", "defective"]
    assert sum(counts.values()) == len(rec) == 2624
    assert counts == {"functional": 1508, "possibly-defective": 295, "likely-defective": 106, "defective": 715}
    assert rec.ids[0] == "elpv:cell0001.png:mono"
    assert {i.rsplit(":", 1)[1] for i in rec.ids} == {"mono", "poly"}
    img = load_image(rec.items[0], rec.ids[0])
    assert img.size == (300, 300) and img.mode == "RGB"


def test_elpv_from_root_and_bad_labels(tmp_path, write_image):
    write_image(tmp_path / "images" / "c1.png", mode="L")
    write_image(tmp_path / "images" / "c2.png", mode="L", color=30)
    (tmp_path / "labels.csv").write_text("images/c1.png  0.6666666666666666  poly\nimages/c2.png  0.0  mono\n")
    rec = load_records("elpv", root=str(tmp_path))
    assert rec.labels.tolist() == [2, 0] and rec.ids == ["elpv:c1.png:poly", "elpv:c2.png:mono"]
    (tmp_path / "labels.csv").write_text("images/c1.png  0.5  poly\n")
    with pytest.raises(DataError, match=r"labels.csv line 1: defect probability 0.5 is not"):
        load_records("elpv", root=str(tmp_path))
    with pytest.raises(DataError, match="labels.csv not found"):
        load_records("elpv", root=str(tmp_path / "nowhere"))


def test_read_idx_roundtrip_and_errors(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(str(write_idx(tmp_path / "a-idx3-ubyte.gz", arr))), arr)
    wide = np.array([1, -2, 70000], dtype=np.int32)
    np.testing.assert_array_equal(read_idx(str(write_idx(tmp_path / "w-idx1-int", wide, code=0x0C))), wide)

    (tmp_path / "bad").write_bytes(b"\x89PNG....")
    with pytest.raises(DataError, match="is not an IDX file"):
        read_idx(str(tmp_path / "bad"))
    good = write_idx(tmp_path / "t-idx1-ubyte", np.arange(10, dtype=np.uint8)).read_bytes()
    (tmp_path / "t-idx1-ubyte").write_bytes(good[:-3])
    with pytest.raises(DataError, match=r"header says shape \(10,\) \(10 bytes\) but the file holds 7"):
        read_idx(str(tmp_path / "t-idx1-ubyte"))
    (tmp_path / "x.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(str(tmp_path / "x.gz"))


def _tiny_fashion(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        img_name, lbl_name = FASHION_MNIST_FILES[split]
        if not gz:
            img_name, lbl_name = img_name[:-3], lbl_name[:-3]
        write_idx(folder / img_name, rng.integers(0, 256, (n, 28, 28)).astype(np.uint8))
        write_idx(folder / lbl_name, np.arange(n) % 10)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_tiny_idx_files(tmp_path, gz):
    _tiny_fashion(tmp_path, gz=gz)
    rec = load_records("fashion-mnist", root=str(tmp_path))
    assert len(rec) == 30 and rec.classes == FASHION_MNIST_CLASSES
    assert rec.splits == ["train"] * 20 + ["test"] * 10
    assert rec.ids[0] == "fashion-mnist:train:0" and rec.ids[20] == "fashion-mnist:test:0"
    assert rec.labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert rec.items[0].shape == (28, 28)
    s = make_splits(rec, SplitConfig(train_per_class=1, seed=0))
    assert len(s["train"]) == 10 and all(i.startswith("fashion-mnist:train:") for i in s["train"].ids)
    assert sorted(s["test"].ids) == sorted(f"fashion-mnist:test:{i}" for i in range(10))


def test_fashion_mnist_missing_files_says_how_to_install(tmp_path):
    _tiny_fashion(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError) as e:
        load_records("fashion-mnist", root=str(tmp_path))
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg and "train-images" not in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.root" in msg


def test_fashion_mnist_mismatched_files(tmp_path):
    _tiny_fashion(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(5) % 10)
    with pytest.raises(DataError, match=r"train files disagree: images \(20, 28, 28\)"):
        load_records("fashion-mnist", root=str(tmp_path))


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION_MNIST_DIR, FASHION_MNIST_FILES["test"][0])),
    reason=f"real Fashion-MNIST not installed in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_real_files():
    rec = load_records("fashion-mnist")
    assert len(rec) == 70000
    assert rec.splits.count("train") == 60000 and rec.splits.count("test") == 10000
    assert set(rec.class_counts().values()) == {7000}
    s = make_splits(rec, SplitConfig(train_per_class=10, test_per_class=100, seed=0))
    assert len(s["train"]) == 100 and len(s["test"]) == 1000
    assert all(i.startswith("fashion-mnist:test:") for i in s["test"].ids)
