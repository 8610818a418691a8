"""Name -> factory registries, filled at import time (the timm ``register_model`` habit).

A duplicate name raises, and an unknown name raises with the list of valid names and the closest
match, so a typo in a config is fixed from the error message alone.

Each registry names the packages whose import fills it and imports them the first time it is read, so
``import visiontune`` stays cheap (no torch until a command needs one) and a lookup never sees a
half-filled registry, whichever module the caller happened to import first.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Generic, Iterator, TypeVar

from visiontune.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories of one kind (backbones, methods, datasets, ...).

    Args:
        kind: what the entries are, used in error messages ("method", "dataset", ...).
        config_key: the config key that selects an entry, used in error messages ("method.name").
        filled_by: modules whose import registers the entries; imported on the first read.
    """

    def __init__(self, kind: str, config_key: str | None = None, filled_by: tuple[str, ...] = ()):
        self.kind = kind
        self.config_key = config_key or kind
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}
        self._filled_by = filled_by
        self._filling = False

    def _fill(self) -> None:
        """Import the modules that register the entries (once; a read during that import sees what is there)."""
        if self._filling or not self._filled_by:
            return
        self._filling = True  # set first: a module being imported may read the registry it fills
        try:
            for module in self._filled_by:
                importlib.import_module(module)
        except BaseException:
            self._filling = False  # the next read tries again and raises the same error, not an empty registry
            raise

    def register(self, name: str, obj: T | None = None, *, help: str = "") -> Any:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted.

        Raises:
            ValueError: if ``name`` is already registered.
        """

        def _add(o: T) -> T:
            if name in self._entries:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {self._entries[name]!r}); "
                    f"choose another name"
                )
            self._entries[name] = o
            doc = help or (getattr(o, "__doc__", None) or "").strip().split("\n")[0]
            self._help[name] = doc
            return o

        if obj is None:
            return _add
        return _add(obj)

    def get(self, name: str) -> T:
        """Return the entry named ``name``.

        Raises:
            ConfigError: naming the unknown value, the closest valid names and all valid names.
        """
        self._fill()
        if name in self._entries:
            return self._entries[name]
        raise ConfigError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        """The error text for an unknown ``name`` (also used by config validation)."""
        self._fill()
        close = difflib.get_close_matches(str(name), list(self._entries), n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return (
            f"{self.config_key}={name!r} is not a known {self.kind}.{hint} "
            f"Valid: {', '.join(sorted(self._entries))}."
        )

    def help(self, name: str) -> str:
        """One-line description of an entry."""
        self._fill()
        return self._help.get(name, "")

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        self._fill()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        self._fill()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._fill()
        return iter(self._entries)

    def __len__(self) -> int:
        self._fill()
        return len(self._entries)


BACKBONES: Registry[Callable[..., Any]] = Registry("backbone", "backbone.name", filled_by=("visiontune.backbones.tiny",))
"""Extra backbone names (tiny test models, aliases); any timm model name works as well."""

WEIGHT_SOURCES: Registry[Any] = Registry("weight source", "backbone.weights", filled_by=("visiontune.backbones.offline",))
"""Offline/package weight sources that produce timm-compatible state dicts."""

METHODS: Registry[Any] = Registry("method", "method.name", filled_by=("visiontune.methods",))
"""Fine-tuning methods (linear, full, scratch, lora, ...): Method subclasses."""

DATASETS: Registry[Callable[..., Any]] = Registry("dataset", "data.dataset", filled_by=("visiontune.data",))
"""Built-in datasets: functions returning ImageRecords."""

INFERENCE_PLUGINS: tuple[tuple[str, str | None, str], ...] = (
    ("torch", None, "visiontune.infer.backends"),
    ("onnxruntime", "onnx", "visiontune.infer.onnxruntime"),
    ("openvino", "openvino", "visiontune.infer.openvino"),
)
"""The inference backends' plug-in list: ``(--backend name, export --format name or None, module that registers it)``.

A backend is one module that registers an :class:`~visiontune.infer.backends.InferenceBackend` subclass in
:data:`INFERENCE_BACKENDS` and is listed here. Its two names are written here as well so the command line builds
``--backend`` / ``--format`` choices without importing torch; ``tests/infer/test_backends.py`` checks them against
what each module registers. Order matters: ``auto`` picks the first backend that can run what it is given."""

INFERENCE_BACKENDS: Registry[Any] = Registry(
    "inference backend", "--backend", filled_by=tuple(dict.fromkeys(module for _, _, module in INFERENCE_PLUGINS)),
)
"""Inference backends (torch, onnxruntime, openvino): InferenceBackend instances, filled from INFERENCE_PLUGINS."""
