"""The HTTP service over real HTTP: every endpoint, bad inputs, interleaved adapters, a concurrent burst."""

from __future__ import annotations

import base64
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import visiontune as vt
from visiontune.errors import ConfigError
from visiontune.cli import main

MAX_BYTES = 20_000  # the live server's --max-bytes (tests/serve/conftest.py)


def _post_file(url: str, data: bytes, adapter: str | None = None, top_k: Any = None, name: str = "img.png") -> httpx.Response:
    fields = {k: str(v) for k, v in (("adapter", adapter), ("top_k", top_k)) if v is not None}
    return httpx.post(f"{url}/v1/predict", files={"image": (name, data, "image/png")}, data=fields, timeout=60)


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error"]["code"] == code, body
    return body["error"]["message"]


@pytest.fixture(scope="module")
def expected(adapter_runs: dict[str, Path], runs_helper: ModuleType) -> dict[str, Any]:
    """Test images and what the (merged) predictor of each run says about them."""
    images = {
        **{f"{c}-{i}": runs_helper.png_bytes(runs_helper.noisy_image(rgb, seed=50 + i)) for c, rgb in runs_helper.COLORS.items() for i in range(2)},
        **{f"{t}-{i}": runs_helper.png_bytes(runs_helper.noisy_image(rgb, seed=60 + i)) for t, rgb in runs_helper.TONES.items() for i in range(2)},
    }
    preds = {}
    for adapter in ("colors", "tone"):
        p = vt.pipeline(str(adapter_runs[adapter]), top_k=3)
        preds[adapter] = dict(zip(images, p(list(images.values()))))
    return {"images": images, "preds": preds}


def _same(got: list[dict], want: list[dict]) -> bool:
    return [g["label"] for g in got] == [w["label"] for w in want] and np.allclose(
        [g["score"] for g in got], [w["score"] for w in want], atol=1e-4)


def test_info_endpoints_docs_and_page(live_server: Any, adapter_runs: dict[str, Path]) -> None:
    url = live_server.url
    health = httpx.get(f"{url}/healthz").json()
    assert health["status"] == "ok" and health["adapters"] == ["colors", "tone"]
    listing = httpx.get(f"{url}/v1/adapters").json()
    by = {a["name"]: a for a in listing["adapters"]}
    assert by["colors"]["method"] == "lora" and by["colors"]["classes"] == ["blue", "green", "red"]
    assert by["tone"]["method"] == "mona" and by["tone"]["classes"] == ["dark", "light"]
    # The run's name, not the server's path to it (nor to the weights file).
    assert by["colors"]["source"] == adapter_runs["colors"].name and listing["default"] is None
    assert listing["backbone"]["weights"] == "tiny_vit.safetensors" and "/" not in str(listing)
    assert listing["backbone"]["name"] == "test_vit" and listing["max_bytes"] == MAX_BYTES
    assert listing["backend"] == live_server.backend == listing["backbone"].get("backend", "torch")
    # One backbone: each adapter holds far less privately than the backbone it shares.
    assert 0 < by["colors"]["private_bytes"] and 0 < by["tone"]["private_bytes"]
    spec = httpx.get(f"{url}/openapi.json").json()
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert {"/v1/adapters", "/healthz"} <= set(spec["paths"])
    assert httpx.get(f"{url}/docs").status_code == 200
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and 'id="adapter"' in page.text
    assert _error(httpx.get(f"{url}/v2/nothing"), 404, "not_found")


def test_multipart_and_json_answers_match_the_predictor(live_server: Any, expected: dict[str, Any]) -> None:
    url, images, preds = live_server.url, expected["images"], expected["preds"]
    r = _post_file(url, images["red-0"], adapter="colors", top_k=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == "colors" and body["predictions"][0]["label"] == "red" and len(body["predictions"]) == 2
    assert _same(body["predictions"], preds["colors"]["red-0"][:2]) and body["batch_size"] >= 1
    js = httpx.post(f"{url}/v1/predict", json={"image": base64.b64encode(images["dark-1"]).decode(), "adapter": "tone"}).json()
    assert js["predictions"][0]["label"] == "dark" and len(js["predictions"]) == 2  # default top_k=3, only 2 labels
    assert _same(js["predictions"], preds["tone"]["dark-1"])
    data_url = "data:image/png;base64," + base64.b64encode(images["blue-0"]).decode()
    js = httpx.post(f"{url}/v1/predict", json={"image": data_url, "adapter": "colors", "top_k": 1}).json()
    assert [p["label"] for p in js["predictions"]] == ["blue"]


def test_two_adapters_with_different_label_sets_interleaved(live_server: Any, expected: dict[str, Any]) -> None:
    url, images, preds = live_server.url, expected["images"], expected["preds"]
    order = [("colors", "red-0"), ("tone", "light-0"), ("colors", "green-1"), ("tone", "dark-0"), ("tone", "red-1"),
             ("colors", "blue-1"), ("colors", "light-1"), ("tone", "green-0")]
    for adapter, key in order:
        body = _post_file(url, images[key], adapter=adapter, top_k=3).json()
        assert body["adapter"] == adapter
        assert _same(body["predictions"], preds[adapter][key]), (adapter, key, body, preds[adapter][key])
    # Right answers on the images each adapter was trained for.
    assert _post_file(url, images["green-1"], "colors").json()["predictions"][0]["label"] == "green"
    assert _post_file(url, images["light-0"], "tone").json()["predictions"][0]["label"] == "light"


def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(live_server: Any, expected: dict[str, Any]) -> None:
    url, png = live_server.url, expected["images"]["red-0"]
    msg = _error(_post_file(url, b"hello, I am text", adapter="colors"), 422, "not_an_image")
    assert "not an image" in msg and "PNG, JPEG" in msg
    big = os.urandom(MAX_BYTES + 1000)
    assert str(MAX_BYTES) in _error(_post_file(url, big, adapter="colors"), 413, "too_large")
    huge = os.urandom(10 * MAX_BYTES)  # over the body limit itself (image limit + framing): refused while streaming
    assert "--max-bytes" in _error(_post_file(url, huge, adapter="colors"), 413, "too_large")
    msg = _error(_post_file(url, png, adapter="colours"), 404, "unknown_adapter")
    assert "Did you mean 'colors'?" in msg and "colors, tone" in msg
    assert "colors, tone" in _error(_post_file(url, png), 400, "missing_adapter")
    for bad in ("abc", "0", "-1", "2.5"):
        assert f"top_k={bad!r} is invalid" in _error(_post_file(url, png, "colors", top_k=bad), 400, "bad_top_k")
    assert "top_k=0" in _error(httpx.post(f"{url}/v1/predict", json={"image": "aGk=", "adapter": "colors", "top_k": 0}), 400, "bad_top_k")
    _error(httpx.post(f"{url}/v1/predict", json={"image": "%%%not base64", "adapter": "colors"}), 400, "bad_base64")
    _error(httpx.post(f"{url}/v1/predict", content=b"{nope", headers={"content-type": "application/json"}), 400, "bad_json")
    _error(httpx.post(f"{url}/v1/predict", json={"adapter": "colors"}), 400, "missing_image")
    _error(httpx.post(f"{url}/v1/predict", json={"image": "aGk=", "adaptor": "colors"}), 400, "unknown_field")
    _error(httpx.post(f"{url}/v1/predict", content=png, headers={"content-type": "image/png"}), 415, "unsupported_media_type")
    _error(httpx.post(f"{url}/v1/predict", data={"adapter": "colors"}, files={"other": ("x", b"1")}), 400, "unknown_field")
    # An image sent as a text field, not a file part; and a URL-encoded form (no file possible).
    _error(httpx.post(f"{url}/v1/predict", files={"image": (None, "text"), "adapter": (None, "colors")}), 400, "missing_image")
    _error(httpx.post(f"{url}/v1/predict", data={"adapter": "colors", "image": "x"}), 415, "unsupported_media_type")
    _error(httpx.get(f"{url}/v1/predict"), 405, "method_not_allowed")
    # Still healthy, and still right.
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    assert _post_file(url, png, "colors").json()["predictions"][0]["label"] == "red"


def test_concurrent_burst_is_batched_and_every_answer_is_right(live_server: Any, expected: dict[str, Any]) -> None:
    url, images, preds = live_server.url, expected["images"], expected["preds"]
    keys = list(images)
    jobs = [("colors" if i % 3 else "tone", keys[i % len(keys)]) for i in range(32)]
    before = httpx.get(f"{url}/healthz").json()

    def call(job: tuple[str, str]) -> dict:
        adapter, key = job
        r = _post_file(url, images[key], adapter=adapter, top_k=3)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(call, jobs))
    for (adapter, key), body in zip(jobs, answers):
        assert body["adapter"] == adapter and _same(body["predictions"], preds[adapter][key]), (adapter, key)
    after = httpx.get(f"{url}/healthz").json()
    assert after["requests"] - before["requests"] == 32 and after["errors"] == before["errors"]
    # Micro-batching happened: fewer forward passes than requests, some shared by several requests.
    assert after["batches"] - before["batches"] < 32 and max(b["batch_size"] for b in answers) > 1


def test_cli_serve_wires_the_app_and_binds_loopback_by_default(
    adapter_runs: dict[str, Path], runs_helper: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
    live_server_cls: type,
) -> None:
    """`visiontune serve` end to end, except that uvicorn's blocking run hands its app to a test server."""
    import uvicorn

    calls: list[dict[str, Any]] = []

    def fake_run(server: Any, sockets: list[Any] | None = None) -> None:
        calls.append({"app": server.config.app, "address": sockets[0].getsockname()})

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    # A bare run directory is named after its folder; port 0: the OS picks a free one, and it is printed.
    assert main(["serve", "--adapter", str(adapter_runs["tone"]), "--port", "0", "--max-bytes", "5000"]) == 0
    monkeypatch.undo()  # the test server below runs uvicorn for real
    (call,) = calls
    host, port = call["address"]
    out, err = capsys.readouterr()
    assert host == "127.0.0.1" and port > 0 and f"serving 1 adapter(s) [tone] on http://127.0.0.1:{port}" in out
    assert "warning" not in err  # loopback: nothing to warn about
    png = runs_helper.png_bytes(runs_helper.noisy_image(runs_helper.TONES["light"], seed=3))
    with live_server_cls(call["app"]) as server:
        body = _post_file(server.url, png).json()  # one adapter: no need to name it
        assert body["adapter"] == "tone" and body["predictions"][0]["label"] == "light"
        assert httpx.get(f"{server.url}/v1/adapters").json()["max_bytes"] == 5000


def test_cli_serve_refuses_adapters_of_another_backbone(adapter_runs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    import socket

    with socket.socket() as s:  # a free port: serve binds before it loads, so a busy default port would answer first
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    rc = main(["serve", "--port", port, "--adapter", f"colors={adapter_runs['colors']}", "--adapter", f"big={adapter_runs['big']}"])
    err = capsys.readouterr().err
    assert rc == 2 and "task 'big'" in err and "different backbone" in err and "img_size: adapter has 48, backbone has 32" in err
    assert main(["serve", "--port", port, "--adapter", f"a={adapter_runs['tone']}", "--adapter", f"a={adapter_runs['tone']}"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["serve", "--adapter", "=x"]) == 2
    assert "malformed" in capsys.readouterr().err


def test_cli_serve_onnxruntime_backend_and_int8(
    exported_runs: dict[str, Path], runs_helper: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
    live_server_cls: type, expected: dict[str, Any],
) -> None:
    """`visiontune serve --backend onnxruntime [--int8]`: run directories served from their exports, same answers."""
    import uvicorn

    calls: list[dict[str, Any]] = []
    # serve() binds its own socket and runs uvicorn.Server on it: hand the app over instead of serving.
    # (only for these two calls: the live servers below run the real uvicorn.Server.)
    colors, tone = exported_runs["colors"], exported_runs["tone"]
    with monkeypatch.context() as m:
        m.setattr(uvicorn.Server, "run", lambda self, sockets=None: calls.append({"app": self.config.app}))
        # --port 0: any free port, so another process on the default 8000 (a shared machine) cannot fail the test
        assert main(["serve", "--adapter", f"colors={colors}", "--adapter", f"tone={tone / 'export'}", "--backend", "onnxruntime",
                     "--port", "0"]) == 0
        assert main(["serve", "--adapter", f"colors={colors}", "--int8", "--port", "0"]) == 0  # --int8 alone: onnxruntime
    out = capsys.readouterr().out
    assert "backend onnxruntime)" in out and "backend onnxruntime INT8)" in out
    fp32_app, int8_app = calls[0]["app"], calls[1]["app"]
    png = expected["images"]["green-1"]
    with live_server_cls(fp32_app) as server:
        listing = httpx.get(f"{server.url}/v1/adapters").json()
        assert listing["backend"] == "onnxruntime" and listing["backbone"]["precision"] == "fp32"
        assert _same(_post_file(server.url, png, "colors", top_k=3).json()["predictions"], expected["preds"]["colors"]["green-1"])
    with live_server_cls(int8_app) as server:
        assert httpx.get(f"{server.url}/v1/adapters").json()["backbone"]["precision"] == "int8"
        got = _post_file(server.url, png, "colors", top_k=3).json()["predictions"]
        assert [g["label"] for g in got] == [w["label"] for w in expected["preds"]["colors"]["green-1"]]
    # Mixing exports and run directories without saying which backend is ambiguous; another backend's export must exist.
    assert main(["serve", "--adapter", f"a={colors}", "--adapter", f"b={tone / 'export'}"]) == 2
    assert "one backend" in capsys.readouterr().err
    assert main(["serve", "--adapter", f"a={colors}", "--backend", "openvino", "--port", "0"]) == 2
    assert "make it with: visiontune export" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:this CPU has no native bf16")
def test_cli_serve_in_bf16_answers_like_fp32_and_says_so(
    adapter_runs: dict[str, Path], runs_helper: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
    live_server_cls: type,
) -> None:
    """`serve --precision bf16`: every adapter under bf16 autocast; same labels, scores close to fp32's."""
    import uvicorn

    from visiontune.multi import AdapterHost

    calls: list[Any] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: calls.append(server.config.app))
    assert main(["serve", "--adapter", f"colors={adapter_runs['colors']}", "--port", "0", "--precision", "bf16"]) == 0
    monkeypatch.undo()
    assert "backend torch bf16)" in capsys.readouterr().out
    fp32 = vt.pipeline(str(adapter_runs["colors"]), merge=False)
    image = runs_helper.noisy_image(runs_helper.COLORS["green"], seed=11)
    with live_server_cls(calls[0]) as server:
        assert httpx.get(f"{server.url}/v1/adapters").json()["precision"] == "bf16"
        body = _post_file(server.url, runs_helper.png_bytes(image)).json()
    want = fp32(image)
    assert body["predictions"][0]["label"] == want[0]["label"] == "green"
    assert abs(body["predictions"][0]["score"] - want[0]["score"]) < 0.05
    host = AdapterHost.from_runs({"colors": adapter_runs["colors"]}, precision="bf16")
    x = fp32.preprocess(image)[None]
    l16, l32 = host.logits("colors", x), AdapterHost.from_runs({"colors": adapter_runs["colors"]}).logits("colors", x)
    assert host.amp is torch.bfloat16 and l16.dtype == torch.float32 and not torch.equal(l16, l32)  # bf16 did run
    assert torch.allclose(l16.softmax(1), l32.softmax(1), atol=0.05)
    with pytest.raises(ConfigError, match="precision 'fp16' is invalid for an adapter host; use fp32 or bf16"):
        AdapterHost.from_runs({"colors": adapter_runs["colors"]}, precision="fp16")
