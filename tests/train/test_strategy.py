"""The strategies of the one training loop (visiontune.train.strategy), in one process.

The data-parallel loss is checked here on one process (a Dist of world 1: its sums are the identity): with every
weight 1 it is the one-process mean, and zero-weight padding rows change neither the loss nor the gradient. The
2-process runs themselves are compared with one process in tests/test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visiontune.backbones import create_backbone, input_size
from visiontune.config import BackboneConfig
from visiontune.distributed import Dist
from visiontune.train.strategy import DataParallel, OneProcess, current_strategy

CPU = torch.device("cpu")


def _grad(strategy: OneProcess, logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None,
          cw: torch.Tensor | None) -> tuple[float, torch.Tensor]:
    leaf = logits.detach().clone().requires_grad_(True)
    out = strategy.loss(leaf, y, w, cw, 0.1)
    out.loss.backward()
    assert out.finite
    return out.value, leaf.grad


@pytest.mark.parametrize("class_weighted", [False, True])
def test_data_parallel_loss_is_the_one_process_mean_and_ignores_padding(class_weighted: bool) -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 3, 1, 1])
    cw = torch.tensor([1.0, 0.5, 2.0, 1.5]) if class_weighted else None
    one_value, one_grad = _grad(OneProcess(CPU), logits, y, None, cw)
    assert one_value == pytest.approx(float(F.cross_entropy(logits, y, label_smoothing=0.1, weight=cw)))
    dp = DataParallel(Dist(None, 0, 1, CPU))
    value, grad = _grad(dp, logits, y, torch.ones(6), cw)
    assert value == pytest.approx(one_value, rel=1e-6)
    torch.testing.assert_close(grad, one_grad)
    # A padding copy of row 0 (weight 0), as a short share gets: same loss, no gradient through the copy.
    padded = torch.cat([logits, logits[:1]])
    value, grad = _grad(dp, padded, torch.cat([y, y[:1]]), torch.tensor([1.0] * 6 + [0.0]), cw)
    assert value == pytest.approx(one_value, rel=1e-6)
    torch.testing.assert_close(grad[:6], one_grad)
    assert torch.all(grad[6] == 0)


def test_a_non_finite_loss_is_reported_not_raised_by_the_strategy() -> None:
    logits = torch.tensor([[float("nan"), 0.0]])
    assert not OneProcess(CPU).loss(logits, torch.tensor([0]), None, None, 0.0).finite
    assert not DataParallel(Dist(None, 0, 1, CPU)).loss(logits, torch.tensor([0]), torch.ones(1), None, 0.0).finite


def test_one_process_strategy_passes_everything_through() -> None:
    s = current_strategy(CPU)
    assert type(s) is OneProcess and s.main and s.world == 1 and s.rank_seed(7) == 7
    loader = [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))]
    assert s.train_loader(loader, 0) is loader and s.eval_loader(loader) is loader  # type: ignore[arg-type]
    assert s.any(True) and not s.any(False) and s.broadcast({"a": 1}) == {"a": 1} and s.report() == {}
    assert s.collect(lambda: 3) == 3


def test_the_input_size_comes_from_the_model() -> None:
    """create_backbone records backbone.img_size in the model's metadata, so transforms need no config."""
    model = create_backbone(BackboneConfig(name="test_vit", weights="none", img_size=48), num_classes=3)
    assert input_size(model) == 48 and input_size(model, 64) == 64
    assert input_size(torch.nn.Linear(2, 2)) == 224  # no metadata: timm's default
