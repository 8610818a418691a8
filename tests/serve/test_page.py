"""The web page in headless Chromium: choose an adapter, pick or drop an image, read the rendered top-k bars."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import visiontune as vt

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"no Chromium at {CHROMIUM}: install it with `apt-get install -y chromium` (.ci/run does) to run the browser test",
)


@pytest.fixture(scope="module")
def page(live_server: Any) -> Any:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (serve extra)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"],
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(live_server.url + "/")
            yield page
        finally:
            browser.close()


def _rows(page: Any) -> list[tuple[str, float, str, str]]:
    """(label, score, shown percentage, bar width) of each rendered result row."""
    return page.eval_on_selector_all(
        "#results .row",
        "rows => rows.map(r => [r.querySelector('.label').textContent, Number(r.dataset.score),"
        " r.querySelector('.score').textContent, r.querySelector('.fill').style.width])",
    )


def _wait_for(page: Any, adapter: str, file: str) -> None:
    """Wait until the rendered result is the answer for this adapter and file (not an earlier request's)."""
    page.wait_for_function("s => document.getElementById('results').dataset.source === s", arg=f"{adapter}:{file}")


def test_pick_an_image_see_bars_switch_adapter_drop_another(
    page: Any, adapter_runs: dict[str, Path], runs_helper: ModuleType, tmp_path: Path,
) -> None:
    # The adapter list comes from the server.
    page.wait_for_selector("#adapter option[value='tone']", state="attached")
    options = page.eval_on_selector_all("#adapter option", "os => os.map(o => o.value)")
    assert options == ["colors", "tone"]

    # Pick a red image with the file chooser: the colours adapter's top-3 bars appear.
    red = runs_helper.noisy_image(runs_helper.COLORS["red"], seed=21)
    red.save(tmp_path / "red.png")
    page.select_option("#adapter", "colors")
    page.fill("#topk", "3")
    with page.expect_file_chooser() as chooser:
        page.click("#drop")
    chooser.value.set_files(str(tmp_path / "red.png"))
    _wait_for(page, "colors", "red.png")
    rows = _rows(page)
    want = vt.pipeline(str(adapter_runs["colors"]), top_k=3)(red)
    assert [r[0] for r in rows] == [w["label"] for w in want]
    for (_, score, shown, width), w in zip(rows, want):
        assert abs(score - w["score"]) < 1e-4
        assert shown == f"{100 * score:.1f}%" and width == shown  # the bar is as long as the confidence
    assert page.is_visible("#preview")
    # ... and laid out: each filled bar spans its share of a visible track.
    spans = page.eval_on_selector_all(
        "#results .row",
        "rows => rows.map(r => [r.querySelector('.fill').getBoundingClientRect().width,"
        " r.querySelector('.bar').getBoundingClientRect().width])",
    )
    for (fill, track), (_, score, _, _) in zip(spans, rows):
        assert track > 100 and abs(fill / track - score) < 0.01, (fill, track, score)

    # Switching the adapter re-classifies the same image with the other label set.
    page.select_option("#adapter", "tone")
    _wait_for(page, "tone", "red.png")
    assert {r[0] for r in _rows(page)} == {"dark", "light"}
    assert "dark, light" in page.text_content("#labels")

    # Drop a light image onto the drop zone (a real drop event carrying a File).
    light = runs_helper.png_bytes(runs_helper.noisy_image(runs_helper.TONES["light"], seed=22))
    page.evaluate(
        """b64 => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], 'light.png', {type: 'image/png'}));
            document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        base64.b64encode(light).decode(),
    )
    _wait_for(page, "tone", "light.png")
    assert _rows(page)[0][0] == "light" and page.text_content("#error") == ""

    # A file that is not an image: the server's message is shown, the bars are cleared.
    (tmp_path / "notes.png").write_text("not really a png")
    page.set_input_files("#file", str(tmp_path / "notes.png"))
    page.wait_for_function("() => document.getElementById('error').textContent.length > 0")
    assert "not an image" in page.text_content("#error") and _rows(page) == []
    assert page.eval_on_selector("#results", "e => e.dataset.source") == ""
