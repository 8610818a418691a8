"""benchmarks/datasets.py: the extraction rules on a tiny git repository built here, and the dataset table."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "datasets.py"
LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")


@pytest.fixture(scope="module")
def ds(script_module):
    yield script_module("visiontune_bench_datasets", SCRIPT)
    sys.modules.pop("visiontune_bench_datasets", None)


def _image(fmt: str, value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (value, 255 - value, (value * 7) % 256)).save(buf, format=fmt)
    return buf.getvalue()


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory):
    """A git repository whose pinned commit has, for classes a (two folders), b and excluded x:

    - a: 7 distinct images (PNG and JPEG, upper-case .JPG too), one more copy of an a-image in the second
      folder (an exact duplicate), an image also filed under b, a Git LFS pointer named .png, a text file,
      a same-named but different image in both folders, and an image in a sub-folder (not a class member);
    - b: 2 own images, the image shared with a, and one shared with the excluded class x;
    - x: 1 own image and the one shared with b;
    - c: the files of data/mixed/ named c_* (2 of 3: the label is in the file name).

    A later commit adds an image to b; extraction at the pinned commit must not see it.
    """
    repo = tmp_path_factory.mktemp("toy") / "repo"
    files: dict[str, bytes] = {}
    for i in range(5):
        files[f"data/a1/img{i}.png"] = _image("PNG", 10 + i)
    files["data/a2/photo5.jpg"] = _image("JPEG", 60)
    files["data/a2/photo6.JPG"] = _image("JPEG", 70)
    files["data/a2/copy_of_img0.png"] = files["data/a1/img0.png"]
    files["data/a1/shared.png"] = _image("PNG", 100)
    files["data/b/shared_too.png"] = files["data/a1/shared.png"]
    files["data/a1/pointer.png"] = LFS_POINTER
    files["data/a1/readme.txt"] = b"not an image"
    files["data/a1/same.png"] = _image("PNG", 120)
    files["data/a2/same.png"] = _image("PNG", 130)
    files["data/a1/nested/deep.png"] = _image("PNG", 140)
    files["data/b/b0.png"] = _image("PNG", 150)
    files["data/b/b1.jpeg"] = _image("JPEG", 160)
    files["data/x/x0.png"] = _image("PNG", 170)
    files["data/x/x_b.png"] = _image("PNG", 180)
    files["data/b/also_in_x.png"] = files["data/x/x_b.png"]
    files["data/mixed/c_1.png"] = _image("PNG", 190)
    files["data/mixed/c_2.jpg"] = _image("JPEG", 195)
    files["data/mixed/d_1.png"] = _image("PNG", 198)
    for rel, data in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(data)
    _git(repo.parent, "init", "-q", str(repo))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "pinned")
    pinned = _git(repo, "rev-parse", "HEAD")
    (repo / "data/b/later.png").write_bytes(_image("PNG", 200))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "later")
    return repo, pinned, files


def _spec(ds, commit: str, **kw):
    base = dict(name="toy", family="test", domain="test", repo="someone/toy", commit=commit,
                classes={"a": ("data/a1", "data/a2"), "b": ("data/b",), "c": ("data/mixed/c_*",), "x": ("data/x",)},
                exclude=("x",), licence="CC0 (test)", labels="folder name", notes="built by the test",
                counts={"a": 9, "b": 2, "c": 2})
    base.update(kw)
    return ds.GitDataset(**base)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rules_on_a_clone(ds, toy_repo, tmp_path):
    repo, pinned, files = toy_repo
    dest = ds.extract(_spec(ds, pinned), str(repo), str(tmp_path / "out"), log=lambda _: None)
    tree = _tree(dest)
    images = {k: v for k, v in tree.items() if k != "PROVENANCE.json"}
    # a: img0-4, photo5.jpg, photo6.JPG, same.png twice (the clash renamed by its path); not the duplicate copy,
    # not the image also filed under b, not the pointer, the text file or the nested image.
    assert sorted(images) == sorted(["a/img0.png", "a/img1.png", "a/img2.png", "a/img3.png", "a/img4.png",
                                     "a/photo5.jpg", "a/photo6.JPG", "a/same.png", "a/data__a2__same.png",
                                     "b/b0.png", "b/b1.jpeg", "c/c_1.png", "c/c_2.jpg"])
    # Byte-for-byte copies of the pinned commit's files.
    assert images["a/same.png"] == files["data/a1/same.png"]
    assert images["a/data__a2__same.png"] == files["data/a2/same.png"]
    assert images["b/b1.jpeg"] == files["data/b/b1.jpeg"]
    assert not (dest / "x").exists()


def test_provenance_records_source_rules_and_counts(ds, toy_repo, tmp_path):
    repo, pinned, files = toy_repo
    dest = ds.extract(_spec(ds, pinned), str(repo), str(tmp_path), log=lambda _: None)
    prov = json.loads((dest / "PROVENANCE.json").read_text())
    assert prov["source"] == "github:someone/toy" and prov["commit"] == pinned
    assert prov["licence"] == "CC0 (test)" and prov["labels"] == "folder name" and prov["notes"] == "built by the test"
    assert prov["class_to_source_folders"] == {"a": ["data/a1", "data/a2"], "b": ["data/b"], "c": ["data/mixed/c_*"],
                                               "x": ["data/x"]}
    assert prov["excluded_classes"] == ["x"] and prov["max_per_class"] == 300
    assert prov["images_per_class"] == {"a": 9, "b": 2, "c": 2} and prov["total_images"] == 13
    counts = prov["source_counts"]
    assert counts["a"]["lfs_pointers_skipped"] == 1 and counts["a"]["dropped_cross_class"] == 1
    assert counts["a"]["dropped_duplicates"] == 1 and counts["a"]["image_files"] == 11
    assert counts["b"]["dropped_cross_class"] == 2 and counts["b"]["image_files"] == 4
    assert counts["x"] == {"image_files": 2, "lfs_pointers_skipped": 0, "non_images_skipped": 0, "excluded": True}
    # Every output file names its source path and the SHA-1 of its bytes, which match the copy.
    assert set(prov["files"]) == {k for k in _tree(dest) if k != "PROVENANCE.json"}
    for out_rel, rec in prov["files"].items():
        data = (dest / out_rel).read_bytes()
        assert data == files[rec["source"]] and hashlib.sha1(data).hexdigest() == rec["sha1"]
    assert prov["image_modes"] == {"RGB": prov["total_images"]} and prov["image_sizes"] == {"8x6": prov["total_images"]}
    assert "floor(i*n/300)" in prov["selection"] and "LFS" in prov["selection"]


def test_bare_dir_and_plain_folder_give_the_same_bytes(ds, toy_repo, tmp_path):
    """A bare git dir and a clone are read at the pinned commit (the later commit's image is not seen); a plain
    folder of the pinned commit's files gives the same dataset."""
    repo, pinned, _ = toy_repo
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True)
    plain = tmp_path / "plain"
    plain.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", pinned], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(plain)], input=archive, check=True)
    outs = {}
    for kind, src in {"clone": repo, "bare": bare, "plain": plain}.items():
        dest = ds.extract(_spec(ds, pinned), str(src), str(tmp_path / kind), log=lambda _: None)
        outs[kind] = {k: v for k, v in _tree(dest).items() if k != "PROVENANCE.json"}
        assert "b/later.png" not in outs[kind]
    assert outs["clone"] == outs["bare"] == outs["plain"]
    prov = json.loads((tmp_path / "plain" / "toy" / "PROVENANCE.json").read_text())
    assert "could not be checked" in prov["read_from"]


def test_cap_takes_evenly_spaced_files_deterministically(ds, toy_repo, tmp_path):
    repo, pinned, _ = toy_repo
    spec = _spec(ds, pinned)
    first = ds.extract(spec, str(repo), str(tmp_path / "one"), max_per_class=3, log=lambda _: None)
    again = ds.extract(spec, str(repo), str(tmp_path / "two"), max_per_class=3, log=lambda _: None)
    assert {k: v for k, v in _tree(first).items() if k != "PROVENANCE.json"} == \
        {k: v for k, v in _tree(again).items() if k != "PROVENANCE.json"}
    # Class a's 9 clean files sorted by path: a1/img0..img4, a1/same, a2/photo5, a2/photo6.JPG, a2/same
    # -> indices 0, 3, 6 = img0, img3, photo5.
    prov = json.loads((first / "PROVENANCE.json").read_text())
    kept_a = sorted(rec["source"] for k, rec in prov["files"].items() if k.startswith("a/"))
    assert kept_a == ["data/a1/img0.png", "data/a1/img3.png", "data/a2/photo5.jpg"]
    assert prov["max_per_class"] == 3 and prov["images_per_class"] == {"a": 3, "b": 2, "c": 2}
    assert ds.evenly_spaced(list(range(10)), 4) == [0, 2, 5, 7] and ds.evenly_spaced([1, 2], 4) == [1, 2]


def test_errors_name_the_problem_and_the_fix(ds, toy_repo, tmp_path):
    repo, pinned, _ = toy_repo
    with pytest.raises(ds.ExtractError, match=r"commit 0{40} is not in the git repository.*Fix: fetch it"):
        ds.extract(_spec(ds, "0" * 40), str(repo), str(tmp_path), log=lambda _: None)
    with pytest.raises(ds.ExtractError, match=r"differ from the recorded ones.*'a': \(5, 9\)"):
        ds.extract(_spec(ds, pinned, counts={"a": 5, "b": 2, "c": 2}), str(repo), str(tmp_path), log=lambda _: None)
    assert not (tmp_path / "toy").exists()  # nothing half-written
    with pytest.raises(ds.ExtractError, match=r"no images for class\(es\) \['b'\]"):
        ds.extract(_spec(ds, pinned, classes={"a": ("data/a1",), "b": ("data/nope",)}, exclude=()),
                   str(repo), str(tmp_path), log=lambda _: None)
    ds.extract(_spec(ds, pinned), str(repo), str(tmp_path), log=lambda _: None)
    with pytest.raises(ds.ExtractError, match="already exists. Fix: remove it"):
        ds.extract(_spec(ds, pinned), str(repo), str(tmp_path), log=lambda _: None)
    ds.extract(_spec(ds, pinned), str(repo), str(tmp_path), replace=True, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # no temporary folders left behind


def test_cli_extract_and_builtin_refusal(ds, toy_repo, tmp_path, monkeypatch, capsys):
    repo, pinned, _ = toy_repo
    monkeypatch.setitem(ds.DATASETS, "toy", _spec(ds, pinned))
    assert ds.main(["extract", "toy", "--repo", str(repo), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "toy" / "PROVENANCE.json").is_file()
    assert ds.main(["extract", "elpv", "--repo", str(repo), "--out", str(tmp_path)]) == 2
    assert "built in" in capsys.readouterr().err
    assert ds.main(["extract", "nope", "--repo", str(repo), "--out", str(tmp_path)]) == 2


def test_table_is_complete_and_markdown_is_current(ds, capsys):
    git = [d for d in ds.DATASETS.values() if isinstance(d, ds.GitDataset)]
    builtin = [d for d in ds.DATASETS.values() if isinstance(d, ds.BuiltinDataset)]
    assert {d.name for d in builtin} == {"elpv", "fashion-mnist", "digits"}
    # Issue 28's meta-benchmark asks for at least 12 datasets from at least 6 kinds of imagery.
    assert len(ds.DATASETS) >= 12 and len({d.family for d in ds.DATASETS.values()}) >= 6
    for d in git:
        assert re.fullmatch(r"[0-9a-f]{40}", d.commit), d.name
        assert set(d.counts) == set(d.kept_classes), d.name  # a recorded count for every written class
        assert set(d.exclude) <= set(d.classes) and d.licence and d.labels and d.domain, d.name
    assert (Path(SCRIPT).parent / "datasets" / "DATASETS.md").read_text() == ds.render_markdown(), \
        "DATASETS.md is stale: run python benchmarks/datasets.py markdown"
    assert ds.main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ds.DATASETS)


def test_subset_copies_n_per_class_nested_over_n_and_never_overwrites(ds, tmp_path):
    src = tmp_path / "src"
    for c, n in (("a", 6), ("b", 5)):
        (src / c).mkdir(parents=True)
        for i in range(n):
            (src / c / f"{i:02d}.png").write_bytes(_image("PNG", 10 * i + len(c)))
    (src / "a" / "notes.txt").write_text("not an image")
    (src / "PROVENANCE.json").write_text("{}")
    three = ds.subset(str(src), str(tmp_path / "three"), 3, seed=1)
    assert {c: len(v) for c, v in three.items()} == {"a": 3, "b": 3}
    assert sorted(p.name for p in (tmp_path / "three" / "a").iterdir()) == three["a"]
    record = json.loads((tmp_path / "three" / "SUBSET.json").read_text())
    assert record["files"] == three and record["seed"] == 1
    assert (tmp_path / "three" / "a" / three["a"][0]).read_bytes() == (src / "a" / three["a"][0]).read_bytes()
    four = ds.subset(str(src), str(tmp_path / "four"), 4, seed=1)
    assert all(set(three[c]) <= set(four[c]) for c in three)
    assert ds.subset(str(src), str(tmp_path / "again"), 3, seed=1) == three
    with pytest.raises(ds.ExtractError, match="exists.*--replace"):
        ds.subset(str(src), str(tmp_path / "three"), 2, seed=1)
    assert ds.subset(str(src), str(tmp_path / "three"), 2, seed=1, replace=True)["b"] != []
    with pytest.raises(ds.ExtractError, match="fewer than --per-class"):
        ds.subset(str(src), str(tmp_path / "six"), 6)
    with pytest.raises(ds.ExtractError, match="no class folders"):
        ds.subset(str(tmp_path / "missing"), str(tmp_path / "x"), 1)
    assert not (tmp_path / "six").exists()
