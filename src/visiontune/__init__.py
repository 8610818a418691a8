"""visiontune: adapt pretrained vision foundation models to small labeled datasets, and say honestly
which parameter-efficient method works best on your data.

Public API::

    import visiontune as vt
    cfg = vt.load_config("configs/demo.yaml", overrides=["method.name=full"])
    result = vt.train(cfg)              # RunResult(run_dir, metrics)
    vt.evaluate("runs/<name>")          # metrics dict
    run = vt.load("runs/<name>")        # LoadedRun(model, config, classes, ...)
    res = vt.pretrain(vt.load_pretrain_config("configs/pretrain/explora-elpv.yaml"))  # ExPLoRA -> new backbone
    predict = vt.pipeline("runs/<name>")  # predict("img.jpg") -> [{"label": ..., "score": ...}, ...]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from visiontune import quiet

quiet.install()  # before anything imports peft (and through it bitsandbytes)

from visiontune.errors import ConfigError, DataError, VisiontuneError, WeightsError  # noqa: E402
from visiontune.lazy import lazy_attributes  # noqa: E402

# The subpackages ``visiontune.train`` and ``visiontune.pretrain`` (both light: their names load on first use)
# are imported before the ``train`` / ``pretrain`` functions below are defined: importing a submodule binds its
# name on the parent package, which would otherwise replace the function the first time the loop is imported.
import visiontune.train as _train_pkg  # noqa: E402,F401
import visiontune.pretrain as _pretrain_pkg  # noqa: E402,F401

if TYPE_CHECKING:
    from visiontune.config import Config
    from visiontune.pretrain.config import PretrainConfig

# Nothing heavy is imported here: torch, timm and peft load when a function below (or ``Config``) is first used,
# and the registries (methods, datasets, backbones) fill themselves on their first read (visiontune.registry).
__getattr__ = lazy_attributes(__name__, {
    "Config": "visiontune.config", "load_config": "visiontune.config",
    "PretrainConfig": "visiontune.pretrain.config", "load_pretrain_config": "visiontune.pretrain.config",
})

__version__ = "0.1.0"


def train(cfg: Config) -> Any:
    """Fine-tune and evaluate; see :func:`visiontune.train.loop.train`."""
    from visiontune.train.loop import train as _train

    return _train(cfg)


def pretrain(cfg: PretrainConfig) -> Any:
    """ExPLoRA extended self-supervised pretraining -> a new backbone file; see :func:`visiontune.pretrain.pretrain`."""
    from visiontune.pretrain.loop import pretrain as _pretrain

    return _pretrain(cfg)


def evaluate(
    run_dir: str, data: str | None = None, device: str = "cpu", backend: str | None = None, int8: bool = False,
) -> dict[str, Any]:
    """Evaluate a finished run (or its export, any backend); see :func:`visiontune.infer.evaluate.evaluate_run`."""
    from visiontune.infer.evaluate import evaluate_run

    return evaluate_run(run_dir, data=data, device=device, backend=backend, int8=int8)


def load(run_dir: str, device: str = "cpu", merge: bool = True) -> Any:
    """Load a finished run; see :func:`visiontune.runs.load_run`."""
    from visiontune.runs import load_run

    return load_run(run_dir, device=device, merge=merge)


def pipeline(
    run_dir: str, device: str = "cpu", merge: bool = True, top_k: int = 5, batch_size: int = 32,
    max_pixels: int | None = None, max_aspect: float | None = None, backend: str | None = None, int8: bool = False,
    precision: str = "run",
) -> Any:
    """A predictor for a finished run: ``vt.pipeline("runs/<name>")("img.jpg")`` -> top-k labels with scores.

    See :class:`visiontune.infer.Predictor` (paths, PIL images, arrays, bytes, or lists of them) and
    :func:`visiontune.infer.pipeline` (``max_pixels`` / ``max_aspect``: the decoding size guard,
    defaulting to the run's ``data.max_pixels`` / ``data.max_aspect``; ``backend="onnxruntime"``,
    ``int8=True``, or an export's path; ``precision="bf16"``: bf16 autocast with the torch backend).
    """
    from visiontune.infer import pipeline as _pipeline

    return _pipeline(run_dir, device=device, merge=merge, top_k=top_k, batch_size=batch_size,
                     max_pixels=max_pixels, max_aspect=max_aspect, backend=backend, int8=int8, precision=precision)


def list_methods() -> list[str]:
    """Registered fine-tuning methods."""
    from visiontune.registry import METHODS

    return METHODS.names()


def list_datasets() -> list[str]:
    """Built-in datasets."""
    from visiontune.registry import DATASETS

    return DATASETS.names()


def list_backbones() -> list[str]:
    """Registered backbones and architectures with offline weights (any timm name also works)."""
    from visiontune.backbones import list_backbones as _lb

    return _lb()


__all__ = [
    "Config", "ConfigError", "DataError", "VisiontuneError", "WeightsError", "__version__", "evaluate", "list_backbones",
    "list_datasets", "list_methods", "load", "load_config", "load_pretrain_config", "PretrainConfig", "pretrain", "pipeline", "train",
]
