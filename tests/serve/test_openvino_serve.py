"""`visiontune serve --backend openvino [--int8]`: a real HTTP request on loopback answered by the OpenVINO exports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest

import visiontune as vt
from visiontune.cli import main

pytest.importorskip("openvino", reason="openvino is in the dev/openvino extras")
pytest.importorskip("nncf", reason="nncf is in the dev/openvino extras")


@pytest.fixture(scope="module")
def ov_run(adapter_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the ``colors`` LoRA run with fp32 + INT8 OpenVINO exports, made by the command line in a process of
    its own: NNCF's progress display keeps the output stream it first saw, which under pytest is a capture file that
    this module's live servers then find closed."""
    run = tmp_path_factory.mktemp("ov-serve") / "colors"
    shutil.copytree(adapter_runs["colors"], run, ignore=shutil.ignore_patterns("export"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(vt.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "visiontune", "export", str(run), "--format", "openvino", "--int8",
                           "--calibration", "16"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def test_cli_serve_openvino_fp32_and_int8_answer_like_pytorch(
    ov_run: Path, runs_helper: ModuleType, monkeypatch: pytest.MonkeyPatch, live_server_cls: type,
) -> None:
    import uvicorn

    run = ov_run
    calls: list[dict[str, Any]] = []
    with monkeypatch.context() as m:  # serve() runs uvicorn on its own socket: hand the app over instead
        m.setattr(uvicorn.Server, "run", lambda self, sockets=None: calls.append({"app": self.config.app}))
        assert main(["serve", "--adapter", f"colors={run}", "--backend", "openvino", "--port", "0"]) == 0
        assert main(["serve", "--adapter", f"colors={run / 'export' / 'openvino_model.int8.xml'}", "--int8", "--port", "0"]) == 0
    png = runs_helper.png_bytes(runs_helper.noisy_image(runs_helper.COLORS["green"], seed=3))
    want = vt.pipeline(str(run), top_k=3)(runs_helper.noisy_image(runs_helper.COLORS["green"], seed=3))
    for app, precision in ((calls[0]["app"], "fp32"), (calls[1]["app"], "int8")):
        with live_server_cls(app) as server:
            listing = httpx.get(f"{server.url}/v1/adapters").json()
            assert listing["backend"] == "openvino" and listing["backbone"]["precision"] == precision
            r = httpx.post(f"{server.url}/v1/predict", files={"image": ("g.png", png, "image/png")},
                           data={"adapter": "colors", "top_k": "3"}, timeout=60)
            assert r.status_code == 200, r.text
            got = r.json()["predictions"]
            assert got[0]["label"] == want[0]["label"] == "green"
            if precision == "fp32":
                assert [g["label"] for g in got] == [w["label"] for w in want]
                assert np.allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-4)
