"""Fine-tuning methods; importing this package registers every method in METHODS.

Every method module of this package is imported here, so a method is added by adding its module (it
registers itself with :func:`~visiontune.methods.base.register_method`) and touching nothing else.
Building blocks that register nothing and import peft (:mod:`~visiontune.methods.lean_lora`) are left to
the methods that use them, so listing or validating methods loads no peft tuner.
"""

import importlib
import pkgutil

from visiontune.methods.base import Method, classifier_of, freeze, register_method

_BUILDING_BLOCKS = frozenset({"lean_lora"})  # imported by lora.py / qkv.py when a LoRA model is built

# Sorted, so registration order (what `visiontune list methods` shows) does not depend on the file system.
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name not in _BUILDING_BLOCKS:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "classifier_of", "freeze", "register_method"]
