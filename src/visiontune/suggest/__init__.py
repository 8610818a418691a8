"""``visiontune suggest``: which unlabeled images to label next, and why.

Cold start (no labels): a coverage rule on the backbone's frozen features picks images that represent the
pool. With labels (``--labeled DATA``: a linear probe is fitted on their features, as ``method.name=linear``
fits it) or a trained run (``--run RUN_DIR``: its own features and classifier), uncertainty rules pick the
images the model is least sure about. ``auto`` switches by the number of labels per class, at the point the
simulation in ``benchmarks/suggest`` measured. The rules live in :mod:`visiontune.suggest.strategies`, the
streamed on-disk features in :mod:`visiontune.suggest.features`, the files written in
:mod:`visiontune.suggest.output`, the labeling page in :mod:`visiontune.suggest.label`.

The package imports nothing heavy until a name is used (``visiontune --help`` builds this command's parser from
:data:`~visiontune.suggest.strategies.STRATEGIES` without torch); the pipeline is
:mod:`visiontune.suggest.pipeline`.
"""

from visiontune.lazy import lazy_attributes

__getattr__ = lazy_attributes(__name__, {
    "STRATEGIES": "visiontune.suggest.strategies", "SuggestResult": "visiontune.suggest.pipeline",
    "list_pool": "visiontune.suggest.pipeline", "suggest": "visiontune.suggest.pipeline",
})

__all__ = ["STRATEGIES", "SuggestResult", "list_pool", "suggest"]
