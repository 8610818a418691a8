"""Image folders, CSV manifests and load_records: what loads, in which class order, and every error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from visiontune.data import ImageRecords, load_records
from visiontune.errors import ConfigError, DataError


# ----------------------------------------------------------------------------- image folders


def test_folder_classes_labels_and_ids(make_folder, write_image):
    root = make_folder({"dog": 2, "cat": 3})
    # Nested subfolders count, in any case of extension; hidden files/folders and non-images do not.
    write_image(root / "dog" / "sub" / "deep.JPG", color=7)
    write_image(root / "dog" / ".hidden.png")
    write_image(root / "cat" / ".ipynb_checkpoints" / "x.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()

    rec = load_records(str(root))

    assert rec.classes == ["cat", "dog"]
    assert rec.class_counts() == {"cat": 3, "dog": 3}
    assert rec.splits is None
    assert len(rec) == 6 and rec.labels.dtype == np.int64
    assert rec.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert rec.ids[-1] == os.path.join(str(root), "dog", "sub", "deep.JPG")
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in rec.items)
    assert not any(".hidden" in i or "ipynb" in i or i.endswith(".txt") for i in rec.ids)
    assert str(root) in rec.source


def test_folder_numeric_class_names_sort_numerically(make_folder):
    rec = load_records(str(make_folder({"10": 1, "2": 1, "1": 1})))
    assert rec.classes == ["1", "2", "10"]


def test_folder_with_fixed_classes_keeps_their_order(make_folder):
    rec = load_records(str(make_folder({"a": 1, "b": 2})), classes=["b", "a", "c"])
    assert rec.classes == ["b", "a", "c"]
    assert rec.class_counts() == {"b": 2, "a": 1, "c": 0}
    assert [rec.classes[k] for k in rec.labels] == ["a", "b", "b"]


def test_folder_class_outside_fixed_classes_is_named(make_folder):
    root = make_folder({"a": 1, "zebra": 1})
    with pytest.raises(DataError, match=r"\['zebra'\].*known labels \['a', 'b'\]"):
        load_records(str(root), classes=["a", "b"])


def test_empty_class_folder_is_named(make_folder):
    root = make_folder({"a": 2, "b": 0})
    (root / "b" / "readme.md").write_text("x")
    with pytest.raises(DataError) as e:
        load_records(str(root))
    assert os.path.join(str(root), "b") in str(e.value)
    assert "1 non-image files ignored" in str(e.value)


def test_folder_without_class_subfolders(tmp_path, write_image):
    write_image(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match=r"no class subfolders \(it holds 1 image files directly\)"):
        load_records(str(tmp_path / "flat"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_records(str(tmp_path / "empty"))


def test_corrupt_files_are_all_reported_not_skipped(make_folder):
    root = make_folder({"a": 3, "b": 2})
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "b" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_records(str(root))
    msg = str(e.value)
    assert "2 of 7 images" in msg
    assert "broken.png" in msg and "empty.jpg" in msg and "0 bytes" in msg
    assert "does not skip bad images" in msg


def test_many_bad_files_are_summarised(make_folder):
    root = make_folder({"a": 1})
    for i in range(25):
        (root / "a" / f"bad{i:02d}.png").write_bytes(b"nope")
    with pytest.raises(DataError) as e:
        load_records(str(root))
    msg = str(e.value)
    assert "25 of 26 images" in msg and "and 5 more" in msg
    assert "bad00.png" in msg and "bad24.png" not in msg


def test_root_with_a_folder_is_rejected(make_folder):
    with pytest.raises(ConfigError, match="remove data.root"):
        load_records(str(make_folder({"a": 1})), root="/somewhere")


# ----------------------------------------------------------------------------- unknown sources


def test_unknown_dataset_lists_builtins_and_close_match(tmp_path):
    with pytest.raises(DataError) as e:
        load_records("fashion-mnst")
    msg = str(e.value)
    assert "'fashion-mnist'" in msg and "digits" in msg and "elpv" in msg
    with pytest.raises(DataError, match="neither a built-in dataset"):
        load_records(str(tmp_path / "nope"))


def test_non_csv_file_is_rejected(tmp_path):
    (tmp_path / "data.txt").write_text("path,label\n")
    with pytest.raises(DataError, match="not a CSV manifest"):
        load_records(str(tmp_path / "data.txt"))


def test_empty_dataset_name_and_bad_class_list():
    with pytest.raises(ConfigError, match="data.dataset is empty"):
        load_records("")
    with pytest.raises(ConfigError, match="repeats"):
        load_records("digits", classes=["0", "0"])


# ----------------------------------------------------------------------------- CSV manifests


def _manifest(tmp_path: Path, write_image, text: str, files: list[str], name: str = "m.csv") -> Path:
    for i, f in enumerate(files):
        write_image(tmp_path / f, color=i * 17, mode="L")
    path = tmp_path / name
    path.write_text(text)
    return path


def test_manifest_with_split_column(tmp_path, write_image):
    files = ["img/a1.png", "img/a2.png", "img/b1.jpg", "img/b2.jpg", "img/b3.png"]
    text = (
        "\ufeffPath, Label ,split,notes\n"  # BOM, spaces and case in the header, an extra column
        "img/b1.jpg,bird,train,x\n"
        "img/a1.png,ant,Train,\n"
        "\n"  # blank lines are skipped but still counted as rows
        "img/a2.png,ant,test,\n"
        "img/b2.jpg,bird,Validation,\n"
        f"{tmp_path / 'img/b3.png'},bird,test,absolute path\n"
    )
    rec = load_records(str(_manifest(tmp_path, write_image, text, files)))
    assert rec.classes == ["ant", "bird"]  # sorted, not first-appearance order
    assert rec.labels.tolist() == [1, 0, 0, 1, 1]
    assert rec.splits == ["train", "train", "test", "val", "test"]
    assert rec.ids[0] == "m.csv row 2: img/b1.jpg"
    assert rec.ids[2] == "m.csv row 5: img/a2.png"
    assert rec.items[0] == str(tmp_path / "img" / "b1.jpg")


def test_manifest_without_split_column_and_custom_base(tmp_path, write_image):
    write_image(tmp_path / "pics" / "x.png")
    write_image(tmp_path / "pics" / "y.png", color=9)
    (tmp_path / "lists").mkdir()
    csv_path = tmp_path / "lists" / "m.csv"
    csv_path.write_text("path,label\nx.png,1\ny.png,0\n")
    rec = load_records(str(csv_path), root=str(tmp_path / "pics"))
    assert rec.splits is None
    assert rec.classes == ["0", "1"] and rec.labels.tolist() == [1, 0]


def test_manifest_missing_columns_names_header(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("file,class\na.png,x\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['path', 'label'\]; the header is \['file', 'class'\]"):
        load_records(str(p))


def test_manifest_missing_files_name_every_row(tmp_path, write_image):
    text = "path,label\nok.png,a\nmissing1.png,a\nok2.png,b\nsub/missing2.png,b\n"
    p = _manifest(tmp_path, write_image, text, ["ok.png", "ok2.png"])
    with pytest.raises(DataError) as e:
        load_records(str(p))
    msg = str(e.value)
    assert "2 bad row(s) of 4" in msg
    assert "row 3: file missing1.png does not exist" in msg
    assert "row 5: file sub/missing2.png does not exist" in msg


def test_manifest_unknown_split_and_empty_fields(tmp_path, write_image):
    text = "path,label,split\na.png,x,training\nb.png,,train\n,x,test\nc.png,x\n"
    p = _manifest(tmp_path, write_image, text, ["a.png", "b.png", "c.png"])
    with pytest.raises(DataError) as e:
        load_records(str(p))
    msg = str(e.value)
    assert "row 2: split 'training' is not one of train, val, test" in msg
    assert "row 3: empty label" in msg
    assert "row 4: empty path" in msg
    assert "row 5: 2 fields, the header has 3" in msg


def test_manifest_duplicate_file_names_both_rows(tmp_path, write_image):
    text = "path,label,split\na.png,x,train\nb.png,y,train\n./a.png,x,test\n"
    p = _manifest(tmp_path, write_image, text, ["a.png", "b.png"])
    with pytest.raises(DataError, match=r"row 4: file ./a.png is already listed in row 2 \(splits train and test\)"):
        load_records(str(p))


def test_manifest_label_outside_fixed_classes(tmp_path, write_image):
    p = _manifest(tmp_path, write_image, "path,label\na.png,cat\nb.png,emu\n", ["a.png", "b.png"])
    with pytest.raises(DataError, match=r"row 3: label 'emu' is not among the known labels \['cat', 'dog'\]"):
        load_records(str(p), classes=["cat", "dog"])
    rec = load_records(str(p), classes=["emu", "cat", "dog"])
    assert rec.labels.tolist() == [1, 0]


def test_manifest_empty_and_header_only(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="e.csv is empty"):
        load_records(str(tmp_path / "e.csv"))
    (tmp_path / "h.csv").write_text("path,label,split\n")
    with pytest.raises(DataError, match="header but no rows"):
        load_records(str(tmp_path / "h.csv"))


def test_manifest_undecodable_image_is_named_by_row(tmp_path, write_image):
    p = _manifest(tmp_path, write_image, "path,label\na.png,x\nbad.png,x\n", ["a.png"])
    (tmp_path / "bad.png").write_text("this is text")
    with pytest.raises(DataError, match=r"m.csv row 3: bad.png \(.*bad.png\): not an image"):
        load_records(str(p))


# ----------------------------------------------------------------------------- ImageRecords


def _tiny(labels: list[int], classes: list[str]) -> ImageRecords:
    items = [np.full((2, 2), i, np.uint8) for i in range(len(labels))]
    return ImageRecords(items, np.array(labels), [f"t:{i}" for i in range(len(labels))], classes, None, "tiny")


def test_records_subset_and_counts():
    rec = _tiny([0, 1, 1, 2, 0], ["a", "b", "c"])
    sub = rec.subset([4, 1])
    assert sub.ids == ["t:4", "t:1"] and sub.labels.tolist() == [0, 1]
    assert sub.class_counts() == {"a": 1, "b": 1, "c": 0}
    assert sub.classes == rec.classes and sub.source == "tiny"


def test_records_reject_inconsistent_lengths_and_labels():
    with pytest.raises(ValueError, match="lengths"):
        ImageRecords([np.zeros((2, 2), np.uint8)], np.array([0, 1]), ["x"], ["a", "b"])
    with pytest.raises(ValueError, match="labels must lie in"):
        _tiny([0, 3], ["a", "b"])


def test_builtin_with_fixed_classes_remaps_labels():
    rec = load_records("digits")
    order = [str(d) for d in reversed(range(10))] + ["extra"]
    remapped = load_records("digits", classes=order)
    assert remapped.classes == order
    assert [order[k] for k in remapped.labels[:20]] == [rec.classes[k] for k in rec.labels[:20]]
    with pytest.raises(DataError, match=r"'9' \(e.g. digits:9\).*not among the known labels"):
        load_records("digits", classes=[str(d) for d in range(9)])
