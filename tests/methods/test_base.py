"""Helpers of the method interface shared by methods, the training loop and the adapter host."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visiontune.methods.base import classifier_of, find_classifier, tensor_bytes, tensors_bytes


def test_tensors_bytes_counts_each_tensor_once() -> None:
    a, b = torch.zeros(10, dtype=torch.float32), torch.zeros(3, dtype=torch.float16)
    assert tensor_bytes(a) == 40 and tensor_bytes(b) == 6
    assert tensors_bytes([a, b, a, a]) == 46
    tied = nn.Linear(4, 4)
    model = nn.Sequential(tied, tied)
    assert tensors_bytes([*model.parameters(), *tied.parameters()]) == (16 + 4) * 4


def test_classifier_finders_agree() -> None:
    class Timmish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(2, 3)

        def get_classifier(self) -> nn.Module:
            return self.head

    model = Timmish()
    assert find_classifier(model) is classifier_of(model) is model.head
    assert find_classifier(nn.Linear(2, 2)) is None
    with pytest.raises(TypeError, match="get_classifier"):
        classifier_of(nn.Linear(2, 2))
