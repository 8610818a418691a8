import json

import pytest
import torch

from visiontune.eval import compute_metrics

CLASSES = ["a", "b", "c", "d"]


def test_hand_computed_example_with_absent_class_and_zero_division():
    # true:  a a b b c ; pred: a b b b a ; class d never occurs, c is never predicted.
    m = compute_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], CLASSES)
    assert m["num_samples"] == 5
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    # c: never predicted -> precision 0/0 is reported as 0, recall 0/1.
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # d: absent from the split, still gets a row.
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["f1_weighted"] == pytest.approx((2 * 0.5 + 2 * 0.8 + 1 * 0.0) / 5)
    # Macro over the classes present in labels or predictions (a, b, c), not the absent d.
    assert m["f1_macro"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["confusion"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_predicting_an_absent_class_costs_macro_f1():
    m = compute_metrics([0, 1], [0, 2], ["x", "y", "z"])
    assert m["f1_macro"] == pytest.approx(1 / 3)
    assert m["per_class"]["z"]["support"] == 0


def test_confusion_rows_are_true_classes_and_columns_predictions():
    m = compute_metrics([0, 0, 0, 2], [1, 1, 1, 2], ["cat", "dog", "cow"])
    assert m["confusion"][0] == [0, 3, 0]  # three true cats predicted as dog
    assert [row[0] for row in m["confusion"]] == [0, 0, 0]  # nothing predicted as cat
    assert m["confusion"][2][2] == 1


def test_result_is_plain_python_and_json_serialisable():
    m = compute_metrics(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), ["p", "q"])
    json.dumps(m)
    assert type(m["accuracy"]) is float and type(m["f1_macro"]) is float
    assert type(m["num_samples"]) is int
    assert type(m["per_class"]["p"]["support"]) is int and type(m["per_class"]["p"]["f1"]) is float
    assert all(type(v) is int for row in m["confusion"] for v in row)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "classes", "match"),
    [
        ([0, 1], [0], ["a", "b"], "aligned"),
        ([], [], ["a", "b"], "empty"),
        ([0, 5], [0, 1], ["a", "b"], "class index 5"),
        ([0, 1], [0, -1], ["a", "b"], "class index -1"),
        ([0, 1], [0, 1], ["a", "a"], "unique"),
        ([[0.1, 0.9]], [1], ["a", "b"], "1-D"),
    ],
)
def test_bad_inputs_are_named(y_true, y_pred, classes, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(y_true, y_pred, classes)
