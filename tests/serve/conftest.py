"""Fixtures of the service tests: the trained runs of tests/infer and a live uvicorn server on a free port."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra (fastapi, uvicorn, python-multipart)")


MAX_BYTES = 20_000
"""The live server's --max-bytes: small, so the too-large case needs no big upload."""


class LiveServer:
    """A uvicorn server for an ASGI app on a free loopback port, in a background thread."""

    def __init__(self, app: Any):
        import uvicorn

        self.app = app
        self.backend = "torch"
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn serves on this very socket
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        while not self.server.started:  # no clock: uvicorn sets it once listening, or its thread ends
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="session")
def live_server_cls() -> type[LiveServer]:
    """:class:`LiveServer`, for tests that serve an app of their own (``with live_server_cls(app) as s``)."""
    return LiveServer


@pytest.fixture(scope="session", params=["torch", "onnxruntime"])
def live_server(request: pytest.FixtureRequest, adapter_runs: dict[str, Path]) -> Iterator[LiveServer]:
    """The real service over HTTP: adapters ``colors`` (LoRA, 3 labels) and ``tone`` (Mona, 2 labels), once with
    the torch backend (one shared backbone) and once with onnxruntime (each run's fp32 export)."""
    from visiontune.serve.app import create_app

    if request.param == "onnxruntime":
        from visiontune.infer.backends import ExportHost

        exported = request.getfixturevalue("exported_runs")
        host = ExportHost.from_exports({"colors": exported["colors"], "tone": exported["tone"]})
    else:
        from visiontune.multi import AdapterHost

        host = AdapterHost.from_runs({"colors": adapter_runs["colors"], "tone": adapter_runs["tone"]})
    # A 20 ms batching window makes concurrent requests share forward passes reliably in the burst test.
    app = create_app(host, max_bytes=MAX_BYTES, max_batch=16, max_wait_ms=20, default_top_k=3)
    with LiveServer(app) as server:
        server.backend = request.param
        yield server
