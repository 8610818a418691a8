"""LeanLoraLinear: peft's LoRA Linear with in-place accumulation computes what peft computes."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import nn

from visiontune.methods.lean_lora import LeanLoraLinear, use_lean_layers


class Net(nn.Module):
    def __init__(self, width: int = 12, hidden: int = 24) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, 5, bias=False)
        self.head = nn.Linear(5, 3)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(torch.relu(self.fc1(x))))


def _pair(dropout: float = 0.0, dora: bool = False) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    net = Net()
    cfg = dict(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=dora, target_modules=["fc1", "fc2"])
    lean = inject_adapter_in_model(use_lean_layers(LoraConfig(**cfg)), copy.deepcopy(net))
    ref = inject_adapter_in_model(LoraConfig(**cfg), copy.deepcopy(net))
    lean.load_state_dict(ref.state_dict())
    with torch.no_grad():  # B starts at zero in peft (DoRA's magnitude at the norm), which would hide a wrong term
        for m in (lean, ref):
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
                if "lora_magnitude_vector" in n:
                    p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    return lean, ref


def _run(model: nn.Module, x: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(seed)
    y = model(x)
    y.square().sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12)], ids=["2d", "3d"])
def test_lean_layer_equals_peft(dropout: float, shape: tuple[int, ...], dora: bool, monkeypatch) -> None:
    from peft.tuners.lora.dora import DoraLinearLayer

    lean, ref = _pair(dropout, dora)
    assert type(lean.fc1) is LeanLoraLinear and type(ref.fc1) is PeftLinear
    x = torch.randn(*shape, requires_grad=True)
    dora_calls = []
    real = DoraLinearLayer.forward
    monkeypatch.setattr(DoraLinearLayer, "forward", lambda *a, **k: dora_calls.append(1) or real(*a, **k))
    y1, g1 = _run(lean.train(), x)
    # DoRA without dropout takes the lean path (bias-free GEMM, B accumulated, one rescaling); with dropout
    # in training peft recomputes the base on the dropped input, so its own forward runs.
    assert bool(dora_calls) == (dora and dropout > 0)
    gx1 = x.grad.clone()
    x.grad = None
    y2, g2 = _run(ref.train(), x)
    assert y1.shape == y2.shape and torch.allclose(y1, y2, atol=1e-6)
    assert torch.allclose(gx1, x.grad, atol=1e-6)
    assert g1.keys() == g2.keys() and any("lora_A" in k for k in g1)
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-5), k


def test_lean_layer_follows_merge_disable_switch_and_dora() -> None:
    lean, ref = _pair()
    x = torch.randn(3, 12)
    for m in (lean, ref):
        m.eval()
    with torch.no_grad():
        assert torch.allclose(lean(x), ref(x), atol=1e-6)
        for layer in (lean.fc1, ref.fc1, lean.fc2, ref.fc2):
            layer.merge()
        assert torch.allclose(lean(x), ref(x), atol=1e-5)
        for layer in (lean.fc1, ref.fc1, lean.fc2, ref.fc2):
            layer.unmerge()
            layer.enable_adapters(False)
        disabled = lean(x)
        assert torch.allclose(disabled, ref(x), atol=1e-6)
        for layer in (lean.fc1, lean.fc2):
            layer.enable_adapters(True)
        assert (lean(x) - disabled).abs().max() > 1e-3  # the adapters do act when enabled
    dl, dr = _pair(dora=True)
    assert type(dl.fc1) is LeanLoraLinear
    x = torch.randn(4, 12)
    (y1, g1), (y2, g2) = _run(dl.train(), x), _run(dr.train(), x)
    assert torch.allclose(y1, y2, atol=1e-6) and all(torch.allclose(g1[k], g2[k], atol=1e-5) for k in g1)
    assert any("lora_magnitude_vector" in k for k in g1)
    with torch.no_grad():  # DoRA merged (peft's merge) and unmerged (lean) compute the same in eval
        dl.eval()
        unmerged = dl(x)
        for layer in (dl.fc1, dl.fc2):
            layer.merge()
        assert torch.allclose(dl(x), unmerged, atol=1e-5)


def test_four_bit_bases_keep_peft_bnb_layer() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from visiontune.methods.lora import quantize_linears

    torch.manual_seed(0)
    net = Net(width=32, hidden=64)  # NF4 blocks must tile each row: widths that are multiples of 32
    quantize_linears(net, "nf4", True, "float32")
    model = inject_adapter_in_model(use_lean_layers(LoraConfig(r=4, target_modules=["fc1", "fc2"])), net)
    assert not isinstance(model.fc1, LeanLoraLinear)
    assert isinstance(model.fc1.get_base_layer(), bnb.nn.Linear4bit)
    model(torch.randn(2, 32)).sum().backward()
