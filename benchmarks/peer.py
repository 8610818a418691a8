"""The hand-written peer: what a competent user writes instead of visiontune.

timm for the model, peft for LoRA/DoRA (bitsandbytes NF4 for QLoRA), a plain PyTorch loop, and for
the linear probe backbone features + scikit-learn ``LogisticRegression``. Nothing here imports
visiontune: it is the baseline ``bench_peer.py`` compares the project against, with the same model
weights, images, split, batch size, epochs, learning rates and schedule (all passed in ``spec``).

The recipe mirrors the project's resolved config on purpose (AdamW, per-step linear warmup then cosine
to ``min_lr_ratio``, no weight decay on 1-d parameters / tokens, label smoothing, gradient clipping,
zero-initialised head, LoRA alpha and dropout), so that differences in speed come from how the work is
done, not from a different recipe. Choices a user would make and the project does not: peft on timm's
fused ``qkv`` (the project splits it into q/k/v), ``torch.no_grad`` rather than ``inference_mode``,
un-merged adapters at evaluation, images decoded and converted to RGB on every access, Mona written
after the authors' code (three separate depthwise convolutions).
"""

from __future__ import annotations

import math
import time
import types
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset


class Images(Dataset):
    """(path, label) pairs -> (transformed RGB image, label)."""

    def __init__(self, items: list[tuple[str, int]], transform: Any):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def transforms(model: nn.Module, spec: dict[str, Any]) -> tuple[Any, Any]:
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({"input_size": (3, spec["img_size"], spec["img_size"])}, model=model)
    train = create_transform(
        **cfg, is_training=True, scale=(spec["crop_scale"], 1.0), hflip=0.5, vflip=0.0, color_jitter=None,
        auto_augment=None, re_prob=0.0,
    )
    test = create_transform(**cfg, is_training=False)
    return (train if spec["augment"] else test), test


def build_model(spec: dict[str, Any]) -> nn.Module:
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(spec["arch"], img_size=spec["img_size"], num_classes=spec["num_classes"])
    missing, unexpected = model.load_state_dict(load_file(spec["weights"]), strict=False)
    assert not unexpected and set(missing) == {"head.weight", "head.bias"}, (missing, unexpected)
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    return model


# ----------------------------------------------------------------------------- methods


def quantize_4bit(model: nn.Module) -> None:
    """Every Linear inside the blocks -> bitsandbytes NF4 (double quant, fp32 compute on CPU)."""
    import bitsandbytes as bnb

    for block in model.blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.contiguous(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
                    if child.bias is not None:
                        q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                    setattr(parent, name, q.to("cpu"))
    model.is_loaded_in_4bit = True  # peft picks its 4-bit LoRA layer from this flag


def add_lora(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    if spec.get("quantize"):
        quantize_4bit(model)
    config = LoraConfig(
        r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"], use_dora=spec["use_dora"],
        target_modules=spec["target_regex"], modules_to_save=["head"],
    )
    return get_peft_model(model, config)


class Mona(nn.Module):
    """Mona adapter (Yin et al., CVPR'25) after the authors' code; class token skips the convolutions."""

    def __init__(self, dim: int, inner: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.gammax = nn.Parameter(torch.ones(dim))
        self.down = nn.Linear(dim, inner)
        self.conv1 = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        self.conv2 = nn.Conv2d(inner, inner, 5, padding=2, groups=inner)
        self.conv3 = nn.Conv2d(inner, inner, 7, padding=3, groups=inner)
        self.projector = nn.Conv2d(inner, inner, 1)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(inner, dim)
        for lin in (self.down, self.up):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.up.weight)  # start as the identity

    def forward(self, x: torch.Tensor, hw: tuple[int, int], prefix: int) -> torch.Tensor:
        b, n, _ = x.shape
        z = self.down(self.norm(x) * self.gamma + x * self.gammax)
        cls, grid = z[:, :prefix], z[:, prefix:].reshape(b, hw[0], hw[1], -1).permute(0, 3, 1, 2)
        grid = grid + (self.conv1(grid) + self.conv2(grid) + self.conv3(grid)) / 3.0
        grid = grid + self.projector(grid)
        cls = cls + F.linear(cls, self.projector.weight.flatten(1), self.projector.bias)
        z = torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(b, n - prefix, -1)], dim=1)
        return x + self.up(self.dropout(F.gelu(z)))


def add_mona(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    grid = model.patch_embed.grid_size
    prefix = model.num_prefix_tokens

    def forward(self: nn.Module, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = self.mona1(x, grid, prefix)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return self.mona2(x, grid, prefix)

    for block in model.blocks:
        block.mona1 = Mona(model.embed_dim, spec["inner_dim"], spec["mona_dropout"])
        block.mona2 = Mona(model.embed_dim, spec["inner_dim"], spec["mona_dropout"])
        block.forward = types.MethodType(forward, block)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return model


def param_groups(model: nn.Module, spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            is_head = ".head." in f".{name}."
            no_decay = p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
            groups.setdefault((is_head, no_decay), []).append(p)
    return [
        {"params": ps, "lr": spec["head_lr"] if head else spec["lr"], "weight_decay": 0.0 if nd else spec["weight_decay"]}
        for (head, nd), ps in groups.items()
    ]


def schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int, min_ratio: float) -> Any:
    warmup = min(warmup, total - 1) if total > 1 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def train_loop(model: nn.Module, spec: dict[str, Any], train_loader: DataLoader) -> None:
    optimizer = torch.optim.AdamW(param_groups(model, spec))
    steps = len(train_loader)
    scheduler = schedule(optimizer, steps * spec["epochs"], round(spec["warmup_epochs"] * steps), spec["min_lr_ratio"])
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(spec["epochs"]):
        model.train()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=spec["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec["clip_grad"])
            optimizer.step()
            scheduler.step()


@torch.no_grad()
def features(model: nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    xs, ys = [], []
    for x, y in loader:
        xs.append(model.forward_head(model.forward_features(x), pre_logits=True))
        ys.append(y)
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def run(spec: dict[str, Any], memory: Any) -> dict[str, Any]:
    """Train and evaluate one method as the peer; times and peak memory of the training part.

    Args:
        spec: everything the run needs (see ``bench_peer.peer_spec``).
        memory: a context-manager factory measuring peak memory (the harness's, not part of the peer).
    """
    torch.manual_seed(spec["seed"])
    model = build_model(spec)
    train_tf, test_tf = transforms(model, spec)
    method = spec["method"]
    gen = torch.Generator().manual_seed(spec["seed"])
    test_loader = DataLoader(Images(spec["test"], test_tf), batch_size=spec["eval_batch_size"])
    out: dict[str, Any] = {}
    if method == "linear":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        t0 = time.perf_counter()
        with memory() as mem:
            x, y = features(model, DataLoader(Images(spec["train"], test_tf), batch_size=spec["eval_batch_size"]))
            scaler = StandardScaler().fit(x)
            clf = LogisticRegression(max_iter=1000).fit(scaler.transform(x), y)
        out["train_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        xt, yt = features(model, test_loader)
        out["accuracy"] = float((clf.predict(scaler.transform(xt)) == yt).mean())
        out["eval_s"] = time.perf_counter() - t0
        out["peak_mb"], out["delta_mb"] = mem.peak_mb, mem.delta_mb
        out["train_images"] = len(spec["train"])
        return out
    if method == "linear_loop":  # the head trained by gradient, with a backbone forward every epoch
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.head.parameters():
            p.requires_grad_(True)
    elif method in ("lora", "dora", "qlora"):
        model = add_lora(model, spec)
    elif method == "mona":
        model = add_mona(model, spec)
    elif method != "full":
        raise ValueError(f"unknown peer method {method!r}")
    train_loader = DataLoader(Images(spec["train"], train_tf), batch_size=spec["batch_size"], shuffle=True, generator=gen)
    t0 = time.perf_counter()
    with memory() as mem:
        train_loop(model, spec, train_loader)
    out["train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["accuracy"] = evaluate(model, test_loader)
    out["eval_s"] = time.perf_counter() - t0
    out["peak_mb"], out["delta_mb"] = mem.peak_mb, mem.delta_mb
    out["train_images"] = len(spec["train"]) * spec["epochs"]
    return out
