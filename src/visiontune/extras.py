"""The optional extras (``pip install 'visiontune[EXTRA]'``): which importable packages each one brings,
whether they are installed, and the one-line message for a command that needs a missing one.

The command line turns a missing optional package into that message for the command that needs it only
(``visiontune list methods`` works on the base install); ``visiontune doctor`` lists what is installed.
A test keeps :data:`EXTRAS` equal to ``pyproject.toml``'s ``[project.optional-dependencies]``.
"""

from __future__ import annotations

import importlib.util

EXTRAS: dict[str, tuple[str, ...]] = {
    "quant": ("bitsandbytes",),
    "onnx": ("onnx", "onnxruntime", "onnxscript"),
    "serve": ("fastapi", "uvicorn", "python_multipart"),
    "cluster": ("ray",),
    "multispectral": ("tifffile",),
    "tensorboard": ("tensorboard",),
    "offline": ("onnx",),
    "openvino": ("openvino", "nncf"),
}
"""Extra -> the top-level modules its packages install (what ``import`` names, not the PyPI name).
``[serve]`` also installs httpx and playwright, for the service's own tests only."""

WHAT_NEEDS: dict[str, str] = {
    "quant": "QLoRA/QDoRA (method.name=qlora|qdora)",
    "onnx": "visiontune export, --backend onnxruntime, INT8",
    "serve": "visiontune serve (HTTP service and web page)",
    "cluster": "--executor ray (sweep, auto)",
    "multispectral": ".tif arrays for visiontune pretrain",
    "tensorboard": "run.tensorboard=true",
    "offline": "backbone.weights=offline for the DINOv2-S weights (read from an ONNX file)",
    "openvino": "visiontune export --format openvino, --backend openvino, INT8 by NNCF",
}
"""Extra -> what it enables, in the words of the command line."""

# Older import names of the same packages.
_ALIASES = {"multipart": "python_multipart"}  # python-multipart before 0.0.13


def extra_of(module: str | None) -> str | None:
    """The extra that installs top-level module ``module`` (a dotted name is cut to its first part), or None."""
    if not module:
        return None
    top = module.partition(".")[0]
    top = _ALIASES.get(top, top)
    return next((extra for extra, modules in EXTRAS.items() if top in modules), None)


def install_hint(extra: str) -> str:
    """``pip install 'visiontune[EXTRA]'``: the command that installs an extra."""
    return f"pip install 'visiontune[{extra}]'"


def missing_message(module: str, what: str) -> str | None:
    """The one-line error for ``what`` (e.g. ``visiontune serve``) when optional ``module`` is not installed;
    None when ``module`` belongs to no extra (then the error is not about an extra and is reported as it is)."""
    extra = extra_of(module)
    if extra is None:
        return None
    return (f"{what} needs the {module.partition('.')[0]} package ({extra} extra), which is not installed; "
            f"install it with: {install_hint(extra)}")


def installed(module: str) -> bool:
    """Whether top-level ``module`` can be imported (found, not imported: importing some of these takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails to import, or a module with no spec
        return False


def installed_extras() -> dict[str, list[str]]:
    """Extra -> its modules that are missing (an empty list: the extra is installed)."""
    return {extra: [m for m in modules if not installed(m)] for extra, modules in EXTRAS.items()}
