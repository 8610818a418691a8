"""Module attributes imported on first use (PEP 562), so ``import visiontune`` and the command line's
``--help`` load no torch, peft or optional package until something asks for it.

A package lists the public names it re-exports and the module each comes from; ``visiontune.<sub>``
for a submodule nobody imported yet is imported on access as well, as an eager ``__init__`` allowed.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_attributes(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` that imports ``exports[name]`` on first access.

    Args:
        package: the package's dotted name (its ``__name__``).
        exports: public name -> dotted module that defines it.
    """

    def __getattr__(name: str) -> Any:
        source = exports.get(name)
        if source is not None:
            value = getattr(importlib.import_module(source), name)
            setattr(sys.modules[package], name, value)  # later lookups skip this function
            return value
        if not name.startswith("_"):
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise  # the submodule exists but needs something that is missing: say what
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
