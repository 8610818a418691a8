"""Fine-tuning methods; importing this package registers every built-in method in METHODS."""

from visiontune.methods.base import Method, classifier_of, freeze
from visiontune.methods import baselines  # noqa: F401  (registration)
from visiontune.methods import lora  # noqa: F401  (registration: lora, dora, qlora, qdora)
from visiontune.methods import mona  # noqa: F401  (registration)
from visiontune.methods import prototype  # noqa: F401  (registration)

__all__ = ["Method", "classifier_of", "freeze"]
