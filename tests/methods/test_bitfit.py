"""BitFit: only bias terms and the head train, it learns, and a run's adapter reloads to the same predictions."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import visiontune as vt
from visiontune.backbones import create_backbone
from visiontune.config import load_config
from visiontune.methods.base import classifier_of
from visiontune.methods.bitfit import BitFit, bias_parameters
from visiontune.registry import METHODS


def _model(backbone: str) -> tuple[BitFit, nn.Module]:
    cfg = load_config(overrides=["data.dataset=x", f"backbone.name={backbone}", "backbone.weights=none", "method.name=bitfit"])
    method = METHODS.get("bitfit")(cfg.method)
    torch.manual_seed(0)
    return method, method.apply(create_backbone(cfg.backbone, num_classes=4))


@pytest.mark.parametrize("backbone", ["test_vit_reg", "test_swin", "test_resnet"])
def test_only_biases_and_the_head_train(backbone: str) -> None:
    method, model = _model(backbone)
    head = {id(p) for p in classifier_of(model).parameters()}
    biases = {id(p) for p in bias_parameters(model)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == biases | head
    assert biases - head  # the backbone has biases of its own (projections, norm shifts)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in head:
                assert p.requires_grad == (name == "bias"), (type(module).__name__, name)
    saved = method.trainable_state_dict(model)
    assert all(k.endswith(".bias") or k.endswith(("running_mean", "running_var", "num_batches_tracked"))
               or id(dict(model.named_parameters()).get(k)) in head for k in saved)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < 0.1 * sum(p.numel() for p in model.parameters())


def test_training_the_biases_lowers_the_loss() -> None:
    # test_vit: the random test_vit_reg's layer-scale (1e-5) makes its features nearly constant
    method, model = _model("test_vit")
    with torch.no_grad():  # a frozen head, so the decrease comes from the backbone's biases alone
        classifier_of(model).weight.normal_(0, 0.5)
    classifier_of(model).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(".bias") for n in changed)


def test_a_bitfit_run_saves_biases_and_reloads_to_its_predictions(tiny_overrides) -> None:
    # A zero head: the probe head fitted on a random tiny ViT's features starts at a loss near 20 that jumps from
    # epoch to epoch (up or down with the thread count), which says nothing about bitfit.
    result = vt.train(load_config(overrides=[*tiny_overrides, "method.name=bitfit", "optim.epochs=3", "run.name=b",
                                             "optim.head_init=zero"]))
    history = result.metrics["train"]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    adapter = load_file(str(result.run_dir / "adapter.safetensors"))
    run = vt.load(str(result.run_dir))
    head = {n for n, _ in classifier_of(run.model).named_parameters()}
    assert adapter and all(k.endswith(".bias") or k.removeprefix("head.") in head for k in adapter)
    assert json.loads((result.run_dir / "labels.json").read_text()) == run.classes
    again = vt.evaluate(str(result.run_dir))
    assert again["accuracy"] == result.accuracy
    assert again["confusion"] == result.metrics["test"]["confusion"]
