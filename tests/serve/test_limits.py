"""The service under hostile and broken uploads: decompression bombs, thin strips, fuzzed files, bad settings.

The bomb test runs the real ``visiontune serve`` in its own process and samples that process's
resident memory (psutil) while four clients upload a 12,000 x 12,000 PNG at once: the header
check must refuse each one before a pixel is decoded. Before the guard existed, each such upload
was decoded in full (576 MB as RGB) and four of them took the server past 2 GB.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import psutil
import pytest
from PIL import Image

from visiontune.cli import main

RSS_BOUND_MB = 300
"""Largest growth of the server's resident memory allowed while it refuses four concurrent bombs."""


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def fuzzed_dds() -> bytes:
    """A DDS header with no pixel-format flags: PIL's DDS plugin raises NotImplementedError on it."""
    header = bytearray(120)
    struct.pack_into("<3I", header, 0, 0x1007, 4, 4)  # flags, height, width
    return b"DDS " + struct.pack("<I", 124) + bytes(header) + bytes(64)


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A 12,000 x 12,000 gray PNG: ~170 KB on disk, 144 million pixels decoded (under PIL's own bomb limit)."""
    data = _png(Image.new("L", (12_000, 12_000), 128))
    assert len(data) < 300_000
    return data


class ServerProcess:
    """``visiontune serve`` in a subprocess on a free loopback port (port 0; the bound port is read from its output)."""

    def __init__(self, args: list[str]):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "visiontune.cli", "serve", "--port", "0", "--log-level", "warning", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.url = ""

    def __enter__(self) -> ServerProcess:
        assert self.proc.stdout is not None
        lines = []
        while not self.url:  # no clock: the server prints its address, or exits (end of output)
            line = self.proc.stdout.readline()
            if not line:
                self.proc.kill()
                raise RuntimeError("the server did not start:\n" + "".join(lines) + (self.proc.stdout.read() or ""))
            lines.append(line)
            if " on http://" in line:
                self.url = line.split(" on ", 1)[1].split()[0]
        # Keep draining its output so the server never blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                self.proc.kill()
                raise RuntimeError("the server did not answer /healthz")
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class PeakRSS:
    """Sample a process's resident memory every few milliseconds on a thread; ``peak`` is the largest seen (bytes)."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def server(adapter_runs: dict[str, Path]) -> Iterator[ServerProcess]:
    with ServerProcess(["--adapter", f"colors={adapter_runs['colors']}"]) as s:
        yield s


def _post(url: str, data: bytes, name: str = "img.png", adapter: str | None = None) -> httpx.Response:
    fields = {"adapter": adapter} if adapter else {}
    return httpx.post(f"{url}/v1/predict", files={"image": (name, data, "application/octet-stream")}, data=fields, timeout=120)


def test_four_concurrent_bombs_are_refused_from_the_header_within_bounded_memory(
    server: ServerProcess, bomb_png: bytes, runs_helper: ModuleType, capsys: pytest.CaptureFixture,
) -> None:
    good = runs_helper.png_bytes(runs_helper.noisy_image(runs_helper.COLORS["red"], seed=5))
    for _ in range(2):  # warm up: the first forward pass allocates torch's buffers, not counted as growth
        assert _post(server.url, good).json()["predictions"][0]["label"] == "red"
    baseline = psutil.Process(server.proc.pid).memory_info().rss
    t0 = time.perf_counter()
    with PeakRSS(server.proc.pid) as rss, ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda _: _post(server.url, bomb_png, "bomb.png"), range(4)))
    elapsed = time.perf_counter() - t0
    growth_mb = (rss.peak - baseline) / 2**20
    with capsys.disabled():
        print(f"\n[bomb] 4 x {len(bomb_png) / 1e3:.0f} KB PNG of 12000x12000: server RSS baseline "
              f"{baseline / 2**20:.0f} MB, peak {rss.peak / 2**20:.0f} MB, growth {growth_mb:.1f} MB "
              f"(bound {RSS_BOUND_MB} MB), {elapsed:.2f} s for all four")
    for r in answers:
        assert r.status_code == 413 and r.headers["content-type"].startswith("application/json"), (r.status_code, r.text)
        error = r.json()["error"]
        assert error["code"] == "image_too_large"
        assert "12000 x 12000" in error["message"] and "40,000,000" in error["message"] and "--max-pixels" in error["message"]
    assert growth_mb < RSS_BOUND_MB
    # Still serving, and right.
    assert _post(server.url, good).json()["predictions"][0]["label"] == "red"


def test_thin_strip_and_fuzzed_file_get_json_errors(server: ServerProcess) -> None:
    strip = _png(Image.new("L", (60_000, 1), 0))  # tiny file; resizing it to the input size would cost gigabytes
    r = _post(server.url, strip)
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large", r.text
    assert "60000 x 1" in r.json()["error"]["message"] and "--max-aspect" in r.json()["error"]["message"]
    r = _post(server.url, fuzzed_dds(), "fuzz.dds")
    assert r.status_code == 422 and r.json()["error"]["code"] == "not_an_image", r.text
    assert "NotImplementedError" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"


def test_fuzzed_file_is_a_422_in_process(live_server: Any) -> None:
    """The in-process app too (the 500 came from PIL's NotImplementedError escaping the handler)."""
    r = _post(live_server.url, fuzzed_dds(), "fuzz.dds", adapter="colors")
    assert r.status_code == 422 and r.json()["error"]["code"] == "not_an_image", r.text


def test_serve_refuses_bad_settings_and_a_taken_port_before_loading(
    adapter_runs: dict[str, Path], capsys: pytest.CaptureFixture,
) -> None:
    run = f"colors={adapter_runs['colors']}"
    assert main(["serve", "--adapter", run, "--max-batch", "0", "--max-pixels", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-batch 0 is invalid; use an integer >= 1" in err and "--max-pixels 0 is invalid" in err
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--adapter", run, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err and "Traceback" not in err


def test_api_key_and_public_bind_warning(
    adapter_runs: dict[str, Path], runs_helper: ModuleType, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture, live_server_cls: type,
) -> None:
    import uvicorn

    apps: list[Any] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: apps.append(server.config.app))
    monkeypatch.setenv("VISIONTUNE_API_KEY", "s3cret")
    assert main(["serve", "--adapter", f"colors={adapter_runs['colors']}", "--host", "0.0.0.0", "--port", "0"]) == 0
    monkeypatch.undo()  # the test server below runs uvicorn for real
    err = capsys.readouterr().err
    assert "warning: --host 0.0.0.0 makes the service reachable from other machines" in err and "API key" in err
    png = runs_helper.png_bytes(runs_helper.noisy_image(runs_helper.COLORS["blue"], seed=2))
    with live_server_cls(apps[0]) as s:
        r = _post(s.url, png)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert httpx.get(f"{s.url}/v1/adapters", headers={"X-API-Key": "wrong"}).status_code == 401
        ok = httpx.post(f"{s.url}/v1/predict", files={"image": ("a.png", png)}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["predictions"][0]["label"] == "blue"
        assert httpx.get(f"{s.url}/healthz").status_code == 200  # liveness stays open
