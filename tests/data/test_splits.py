"""Stratified seeded splits: exact per-class counts, determinism, nesting, explicit splits, leaks, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from visiontune.data import ImageRecords, SplitConfig, check_no_leak, describe_splits, make_splits
from visiontune.errors import ConfigError, DataError


def _records(counts: list[int], splits: list[str] | None = None) -> ImageRecords:
    """In-memory records with ``counts[c]`` images of class c (ids r:0, r:1, ...)."""
    labels = np.repeat(np.arange(len(counts)), counts)
    n = len(labels)
    items = [np.full((2, 2), i % 256, np.uint8) for i in range(n)]
    return ImageRecords(items, labels, [f"r:{i}" for i in range(n)], [f"c{k}" for k in range(len(counts))],
                        splits, "synthetic")


def _ids(rec: ImageRecords) -> set[str]:
    return set(rec.ids)


def test_per_class_counts_are_exact_and_splits_disjoint():
    rec = _records([10, 7, 12])
    s = make_splits(rec, SplitConfig(train_per_class=3, val_per_class=2, seed=0))
    assert s["train"].class_counts() == {"c0": 3, "c1": 3, "c2": 3}
    assert s["val"].class_counts() == {"c0": 2, "c1": 2, "c2": 2}
    assert s["test"].class_counts() == {"c0": 5, "c1": 2, "c2": 7}
    a, b, c = _ids(s["train"]), _ids(s["val"]), _ids(s["test"])
    assert not (a & b or a & c or b & c)
    assert a | b | c == set(rec.ids)
    # each split keeps the records' original order
    for part in s.values():
        assert [int(i[2:]) for i in part.ids] == sorted(int(i[2:]) for i in part.ids)


def test_same_seed_same_split_other_seed_differs():
    rec = _records([30, 30])
    cfg = SplitConfig(train_per_class=5, seed=3)
    assert make_splits(rec, cfg)["train"].ids == make_splits(rec, cfg)["train"].ids
    other = make_splits(rec, SplitConfig(train_per_class=5, seed=4))["train"].ids
    assert other != make_splits(rec, cfg)["train"].ids


def test_few_shot_splits_are_nested_across_sizes():
    rec = _records([40, 40, 40])
    small = _ids(make_splits(rec, SplitConfig(train_per_class=2, seed=1))["train"])
    large = _ids(make_splits(rec, SplitConfig(train_per_class=8, seed=1))["train"])
    assert small < large


def test_a_class_split_ignores_other_classes_sizes():
    def class1_positions(counts: list[int]) -> list[int]:
        train = make_splits(_records(counts), SplitConfig(train_per_class=4, seed=0))["train"]
        return [int(i[2:]) - counts[0] for i, y in zip(train.ids, train.labels) if y == 1]

    assert class1_positions([5, 20]) == class1_positions([50, 20])


def test_test_cap_per_class():
    s = make_splits(_records([20, 6]), SplitConfig(train_per_class=2, test_per_class=5))
    assert s["test"].class_counts() == {"c0": 5, "c1": 4}
    assert len(s["val"]) == 0


def test_fractions_and_default():
    s = make_splits(_records([10, 3]), SplitConfig(train_fraction=0.5, val_fraction=0.2))
    assert s["train"].class_counts() == {"c0": 5, "c1": 1}  # 1.5 rounds to 2, then shrinks to keep a test image
    assert s["val"].class_counts() == {"c0": 2, "c1": 1}
    assert s["test"].class_counts() == {"c0": 3, "c1": 1}
    default = make_splits(_records([10, 2]), SplitConfig())
    assert default["train"].class_counts() == {"c0": 8, "c1": 1}  # 0.8 of 2 rounds to 2, shrinks to 1
    assert default["test"].class_counts() == {"c0": 2, "c1": 1}


def test_too_few_images_names_class_and_counts():
    with pytest.raises(DataError) as e:
        make_splits(_records([10, 5, 3]), SplitConfig(train_per_class=3, val_per_class=1))
    msg = str(e.value)
    assert "class 'c2' has 3 images in the dataset, fewer than the 5 the split needs (3 train + 1 val + 1 test)" in msg
    assert "'c1'" not in msg and "'c0'" not in msg
    assert "lower data.train_per_class" in msg
    with pytest.raises(DataError, match="class 'c1' has 1 images"):
        make_splits(_records([5, 1]), SplitConfig(train_fraction=0.5))


def test_contradictory_settings_are_config_errors():
    with pytest.raises(ConfigError) as e:
        make_splits(_records([5]), SplitConfig(train_per_class=2, train_fraction=0.5, val_fraction=1.5))
    assert "both set" in str(e.value) and "val_fraction=1.5" in str(e.value)


def test_explicit_split_samples_within_the_train_pool():
    splits = (["train"] * 8 + ["test"] * 4) * 2
    rec = _records([12, 12], splits)
    s = make_splits(rec, SplitConfig(train_per_class=3, val_per_class=2, seed=0))
    train_rows = {f"r:{i}" for i, sp in enumerate(splits) if sp == "train"}
    test_rows = {f"r:{i}" for i, sp in enumerate(splits) if sp == "test"}
    assert _ids(s["train"]) <= train_rows and s["train"].class_counts() == {"c0": 3, "c1": 3}
    assert _ids(s["val"]) <= train_rows and s["val"].class_counts() == {"c0": 2, "c1": 2}
    assert _ids(s["test"]) == test_rows  # the official test rows, all of them
    capped = make_splits(rec, SplitConfig(train_per_class=3, test_per_class=1))
    assert _ids(capped["test"]) <= test_rows and len(capped["test"]) == 2
    # with no train setting, every train row trains
    assert _ids(make_splits(rec, SplitConfig())["train"]) == train_rows


def test_explicit_val_rows_and_missing_test_rows():
    splits = ["train"] * 6 + ["val"] * 2
    rec = _records([8], splits)
    s = make_splits(rec, SplitConfig(train_per_class=2))
    assert _ids(s["val"]) == {"r:6", "r:7"}
    assert len(s["train"]) == 2 and len(s["test"]) == 4  # no test rows: the rest of the train pool tests
    assert not _ids(s["test"]) & {"r:6", "r:7"}
    default = make_splits(rec, SplitConfig())
    assert len(default["train"]) == 5 and len(default["test"]) == 1  # 0.8 of the 6 train rows


def test_explicit_split_without_train_rows():
    with pytest.raises(DataError, match="no 'train' rows"):
        make_splits(_records([3], ["test"] * 3), SplitConfig())


def test_leak_of_the_same_file_in_two_splits_is_named(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    os.symlink(tmp_path / "a.png", tmp_path / "link.png")
    train = ImageRecords([str(tmp_path / "a.png")], np.array([0]), ["rows 2"], ["k"], None, "m")
    test = ImageRecords([str(tmp_path / "sub" / ".." / "link.png")], np.array([0]), ["rows 9"], ["k"], None, "m")
    with pytest.raises(DataError) as e:
        check_no_leak({"train": train, "val": train.subset([]), "test": test})
    msg = str(e.value)
    assert "a.png: train (rows 2), test (rows 9)" in msg
    check_no_leak({"train": train, "test": train.subset([])})  # no shared file: no error


def test_make_splits_runs_the_leak_check(tmp_path):
    # Two records pointing at one file (e.g. a symlinked copy) must not end up in train and test.
    (tmp_path / "a.png").write_bytes(b"x")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    rec = ImageRecords([str(tmp_path / "a.png"), str(tmp_path / "b.png")], np.array([0, 0]), ["a", "b"], ["k"])
    with pytest.raises(DataError, match="more than one split"):
        make_splits(rec, SplitConfig(train_per_class=1))


def test_describe_splits_table():
    s = make_splits(_records([6, 4]), SplitConfig(train_per_class=2, val_per_class=1))
    lines = describe_splits(s).splitlines()
    assert lines[0].split() == ["class", "train", "val", "test"]
    assert lines[2].split() == ["c0", "2", "1", "3"]
    assert lines[3].split() == ["c1", "2", "1", "1"]
    assert lines[-1].split() == ["total", "4", "2", "4"]
