"""Shared fixtures: fast settings for tiny-model runs, run directories under tmp_path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

torch.set_num_threads(2)

TINY = [
    "data.dataset=digits", "data.train_per_class=8", "data.test_per_class=10", "backbone.name=test_vit",
    "backbone.weights=none", "backbone.img_size=32", "optim.epochs=2", "optim.batch_size=16", "run.progress=false",
    "run.measure_speed=false",
]


@pytest.fixture
def tiny_overrides(tmp_path) -> list[str]:
    """Overrides for a seconds-long run of a tiny random ViT on digits, writing under tmp_path."""
    return [*TINY, f"run.dir={tmp_path / 'runs'}"]


# ----------------------------------------------------------------------------- tiny trained runs (tests/infer, tests/serve)


def load_module(name: str, path: Path) -> ModuleType:
    """The Python file ``path`` as module ``name`` (tests/ and benchmarks/ are not packages), registered in
    ``sys.modules`` first: dataclasses resolve a module's string annotations through it."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def script_module():
    """:func:`load_module`, for tests of the scripts under ``benchmarks/``."""
    return load_module


_ADAPTER_RUNS = load_module("visiontune_test_adapter_runs", Path(__file__).parent / "infer" / "_adapter_runs.py")


@pytest.fixture(scope="session")
def runs_helper() -> ModuleType:
    """The helper module: ``COLORS``, ``TONES``, ``noisy_image``, ``png_bytes``."""
    return _ADAPTER_RUNS


@pytest.fixture(scope="session")
def adapter_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run directories ``colors`` (LoRA), ``tone`` (Mona), ``big`` (other image size), trained once per session."""
    return _ADAPTER_RUNS.make_adapter_runs(tmp_path_factory.getbasetemp() / "adapter-runs")


@pytest.fixture(scope="session")
def exported_runs(adapter_runs: dict[str, Path]) -> dict[str, Path]:
    """``colors`` (LoRA) and ``tone`` (Mona) with fp32 + INT8 ONNX exports in their ``export/`` (once per session)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev/onnx extras")
    pytest.importorskip("onnxscript", reason="Mona exports only with torch's dynamo exporter (onnxscript, onnx extra)")
    from visiontune.infer.export import export_run

    for name in ("colors", "tone"):
        if not (adapter_runs[name] / "export" / "model.int8.onnx").is_file():
            export_run(adapter_runs[name], int8=True)
    return {k: adapter_runs[k] for k in ("colors", "tone")}
