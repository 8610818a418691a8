"""Fixtures of the inference tests: tiny trained runs (see ``_adapter_runs.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest


def load_helper() -> ModuleType:
    """``_adapter_runs`` as a module (tests/ is not a package; tests/serve uses it too)."""
    spec = importlib.util.spec_from_file_location("visiontune_test_adapter_runs", Path(__file__).with_name("_adapter_runs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_HELPER = load_helper()


@pytest.fixture(scope="session")
def runs_helper() -> ModuleType:
    """The helper module: ``COLORS``, ``TONES``, ``noisy_image``, ``png_bytes``."""
    return _HELPER


@pytest.fixture(scope="session")
def adapter_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run directories ``colors`` (LoRA), ``tone`` (Mona), ``big`` (other image size) and their data folders."""
    return _HELPER.make_adapter_runs(tmp_path_factory.getbasetemp() / "adapter-runs")
