"""The labeling page of ``visiontune suggest`` in headless Chromium: pick -> label (keys, undo) -> manifest -> train."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"no Chromium at {CHROMIUM}: install it with `apt-get install -y chromium` (.ci/run does) to run the browser test",
)
TINY = ["backbone.name=test_vit", "backbone.weights=none", "backbone.img_size=32"]


def _images_helper() -> Any:
    spec = importlib.util.spec_from_file_location("visiontune_test_suggest_images",
                                                  Path(__file__).parents[1] / "suggest" / "_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IMAGES = _images_helper()
COLOURS = IMAGES.COLOURS


def _images(folder: Path, per: int, seed: int, sub: bool) -> dict[str, str]:
    """File name -> colour of the images made under ``folder``."""
    return {Path(p).name: c for p, c in IMAGES.make_images(folder, per, seed, sub).items()}


def _labels(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return [r["label"] for r in csv.DictReader(f)]


def _settled(page: Any, labeled: int) -> None:
    """Wait until the page has saved and shows ``labeled`` labeled picks."""
    try:
        page.wait_for_function(
            "n => { const s = document.getElementById('status'); return s.dataset.dirty === 'false' && s.dataset.labeled == n }",
            arg=str(labeled))
    except Exception:
        print("page status at the timeout:", page.text_content("#status"), page.eval_on_selector("#status", "s => JSON.stringify(s.dataset)"))
        raise


def test_pick_label_with_keys_undo_then_train_on_the_manifest(tmp_path: Path, live_server_cls: Any) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (serve extra)")
    import visiontune as vt
    from visiontune.suggest import suggest
    from visiontune.suggest.label import create_label_app

    truth = _images(tmp_path / "pool", 8, seed=0, sub=False)
    _images(tmp_path / "labeled", 2, seed=1, sub=True)
    out = tmp_path / "picks.csv"
    r = suggest(tmp_path / "pool", 24, out=out, strategy="margin", labeled=str(tmp_path / "labeled"), overrides=TINY,
                cache=tmp_path / "cache", progress=False)
    assert r.classes == ["blue", "green", "red"] and _labels(out) == [""] * 24

    with live_server_cls(create_label_app(out)) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(server.url + "/")
            _settled(page, 0)
            assert page.eval_on_selector_all("#classes button", "bs => bs.map(b => b.dataset.cls)") == list(COLOURS)
            assert page.eval_on_selector_all("#strip img", "xs => xs.length") == 24
            # Key 2 labels the first pick "green" and saves; u undoes it, on the page and in the file.
            page.keyboard.press("2")
            _settled(page, 1)
            assert _labels(out)[0] == "green"
            page.keyboard.press("u")
            _settled(page, 0)
            assert _labels(out) == [""] * 24
            # Label every pick with its true colour by the digit keys; the page moves to the next unlabeled pick.
            for n in range(1, 25):
                shown = Path(page.text_content("#where")).name
                page.keyboard.press(str(list(COLOURS).index(truth[shown]) + 1))
                _settled(page, n)
            page.keyboard.press("Control+z")  # undo the last one and label it again by clicking its class
            _settled(page, 23)
            shown = Path(page.text_content("#where")).name
            page.click(f"#classes button[data-cls='{truth[shown]}']")
            _settled(page, 24)
        finally:
            browser.close()

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["label"] for row in rows] == [truth[Path(row["path"]).name] for row in rows]
    # The filled CSV is a manifest `visiontune train` reads.
    cfg = vt.load_config(None, overrides=[f"data.dataset={out}", *TINY, "method.name=linear", "data.train_per_class=5",
                                          "data.test_per_class=3", "run.progress=false", "run.measure_speed=false",
                                          f"run.dir={tmp_path / 'runs'}", "run.name=from-picks"])
    result = vt.train(cfg)
    assert json.loads((result.run_dir / "labels.json").read_text()) in (list(COLOURS), {"classes": list(COLOURS)})
    assert result.metrics["test"]["num_samples"] == 9


def test_label_api_refuses_unknown_paths_and_malformed_bodies_without_touching_the_file(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from visiontune.suggest.label import create_label_app
    from visiontune.suggest.output import write_picks

    _images(tmp_path, 1, seed=0, sub=False)
    out = tmp_path / "picks.csv"
    write_picks(out, [{"path": str(p), "reason": "r", "score": 0.0} for p in sorted(tmp_path.glob("*.png"))],
                {"classes": ["a", "b"]})
    before = out.read_text()
    client = TestClient(create_label_app(out))
    assert client.get("/api/picks").json()["classes"] == ["a", "b"]
    assert client.post("/api/labels", json={"labels": {"elsewhere.png": "a"}}).status_code == 422
    assert client.post("/api/labels", json={"labels": ["a"]}).status_code == 422
    assert client.get("/image/7").status_code == 404
    assert out.read_text() == before
    ok = client.post("/api/labels", json={"labels": {"blue_0_000.png": "b"}})
    assert ok.json() == {"labeled": 1, "rows": 1} and _labels(out) == ["b", "", ""]
