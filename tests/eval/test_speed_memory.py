import sys
import time

import pytest
import torch
from torch import nn

from visiontune.eval import PeakMemory, measure_speed
from visiontune.eval.memory import _rss_reader


def tiny_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
    )


def test_speed_fixed_iterations_and_modes_restored():
    model = tiny_model()
    model.train()
    model[1].eval()  # a frozen BN kept in eval inside a training model must stay in eval
    result = measure_speed(model, (3, 16, 16), batch_size=4, warmup=1, iters=3)
    assert result["latency_iters"] == 3 and result["throughput_iters"] == 3
    assert 0 < result["latency_ms"] < 1000
    assert result["throughput_img_s"] > 1
    assert result["batch_size"] == 4 and result["device"] == "cpu"
    assert result["threads"] == torch.get_num_threads() and result["input_size"] == [3, 16, 16]
    assert model.training and model[0].training and not model[1].training


def test_speed_adaptive_is_bounded_by_min_time(monkeypatch):
    # A clock that advances 10 ms per reading, whatever the machine: each timed pass reads it at least twice, so a
    # phase that stops once min_time_s has passed on that clock runs at most 0.2 / 0.02 + 1 passes.
    import types

    import visiontune.eval.speed as speed

    ticks = iter(range(10**6))
    monkeypatch.setattr(speed, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks) * 0.01))
    model = tiny_model().eval()
    result = measure_speed(model, (3, 16, 16), batch_size=2, min_time_s=0.2)
    assert 1 < result["latency_iters"] <= 11 and 1 < result["throughput_iters"] <= 11
    assert not model.training


def test_speed_uses_model_dtype():
    model = tiny_model().to(torch.float64)
    assert measure_speed(model, (3, 8, 8), batch_size=2, iters=1)["dtype"] == "float64"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"input_size": (16, 16)}, "channels, height, width"), ({"batch_size": 0}, "batch_size"),
     ({"iters": 0}, "iters")],
)
def test_speed_rejects_bad_arguments(kwargs, match):
    args = {"input_size": (3, 8, 8), **kwargs}
    with pytest.raises(ValueError, match=match):
        measure_speed(tiny_model(), **args)


def test_peak_memory_sees_a_200mb_allocation():
    with PeakMemory("cpu") as pm:
        block = torch.ones(50 * 2**20)  # 50 Mi float32 = 200 MiB; the fill touches every page
        time.sleep(0.1)
        assert pm.running
        del block
    assert pm.kind == "cpu_rss_peak"
    assert 180 < pm.delta_mb < 400
    assert pm.peak_mb > pm.delta_mb
    assert not pm.running


def test_peak_memory_stops_its_thread_on_exception():
    pm = PeakMemory("cpu")
    with pytest.raises(RuntimeError, match="boom"):
        with pm:
            raise RuntimeError("boom")
    assert not pm.running and pm.peak_mb is not None


def test_rss_falls_back_to_proc_statm_without_psutil(monkeypatch):
    psutil = pytest.importorskip("psutil")
    expected = psutil.Process().memory_info().rss
    monkeypatch.setitem(sys.modules, "psutil", None)  # makes `import psutil` raise ImportError
    read = _rss_reader()
    assert read is not None
    assert read() == pytest.approx(expected, rel=0.2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_cuda():
    with PeakMemory("cuda") as pm:
        block = torch.ones(50 * 2**20, device="cuda")
        del block
    assert pm.kind == "cuda_allocated" and pm.delta_mb >= 199
    model = tiny_model().cuda()
    result = measure_speed(model, (3, 16, 16), batch_size=4, device="cuda", iters=2)
    assert result["device"] == "cuda" and result["latency_ms"] > 0
