"""`visiontune serve --backend openvino [--int8]`: a real HTTP request on loopback answered by the OpenVINO exports."""

from __future__ import annotations

import shutil
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


def test_cli_serve_openvino_fp32_and_int8_answer_like_pytorch(
    adapter_runs: dict[str, Path], runs_helper: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture, live_server_cls: type,
) -> None:
    import uvicorn

    from visiontune.infer.export import export_run

    run = tmp_path / "colors"
    shutil.copytree(adapter_runs["colors"], run, ignore=shutil.ignore_patterns("export"))
    export_run(run, fmt="openvino", int8=True, calibration=16)
    calls: list[dict[str, Any]] = []
    with monkeypatch.context() as m:  # serve() runs uvicorn on its own socket: hand the app over instead
        m.setattr(uvicorn.Server, "run", lambda self, sockets=None: calls.append({"app": self.config.app}))
        assert main(["serve", "--adapter", f"colors={run}", "--backend", "openvino", "--port", "0"]) == 0
        assert main(["serve", "--adapter", f"colors={run / 'export' / 'openvino_model.int8.xml'}", "--int8", "--port", "0"]) == 0
    out = capsys.readouterr().out
    assert "backend openvino)" in out and "backend openvino INT8)" in out
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
