"""Fine-tuning methods; importing this package registers every method in METHODS.

Every module of this package is imported here, so a method is added by adding its module (it registers
itself with :func:`~visiontune.methods.base.register_method`) and touching nothing else.
"""

import importlib
import pkgutil

from visiontune.methods.base import Method, classifier_of, freeze, register_method

# Sorted, so registration order (what `visiontune list methods` shows) does not depend on the file system.
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "classifier_of", "freeze", "register_method"]
