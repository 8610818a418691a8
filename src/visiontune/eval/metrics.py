"""Classification metrics for a run's predictions, as a JSON-serialisable dict.

scikit-learn does the arithmetic; this module fixes the label set (so a class missing from a split still
gets its per-class row and confusion row) and converts NumPy scalars to plain Python numbers so the
result can go straight into ``metrics.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _as_label_array(values: Any, name: str) -> np.ndarray:
    """Converts a list, NumPy array or (possibly CUDA) tensor of class indices to a 1-D int64 array."""
    if hasattr(values, "detach"):  # torch.Tensor without importing torch here
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D sequence of class indices, got shape {arr.shape}; "
            "pass argmax(logits, dim=1), not the logits"
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def load_metric_functions() -> tuple[Any, ...]:
    """scikit-learn's metric functions used by :func:`compute_metrics`, imported on first use.

    The import costs about a second on a small CPU; the training loop calls this before it starts timing
    the test pass, so the one-off is not counted as evaluation time.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    return accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def compute_metrics(y_true: Sequence[int] | Any, y_pred: Sequence[int] | Any, classes: list[str]) -> dict:
    """Accuracy, F1 scores, per-class precision/recall/F1 and the confusion matrix.

    Per-class rows and the confusion matrix cover every class in ``classes`` (``labels=range(len(classes))``),
    so a class absent from this split still appears, with support 0 and zero scores
    (``zero_division=0``). Macro F1 averages over the classes that occur in ``y_true`` or ``y_pred``
    (scikit-learn's own default): a class that is neither present nor predicted has no F1 to speak of,
    and counting it as 0 would make macro F1 depend on which classes a split happens to miss.
    Predicting an absent class still costs macro F1, because that class then enters the average with F1 0.

    Args:
        y_true: true class indices, one per sample.
        y_pred: predicted class indices, aligned with ``y_true``.
        classes: class names, index ``i`` naming class ``i``.

    Returns:
        ``{"accuracy", "f1_weighted", "f1_macro", "num_samples", "per_class": {name: {"precision",
        "recall", "f1", "support"}}, "confusion"}``; ``confusion[i][j]`` counts samples of true class
        ``i`` predicted as ``j``. All values are plain ``float``/``int``.

    Raises:
        ValueError: if the inputs are empty, of different lengths, or hold an index outside the classes.
    """
    accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support = load_metric_functions()

    true = _as_label_array(y_true, "y_true")
    pred = _as_label_array(y_pred, "y_pred")
    n_classes = len(classes)
    if n_classes == 0:
        raise ValueError("classes is empty; pass the class names in label-index order")
    if len(set(classes)) != n_classes:
        dupes = sorted({c for c in classes if classes.count(c) > 1})
        raise ValueError(f"class names must be unique, but {dupes} appear more than once in {classes}")
    if true.size == 0:
        raise ValueError("y_true is empty: there are no samples to score (is the split empty?)")
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} labels but y_pred has {pred.size}; they must be aligned")
    for name, arr in (("y_true", true), ("y_pred", pred)):
        bad = arr[(arr < 0) | (arr >= n_classes)]
        if bad.size:
            raise ValueError(
                f"{name} contains class index {int(bad[0])}, outside 0..{n_classes - 1} "
                f"for the {n_classes} classes {classes}; check that labels and classes come from the same dataset"
            )

    labels = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        true, pred, labels=labels, zero_division=0
    )
    present = sorted(set(true.tolist()) | set(pred.tolist()))
    return {
        "accuracy": float(accuracy_score(true, pred)),
        "f1_weighted": float(f1_score(true, pred, labels=labels, average="weighted", zero_division=0)),
        "f1_macro": float(f1_score(true, pred, labels=present, average="macro", zero_division=0)),
        "num_samples": int(true.size),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion": confusion_matrix(true, pred, labels=labels).astype(int).tolist(),
    }
