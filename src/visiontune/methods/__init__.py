"""Fine-tuning methods; importing this package registers every built-in method in METHODS."""

from visiontune.methods.base import Method, classifier_of, freeze
from visiontune.methods import baselines  # noqa: F401  (registration)

__all__ = ["Method", "classifier_of", "freeze"]
