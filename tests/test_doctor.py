"""``visiontune doctor``: the report's parts, the fix commands for what is missing, an offline-safe hub check."""

from __future__ import annotations

import json
import socket

import pytest
import torch

import visiontune.doctor as doctor
from visiontune.cli import main
from visiontune.extras import EXTRAS
from visiontune.runtime import cpu_info


def test_doctor_json_reports_this_machine(tmp_path, capsys):
    assert main(["doctor", "--json", "--offline", "--runs-dir", str(tmp_path / "runs")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"] == torch.__version__
    assert set(report["extras"]) == set(EXTRAS)
    assert report["cpu"]["isa"] == cpu_info()["isa"]
    assert set(report["capabilities"]) == {"bf16", "int8", "4bit"}
    assert len(report["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert {w["name"] for w in report["offline_weights"]} >= {"dinov2-vits14-imgfocus", "efficientnet-lite0"}
    assert report["hub"]["reachable"] is None and "not checked" in report["hub"]["note"]
    assert report["disk"]["runs_dir"] == str((tmp_path / "runs").resolve()) and report["disk"]["free_gib"] > 0


def test_text_report_lists_fixes_for_missing_extras(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(doctor, "installed_extras", lambda: {e: (list(m) if e in ("onnx", "serve") else [])
                                                             for e, m in EXTRAS.items()})
    assert main(["doctor", "--offline", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    fixes = out.split("to fix:\n", 1)[1].splitlines()
    assert [f.split("   #")[0].strip() for f in fixes] == ["pip install 'visiontune[onnx]'", "pip install 'visiontune[serve]'"]
    assert "extras     quant yes  onnx no  serve no" in out


@pytest.mark.parametrize("isa, vnni, bnb, expect", [
    (["avx2"], False, True, {"bf16": "emulated", "int8": "no VNNI", "4bit": "4-bit NF4 on the CPU"}),
    (["avx2", "avx512f", "avx512_vnni", "avx512_bf16"], True, True, {"bf16": "AVX-512 BF16", "int8": "VNNI:"}),
    (["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"], True, False, {"bf16": "AMX", "4bit": "visiontune[quant]"}),
])
def test_capabilities_follow_the_cpu_flags(isa, vnni, bnb, expect):
    caps = doctor.capabilities({"isa": isa, "vnni": vnni}, bnb, [])
    for key, text in expect.items():
        assert text in caps[key], (key, caps[key])


def test_hub_check_is_bounded_and_offline_safe(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert doctor.hub_status(True, 5.0, ("127.0.0.1", port))["reachable"] is True
    finally:
        server.close()
    # The port is closed now: refused at once, reported unreachable, with the command that works offline.
    status = doctor.hub_status(True, 5.0, ("127.0.0.1", port))
    assert status["reachable"] is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in doctor.hub_status(True, 5.0, ("127.0.0.1", port))["note"]


def test_unreachable_hub_and_low_disk_become_fixes(monkeypatch, tmp_path):
    monkeypatch.setattr(doctor, "hub_status", lambda check, timeout: {"host": "h:1", "reachable": False, "note": "unreachable"})
    monkeypatch.setattr(doctor, "LOW_DISK_BYTES", float("inf"))
    report = doctor.diagnose(tmp_path, check_hub=True)
    assert any(f.startswith("export HF_HUB_OFFLINE=1") for f in report.fixes)
    assert any(f.startswith("run.dir=") for f in report.fixes) and report.disk["low"]
