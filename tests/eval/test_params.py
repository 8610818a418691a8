import pytest
import torch
from torch import nn

from visiontune.eval import count_parameters


def test_frozen_parts_are_total_but_not_trainable():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    counts = count_parameters(model)
    assert counts == {"trainable": 3 * 2 + 2, "total": 4 * 3 + 3 + 8, "trainable_pct": pytest.approx(100 * 8 / 23)}


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: one tensor, two modules

    def forward(self, x):
        return self.head(self.embed(x))


def test_tied_weights_are_counted_once():
    counts = count_parameters(TiedLM())
    assert counts["total"] == 40 and counts["trainable"] == 40 and counts["trainable_pct"] == 100.0


def test_empty_module():
    assert count_parameters(nn.ReLU()) == {"trainable": 0, "total": 0, "trainable_pct": 0.0}


@pytest.mark.parametrize(("n_in", "n_out"), [(64, 32), (63, 31)])  # odd count: the packed tensor is padded
def test_bitsandbytes_4bit_weights_count_logical_values(n_in, n_out):
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(n_in, n_out, bias=True, quant_type="nf4", compute_dtype=torch.float32)
    # Before quantization the Params4bit still holds floats and must be counted as they are.
    assert count_parameters(layer)["total"] == n_in * n_out + n_out
    layer = layer.to("cpu")  # quantizes: uint8 storage, two values per byte
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() < n_in * n_out
    layer.weight.requires_grad_(False)
    counts = count_parameters(layer)
    assert counts["total"] == n_in * n_out + n_out
    assert counts["trainable"] == n_out  # only the bias
