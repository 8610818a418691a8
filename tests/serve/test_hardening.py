"""Issue 30, part 4: the service refuses what a hostile client or web page sends, and bounds what it holds.

Each test failed on the main branch before the issue: a deeply nested JSON body got a 500, any Host header was
answered (DNS rebinding reaches a key-less loopback server), ``/healthz`` listed the adapters to anyone, and
request bodies were read without limit on how many at once.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest


@pytest.fixture(scope="module")
def host(adapter_runs: dict[str, Path]) -> Any:
    from visiontune.multi import AdapterHost

    return AdapterHost.from_runs({"colors": adapter_runs["colors"]})


def test_deeply_nested_json_is_a_400_not_a_500(host, live_server_cls):
    from visiontune.serve.app import create_app

    with live_server_cls(create_app(host)) as server:
        body = b"[" * 200_000 + b"]" * 200_000
        r = httpx.post(f"{server.url}/v1/predict", content=body, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json", r.text
        assert "nested too deeply" in r.json()["error"]["message"]
        assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"


def test_host_header_allow_list_stops_dns_rebinding(host, live_server_cls):
    from visiontune.serve.app import create_app

    with live_server_cls(create_app(host)) as server:
        port = server.url.rsplit(":", 1)[1]
        for name in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
            r = httpx.get(f"{server.url}/v1/adapters", headers={"host": name})
            assert r.status_code == 421 and r.json()["error"]["code"] == "wrong_host", (name, r.text)
            assert httpx.get(f"{server.url}/", headers={"host": name}).status_code == 421
        for name in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}"):
            assert httpx.get(f"{server.url}/v1/adapters", headers={"host": name}).status_code == 200, name
    with live_server_cls(create_app(host, allowed_hosts=["models.internal"])) as server:
        assert httpx.get(f"{server.url}/healthz", headers={"host": "models.internal:80"}).status_code == 200
        assert httpx.get(f"{server.url}/healthz").status_code == 421  # 127.0.0.1 was not named
    with live_server_cls(create_app(host, allowed_hosts=["*"])) as server:
        assert httpx.get(f"{server.url}/healthz", headers={"host": "anything.example"}).status_code == 200


def test_healthz_names_adapters_only_to_authorised_requests(host, live_server_cls):
    from visiontune.serve.app import create_app

    with live_server_cls(create_app(host, api_key="s3cret")) as server:
        open_health = httpx.get(f"{server.url}/healthz").json()
        assert open_health["status"] == "ok" and "adapters" not in open_health and "colors" not in json.dumps(open_health)
        keyed = httpx.get(f"{server.url}/healthz", headers={"x-api-key": "s3cret"}).json()
        assert keyed["adapters"] == ["colors"]
        wrong = httpx.get(f"{server.url}/healthz", headers={"authorization": "Bearer nope"}).json()
        assert "adapters" not in wrong
    with live_server_cls(create_app(host)) as server:  # an open server hides nothing /v1/adapters shows anyway
        assert httpx.get(f"{server.url}/healthz").json()["adapters"] == ["colors"]


def test_request_bodies_in_flight_are_capped(host):
    """With max_uploads=1, a second request's body is not read while the first one's is being read."""
    from visiontune.serve.app import create_app

    app = create_app(host, max_uploads=1)

    async def scenario() -> list[str]:
        events: list[str] = []
        release_a = asyncio.Event()
        a_reading = asyncio.Event()

        def make_receive(tag: str, gate: asyncio.Event | None):
            sent = False

            async def receive() -> dict[str, Any]:
                nonlocal sent
                if sent:
                    await asyncio.Event().wait()  # the client stays connected; the app never needs more
                sent = True
                events.append(f"{tag} read")
                if gate is not None:
                    a_reading.set()
                    await gate.wait()
                return {"type": "http.request", "body": b"{not json", "more_body": False}
            return receive

        async def call(tag: str, gate: asyncio.Event | None) -> None:
            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
                "headers": [(b"host", b"localhost"), (b"content-type", b"application/json")],
                "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
            }
            status: dict[str, int] = {}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    events.append(f"{tag} answered {status['code']}")

            await app(scope, make_receive(tag, gate), send)

        a = asyncio.create_task(call("a", release_a))
        await a_reading.wait()
        b = asyncio.create_task(call("b", None))
        for _ in range(200):  # let b run as far as it can while a holds the only upload slot
            await asyncio.sleep(0)
        events.append("release a")
        release_a.set()
        await asyncio.gather(a, b)
        return events

    events = asyncio.run(scenario())
    assert events.index("b read") > events.index("release a"), events
    assert "a answered 400" in events and "b answered 400" in events


def test_fifos_and_other_non_regular_files_are_refused_by_predict(adapter_runs, tmp_path, capsys):
    """A FIFO named x.png made `predict` hang forever; now it is a per-file error and the rest is predicted."""
    from PIL import Image

    from visiontune.cli import main
    from visiontune.data.images import decode_image
    from visiontune.errors import DataError
    from visiontune.infer.files import collect_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 32), (220, 30, 30)).save(folder / "red.png")
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    os.mkfifo(folder / "y.png")
    paths, problems = collect_images([fifo, folder])
    assert paths == [str(folder / "red.png")] and [p.source for p in problems] == [str(fifo)]
    with pytest.raises(DataError, match="not a regular file"):
        decode_image(fifo)
    assert main(["predict", str(adapter_runs["colors"]), str(fifo), str(folder), "--format", "json"]) == 1
    captured = capsys.readouterr()
    assert "not a regular file" in captured.err and "red.png" in captured.out


def test_healthz_counts_requests_that_failed_after_the_batch(adapter_runs, live_server_cls, monkeypatch, tmp_path):
    """Finding 6's symptom: every request got a 500 (an IndexError after the model ran) while /healthz said
    ``errors: 0``. Now every 500 is counted."""
    from PIL import Image

    from visiontune.multi import AdapterHost
    from visiontune.serve.app import create_app

    host = AdapterHost.from_runs({"colors": adapter_runs["colors"]})
    monkeypatch.setattr(host, "classes", lambda name: ["only one"])  # fewer labels than the model's outputs
    img = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(img)
    with live_server_cls(create_app(host)) as server:
        r = httpx.post(f"{server.url}/v1/predict", files={"image": ("x.png", img.read_bytes(), "image/png")}, timeout=60)
        assert r.status_code == 500
        assert httpx.get(f"{server.url}/healthz").json()["server_errors"] == 1
