"""``suggest`` end to end on small images and a tiny random ViT: files written, resumable features, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from visiontune.backbones import build_transform, create_backbone
from visiontune.cli import main
from visiontune.data.images import load_image
from visiontune.data.sources import load_manifest
from visiontune.errors import ConfigError, DataError
from visiontune.suggest import list_pool, suggest
from visiontune.suggest import strategies as st
from visiontune.suggest.features import open_store
from visiontune.suggest.output import HEADER


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cold_start_writes_a_manifest_with_empty_labels_a_sidecar_and_a_contact_sheet(pool, tiny_backbone, tmp_path):
    folder, truth = pool
    out = tmp_path / "picks.csv"
    r = suggest(folder, 6, out=out, strategy="typiclust", overrides=tiny_backbone, cache=tmp_path / "c", progress=False)
    rows = _rows(out)
    assert list(rows[0]) == list(HEADER) and len(rows) == 6
    assert all(row["label"] == "" and row["reason"].startswith("most typical image of cluster") for row in rows)
    assert [row["rank"] for row in rows] == [str(i) for i in range(1, 7)]
    assert all((out.parent / row["path"]).resolve().as_posix() in truth for row in rows)  # relative to the CSV
    assert len({row["path"] for row in rows}) == 6
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["strategy"] == "typiclust" and meta["pool"] == 30 and meta["budget"] == 6
    from PIL import Image
    with Image.open(r.sheet) as im:
        assert im.size == (6 * 128, 128 + 26)
    # Filled in, the CSV is a manifest the data layer reads.
    filled = [{**row, "label": truth[str((out.parent / row["path"]).resolve())]} for row in rows]
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(HEADER))
        w.writeheader()
        w.writerows(filled)
    records = load_manifest(str(out))
    assert len(records) == 6 and set(records.classes) <= {"red", "green", "blue"}


def test_same_seed_same_picks_and_features_are_reused(pool, tiny_backbone, tmp_path):
    folder, _ = pool
    a = suggest(folder, 5, out=tmp_path / "a.csv", strategy="auto", overrides=tiny_backbone, cache=tmp_path / "c",
                progress=False, seed=3)
    stores = list((tmp_path / "c").iterdir())
    mtime = (stores[0] / "features.f32").stat().st_mtime_ns
    b = suggest(folder, 5, out=tmp_path / "b.csv", strategy="auto", overrides=tiny_backbone, cache=tmp_path / "c",
                progress=False, seed=3)
    assert [p["path"] for p in a.picks] == [p["path"] for p in b.picks]
    assert a.rule == st.AUTO_COVERAGE  # cold start: no model, the measured cold-start rule
    assert list((tmp_path / "c").iterdir()) == stores and (stores[0] / "features.f32").stat().st_mtime_ns == mtime


def test_with_labeled_data_margin_uses_a_probe_and_names_two_classes(pool, image_maker, tiny_backbone, tmp_path):
    folder, _ = pool
    labeled = tmp_path / "labeled"
    image_maker(labeled, 3, seed=5, sub=True)
    r = suggest(folder, 4, out=tmp_path / "m.csv", strategy="margin", labeled=str(labeled), overrides=tiny_backbone,
                cache=tmp_path / "c", progress=False)
    assert r.classes == ["blue", "green", "red"]
    assert all(p["reason"].startswith("margin ") and " between " in p["reason"] for p in r.picks)
    margins = [float(p["reason"].split()[1]) for p in r.picks]
    assert margins == sorted(margins)


def test_labeled_images_inside_the_pool_are_not_suggested_again(pool, tiny_backbone, tmp_path):
    folder, truth = pool
    manifest = tmp_path / "lab.csv"
    chosen = sorted(truth)[:12]
    manifest.write_text("path,label\n" + "".join(f"{p},{truth[p]}\n" for p in chosen))
    r = suggest(folder, 18, out=tmp_path / "p.csv", strategy="random", labeled=str(manifest), overrides=tiny_backbone,
                cache=tmp_path / "c", progress=False)
    assert r.pool == 18 and not {p["path"] for p in r.picks} & set(chosen)


def test_feature_store_resumes_where_it_stopped(pool, tiny_backbone, tmp_path, monkeypatch):
    folder, _ = pool
    import visiontune.suggest.features as features

    monkeypatch.setattr(features, "CHUNK", 8)
    torch.manual_seed(0)

    class Spec:
        name, weights, img_size, drop_path, grad_checkpointing = "test_vit", "none", 32, 0.0, False

    model = create_backbone(Spec(), 0).eval()
    tf = build_transform(model, 32, train=False)
    paths = list_pool(folder)
    calls: list[int] = []
    stop_at = [3]

    class Stopped(Exception):
        pass

    def forward(x):
        calls.append(len(x))
        if len(calls) == stop_at[0]:
            raise Stopped  # the machine stops it in the third batch
        return model.forward_head(model.forward_features(x), pre_logits=True)

    store = open_store(tmp_path / "c", paths, {"m": "tiny"}, 32)
    with pytest.raises(Stopped):
        store.compute(forward, tf, batch_size=4, progress=False)
    assert store.done() == 8  # two batches of 4 reached the disk with their record
    calls.clear()
    stop_at[0] = -1
    feats = np.array(open_store(tmp_path / "c", paths, {"m": "tiny"}, 32).compute(forward, tf, 4, progress=False))
    assert sum(calls) == len(paths) - 8  # only the rest was computed
    with torch.inference_mode():
        x = torch.stack([tf(load_image(p)) for p in paths])
        full = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(feats, full, rtol=1e-5, atol=1e-5)


def test_a_changed_image_gets_a_new_store(pool, tmp_path):
    folder, _ = pool
    paths = list_pool(folder)
    a = open_store(tmp_path / "c", paths, {"m": 1}, 4)
    Path(paths[0]).write_bytes(Path(paths[1]).read_bytes())
    b = open_store(tmp_path / "c", paths, {"m": 1}, 4)
    assert a.folder != b.folder


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"budget": 0}, ConfigError, "--budget 0 must be a whole number of images >= 1"),
    ({"budget": 31}, ConfigError, "--budget 31 is larger than the 30 unlabeled image"),
    ({"budget": 2, "strategy": "best"}, ConfigError, "unknown strategy 'best'"),
    ({"budget": 2, "run": "nowhere"}, ConfigError, "--run 'nowhere'"),
    ({"budget": 2, "strategy": "margin"}, ConfigError, "needs a model to be uncertain about"),
])
def test_bad_input_is_refused_with_the_fix(pool, tiny_backbone, tmp_path, kwargs, error, match):
    folder, _ = pool
    with pytest.raises(error, match=match):
        suggest(folder, out=tmp_path / "p.csv", overrides=tiny_backbone, cache=tmp_path / "c", progress=False, **kwargs)


def test_empty_folder_and_a_foreign_out_file_are_refused(tmp_path, pool, tiny_backbone):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="holds no image"):
        suggest(tmp_path / "empty", 1, out=tmp_path / "p.csv", overrides=tiny_backbone, progress=False)
    mine = tmp_path / "mine.csv"
    mine.write_text("id,score\n1,2\n")
    folder, _ = pool
    with pytest.raises(ConfigError, match="is not a picks file visiontune wrote"):
        suggest(folder, 2, out=mine, overrides=tiny_backbone, cache=tmp_path / "c", progress=False)
    assert mine.read_text() == "id,score\n1,2\n"


def test_cli_writes_picks_and_reports_errors_on_one_line(pool, tiny_backbone, tmp_path, capsys):
    folder, _ = pool
    out = tmp_path / "cli.csv"
    code = main(["suggest", str(folder), "--budget", "3", "--out", str(out), "--cache", str(tmp_path / "c"), "--quiet",
                 *tiny_backbone])
    assert code == 0 and json.loads(capsys.readouterr().out)["budget"] == 3 and len(_rows(out)) == 3
    # Its own earlier picks file is replaced; a second run with the same seed gives the same file.
    before = out.read_text()
    assert main(["suggest", str(folder), "--budget", "3", "--out", str(out), "--cache", str(tmp_path / "c"), "--quiet",
                 *tiny_backbone]) == 0
    assert out.read_text() == before
    capsys.readouterr()
    assert main(["suggest", str(folder), "--budget", "-2", "--out", str(out), *tiny_backbone]) == 2
    assert "--budget -2 must be a whole number" in capsys.readouterr().err


def test_with_a_trained_run_margin_uses_its_classifier_and_labels(pool, tiny_overrides, tmp_path, monkeypatch):
    import visiontune as vt

    result = vt.train(vt.load_config(None, overrides=[*tiny_overrides, "method.name=linear", "run.name=r"]))
    folder, _ = pool
    r = suggest(folder, 5, out=tmp_path / "run.csv", strategy="auto", run=result.run_dir, cache=tmp_path / "c",
                progress=False)
    labels = [str(c) for c in range(10)]  # digits
    seen = result.metrics["run"]["train_size"] + result.metrics["run"]["val_size"]  # the run's labeled images
    assert r.classes == labels and r.rule == st.auto_choice(seen, 10, 5, True)
    # the switch point counts the images the run learned from: just under them per class, auto turns to margin
    monkeypatch.setattr(st, "AUTO_SWITCH_PER_CLASS", seen / 10 - 0.01)
    a = suggest(folder, 5, out=tmp_path / "a.csv", strategy="auto", run=result.run_dir, cache=tmp_path / "c",
                progress=False)
    assert seen >= 10 and a.rule == st.AUTO_UNCERTAINTY and a.picks[0]["reason"].startswith("margin")
    m = suggest(folder, 5, out=tmp_path / "m.csv", strategy="margin", run=result.run_dir, cache=tmp_path / "c",
                progress=False)
    for p in m.picks:
        words = p["reason"].split()
        assert words[0] == "margin" and words[3] in labels and words[5] in labels
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["run"] == str(result.run_dir) and meta["classes"] == labels
