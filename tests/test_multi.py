"""The multi-adapter host: one backbone in memory, several tasks with their own heads, interleaved calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from visiontune.backbones import backbone_identity, create_backbone
from visiontune.config import load_config
from visiontune.errors import WeightsError
from visiontune.methods.base import shared_copy
from visiontune.multi import AdapterHost
from visiontune.registry import METHODS
from visiontune.runs import ADAPTER_FILE, save_adapter


def _perturb(model: nn.Module, seed: int) -> None:
    """Stand-in for training: move every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fixed tiny DINOv2-style backbone as a weights file (every rebuild is the same backbone)."""
    torch.manual_seed(0)
    base = create_backbone(load_config(overrides=["data.dataset=x", "backbone.name=test_vit_reg", "backbone.weights=none"]).backbone, 0)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_file(base.state_dict(), str(path))
    return path


def _make_run(run_dir: Path, weights: Path | str, method: str, classes: list[str], seed: int, *extra: str):
    """Write a finished run (config, labels, adapter) and return its model as trained.

    Like train(), it seeds torch with run.seed right before building the backbone.
    """
    cfg = load_config(overrides=[
        "data.dataset=digits", "backbone.name=test_vit_reg", f"backbone.weights={weights}", f"method.name={method}",
        f"run.seed={seed}", *extra,
    ])
    m = METHODS.get(method)(cfg.method)
    torch.manual_seed(seed)
    model = m.apply(create_backbone(cfg.backbone, num_classes=len(classes)))
    _perturb(model, seed)
    run_dir.mkdir(parents=True)
    cfg.dump(run_dir / "config.yaml")
    (run_dir / "labels.json").write_text(json.dumps(classes))
    save_adapter(run_dir / ADAPTER_FILE, m, model, backbone_identity(cfg.backbone), classes)
    return model.eval()


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_tasks_answer_correctly_interleaved_and_share_the_backbone(tmp_path: Path, weights: Path) -> None:
    specs = {
        "cows": ("lora", ["calm", "eating", "lying"], ["method.targets=qv"]),
        "solar": ("dora", ["ok", "crack", "dark", "finger", "other"], ["method.targets=all-linear", "method.rank=4"]),
        "probe": ("linear", ["x", "y"], []),
    }
    expected_models = {
        name: _make_run(tmp_path / name, weights, method, classes, i + 1, *extra)
        for i, (name, (method, classes, extra)) in enumerate(specs.items())
    }
    host = AdapterHost.from_runs({name: tmp_path / name for name in specs})
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = {n: m(x) for n, m in expected_models.items()}
    for name in ["cows", "solar", "cows", "probe", "solar", "probe", "cows"]:
        logits = host.logits(name, x)
        assert logits.shape == (3, len(specs[name][1]))
        assert torch.allclose(logits, expected[name], atol=1e-6), name
    labels = host.predict("solar", x)
    assert labels == [specs["solar"][1][i] for i in expected["solar"].argmax(1).tolist()]

    # Frozen weights live once: the two LoRA-family tasks use the same split q/k/v tensors, and every
    # backbone tensor of the prepared backbone (all but its head) is used by each task, not copied.
    cows, solar, probe = (host.tasks[n] for n in ("cows", "solar", "probe"))
    assert cows.backbone_key == solar.backbone_key == "split-qkv" and probe.backbone_key == ""
    q_cows = cows.model.blocks[1].attn.qkv.q.base_layer.weight
    q_solar = solar.model.blocks[1].attn.qkv.q.base_layer.weight
    assert _ptr(q_cows) == _ptr(q_solar)
    assert _ptr(cows.model.blocks[0].mlp.fc1.weight) == _ptr(solar.model.blocks[0].mlp.fc1.base_layer.weight)
    for task in (cows, solar, probe):
        base = host._bases[task.backbone_key]
        head = {_ptr(t) for t in base.get_classifier().parameters()}
        base_ptrs = {_ptr(t) for t in [*base.parameters(), *base.buffers()]} - head
        task_ptrs = {_ptr(t) for t in [*task.model.parameters(), *task.model.buffers()]}
        assert base_ptrs <= task_ptrs, task.name
    # Each task holds only its adapter and head privately.
    assert cows.private_bytes < 0.2 * host.memory()["backbones"]["split-qkv"]


def test_qlora_tasks_share_one_4bit_backbone_and_full_tasks_share_nothing(tmp_path: Path, weights: Path) -> None:
    import bitsandbytes as bnb

    a = _make_run(tmp_path / "a", weights, "qlora", ["p", "q", "r"], 1, "method.targets=q")
    b = _make_run(tmp_path / "b", weights, "qdora", ["p", "q"], 2, "method.targets=mlp")
    full = _make_run(tmp_path / "f", weights, "full", ["u", "v", "w", "z"], 3)
    host = AdapterHost.from_runs({"a": tmp_path / "a", "b": tmp_path / "b", "full": tmp_path / "f"})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for name, model in (("a", a), ("full", full), ("b", b), ("a", a)):
            assert torch.allclose(host.logits(name, x), model(x), atol=1e-5), name
    ta, tb = host.tasks["a"], host.tasks["b"]
    assert ta.backbone_key == tb.backbone_key  # same quantization settings -> one NF4 backbone
    wa = ta.model.blocks[0].attn.qkv.k.weight
    wb = tb.model.blocks[0].attn.qkv.k.weight
    assert isinstance(wa, bnb.nn.Params4bit) and _ptr(wa) == _ptr(wb)
    # `full` trains the backbone: it got private copies, and the shared backbone stayed frozen and unchanged.
    assert host.tasks["full"].shared_tensors == 0
    assert not any(p.requires_grad for base in host._bases.values() for p in base.parameters())


def test_adapter_of_another_backbone_is_refused(tmp_path: Path, weights: Path) -> None:
    _make_run(tmp_path / "a", weights, "lora", ["p", "q"], 1)
    _make_run(tmp_path / "b", weights, "lora", ["p", "q"], 2, "backbone.img_size=48")
    with pytest.raises(WeightsError, match=r"task 'b' .* different backbone .*img_size: adapter has 48, backbone has 32"):
        AdapterHost.from_runs({"a": tmp_path / "a", "b": tmp_path / "b"})


def test_host_api_errors(tmp_path: Path, weights: Path) -> None:
    _make_run(tmp_path / "a", weights, "lora", ["p", "q"], 1)
    host = AdapterHost.from_runs({"a": tmp_path / "a"})
    with pytest.raises(KeyError, match="no task 'nope'; loaded tasks: a"):
        host.logits("nope", torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="already loaded"):
        host.add_run("a", tmp_path / "a")
    assert host.classes("a") == ["p", "q"] and host.transform is not None
    host.remove("a")
    assert host.tasks == {}


def test_shared_copy_shares_tensors_not_modules() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    copy_ = shared_copy(model)
    assert copy_ is not model and copy_[0] is not model[0]
    assert copy_[0].weight is model[0].weight and copy_[1].running_mean is model[1].running_mean
    copy_[0] = nn.Identity()
    assert isinstance(model[0], nn.Linear)


def test_random_init_backbones_are_rebuilt_from_the_run_seed(tmp_path: Path) -> None:
    a = _make_run(tmp_path / "a", "none", "lora", ["p", "q"], 4)
    b = _make_run(tmp_path / "b", "none", "dora", ["yes", "no"], 4)
    _make_run(tmp_path / "c", "none", "lora", ["p", "q"], 5)
    _make_run(tmp_path / "d", "none", "lora", ["p", "q", "r"], 4)
    host = AdapterHost.from_runs({"a": tmp_path / "a", "b": tmp_path / "b"})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.allclose(host.logits("a", x), a(x), atol=1e-6)
        assert torch.allclose(host.logits("b", x), b(x), atol=1e-6)
    with pytest.raises(WeightsError, match=r"random-init backbone .* run.seed=5 and 2 classes, .*=\(4, 2\)"):
        host.add_run("c", tmp_path / "c")
    with pytest.raises(WeightsError, match=r"run.seed=4 and 3 classes"):
        host.add_run("d", tmp_path / "d")
