"""LoRA / DoRA on convolutional backbones: ResNet (BasicBlock and Bottleneck) and ConvNeXt (Linear and 1x1-conv MLP).

The real timm classes at their real widths, one block per stage, 32 px inputs. Each cell trains one step,
checks that the adapters change the logits (so the merge check below is not vacuous), that merged ==
unmerged, and that the saved adapter reloads into a fresh model with the same predictions. Random init
hides adapters on both families, so the tests undo that: timm zero-inits the last BatchNorm of every
ResNet block (the residual branch, and every adapter inside it, then adds exactly nothing) and starts
ConvNeXt's layer-scale at 1e-6; pretrained weights have neither.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from visiontune.methods.qkv import split_qkv
from visiontune.errors import ConfigError
from visiontune.methods.lora import lora_layers
from visiontune.methods.targets import resolve_targets, supported_presets
from visiontune.registry import METHODS

# name -> (timm model, kwargs): one block per stage, real widths.
ARCHS = {
    "resnet18": ("resnet18", dict(layers=(1, 1, 1, 1), zero_init_last=False)),
    "resnet50": ("resnet50", dict(layers=(1, 1, 1, 1), zero_init_last=False)),
    "convnext_atto": ("convnext_atto", dict(depths=(1, 1, 1, 1), ls_init_value=1.0)),  # 1x1-conv MLP (timm default)
    "convnext_atto_linear_mlp": ("convnext_atto", dict(depths=(1, 1, 1, 1), ls_init_value=1.0, conv_mlp=False)),
    "convnext_nano_ols": ("convnext_nano_ols", dict(depths=(1, 1, 1, 1), ls_init_value=1.0)),  # 1x1-conv MLP
}
# What each preset must select per block, for the presets that apply ("blocks" = every block of the model).
RESNET18_BLOCK = ["conv1", "conv2"]
RESNET50_BLOCK = ["conv1", "conv2", "conv3"]
CONVNEXT_MLP = ["mlp.fc1", "mlp.fc2"]
SUPPORTED = {
    "resnet18": ["conv"],
    "resnet50": ["conv"],
    "convnext_atto": ["mlp", "all-linear", "conv"],
    "convnext_atto_linear_mlp": ["mlp", "all-linear"],
    "convnext_nano_ols": ["mlp", "all-linear", "conv"],
}
# The preset each cell trains: what a user of that architecture would pick.
TRAINED = {"resnet18": "conv", "resnet50": "conv", "convnext_atto": "conv", "convnext_atto_linear_mlp": "mlp",
           "convnext_nano_ols": "mlp"}
MERGE_TOL = 1e-4


def _build(arch: str, seed: int = 0) -> nn.Module:
    name, kwargs = ARCHS[arch]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs)


def _method(name: str, **kw: object):
    cls = METHODS.get(name)
    return cls(cls.config_cls(name=name, **kw))


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _expected(arch: str, preset: str) -> list[str]:
    if arch.startswith("resnet"):
        per_block = RESNET18_BLOCK if arch == "resnet18" else RESNET50_BLOCK
        # Block 0 of stages 2-4 also has a strided 1x1 shortcut projection; resnet50's first one too.
        blocks = [f"layer{s}.0" for s in range(1, 5)]
        return [f"{b}.{c}" for b in blocks for c in [*per_block, "downsample.0"]
                if c != "downsample.0" or b != "layer1.0" or arch == "resnet50"]
    return [f"stages.{s}.blocks.0.{rel}" for s in range(4) for rel in CONVNEXT_MLP]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cnn_presets_select_the_right_layers(arch: str) -> None:
    with torch.device("meta"):  # structure only: no weights needed
        model = _build(arch)
    split_qkv(model)
    assert supported_presets(model) == SUPPORTED[arch]
    for preset in SUPPORTED[arch]:
        assert resolve_targets(model, [preset]) == _expected(arch, preset), preset
    ok = ", ".join(SUPPORTED[arch])
    for preset in ("qv", "attn"):
        with pytest.raises(ConfigError, match=rf"'{preset}' selects nothing.*has no attention: it is a CNN.*supports: {ok}; "
                                              rf"use method\.targets={SUPPORTED[arch][0]}.*method\.name=linear / full"):
            resolve_targets(model, [preset])


def test_all_linear_on_a_resnet_points_to_conv() -> None:
    with torch.device("meta"):
        model = _build("resnet50")
    with pytest.raises(ConfigError, match=r"'all-linear' selects nothing.*no Linear layer and no MLP.*1x1 convs included.*"
                                          r"'conv' preset.*use method\.targets=conv"):
        resolve_targets(model, ["all-linear"])


@pytest.mark.parametrize("method_name", ["lora", "dora"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cnn_trains_one_step_and_merges(arch: str, method_name: str, tmp_path: Path) -> None:
    targets = [TRAINED[arch]]
    method = _method(method_name, targets=targets, rank=4)
    model = method.apply(_build(arch))
    assert method.targeted == _expected(arch, targets[0])
    assert {type(m.get_base_layer()) for _, m in lora_layers(model)} == ({nn.Linear} if arch.endswith("linear_mlp") else {nn.Conv2d})
    x, y = _x(), torch.tensor([0, 2])
    with torch.no_grad():
        before = model.eval()(x)
    model.train()
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-2, head_lr=1e-2, weight_decay=0.0))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    adapter_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert adapter_grads and all(g is not None for g in adapter_grads)
    opt.step()

    model.eval()
    with torch.no_grad():
        expected = model(x)
        merged_model = method.merge(model)
        merged = merged_model(x)
        for _, layer in lora_layers(model):  # what the head alone learned, without the adapters' contribution
            layer.enable_adapters(False)
        head_only = model(x)
        for _, layer in lora_layers(model):
            layer.enable_adapters(True)
    assert (expected - head_only).abs().max().item() > 100 * MERGE_TOL, "the adapters do not change the logits"
    assert not torch.equal(expected, before)
    assert (merged - expected).abs().max().item() < MERGE_TOL
    assert not lora_layers(merged_model)

    path = tmp_path / "trained.safetensors"
    save_file({k: v.contiguous() for k, v in method.trainable_state_dict(model).items()}, str(path))
    fresh_method = _method(method_name, targets=targets, rank=4)
    fresh = fresh_method.apply(_build(arch))  # same seed: the same frozen backbone, as a run reloads it
    fresh_method.load_trainable_state_dict(fresh, load_file(str(path)))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)
