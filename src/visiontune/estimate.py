"""``visiontune estimate``: the memory a run needs on its device, worked out before anything is loaded.

Why: a 7B backbone that does not fit is otherwise found out after minutes of building, quantizing and
loading data. Here the run's backbone is built on PyTorch's meta device (shapes, no storage: a 7B ViT in
about a second), its method applied as for a run, and the memory is added up from shapes:

* **weights**: every parameter and buffer at its stored size; for ``qlora``/``qdora`` the Linears that will
  be quantized count as NF4: 0.5 byte per weight plus the block scales (one fp32 absmax per 64 or 32
  values, or with double quantization one byte per block plus one fp32 per 256 blocks).
* **gradients**: the trainable parameters, fp32. **optimizer**: AdamW's two moments, 2 x trainable fp32.
* **activations**: what autograd keeps from the forward pass for the backward pass. For a pre-norm ViT
  block with ``N`` tokens of width ``D``, MLP width ``M`` and fused attention (SDPA: no N x N matrix), per
  image: the two LayerNorm inputs (``2ND``, fp32: the residual stream stays fp32 under autocast), q, k, v
  and the attention output (``4ND``), the activation-function input (``NM``; SwiGLU ``3NM``), and, where a
  layer's weight (or an adapter on it) is trained, that layer's input (qkv ``ND``, fc1 ``ND``, fc2 ``NM``;
  proj's input is a view of the kept attention output). Full fine-tuning of a ViT with ``M = 4D`` keeps
  ``(2 + 4 + 4 + 1 + 1 + 4) ND = 16 ND`` per block; LoRA on q, v keeps ``(2 + 4 + 4 + 1) ND = 11 ND``; blocks
  before the first trained parameter keep nothing. Rather
  than tabulating this per family and method, the forward pass is run on the meta device under
  ``torch.autograd.graph.saved_tensors_hooks`` and the saved tensors are counted (each storage once), so
  the count follows any timm family, adapter placement (Mona, DoRA, ``blocks=last:N``), the class-token
  shortcut of the training loop and the batch/image size. Fused attention is counted as the CUDA/CPU
  kernels store it (q, k, v, output, log-sum-exp); the meta device itself would fall back to the math path.
  Under bf16/fp16 autocast the saved tensors count at 2 bytes per value, except the LayerNorm inputs (the
  fp32 residual stream); each weight a matmul saves is kept as a bf16 copy (2 bytes per weight; not for
  4-bit layers, whose kernel keeps the packed weight). With gradient checkpointing each block keeps only
  its input, and one block's full set is recomputed at a time during the backward pass.
  Summed, this is ``B x N x D x L x k`` bytes for a ViT of depth ``L``, with ``k`` the per-block factor
  above times the bytes per value.
* **peak**: ``weights + AdamW + max(backward pass, optimizer step) + best-epoch copy``. The backward pass
  frees activations as it produces gradients; where that memory is reused (CUDA's caching allocator) it
  peaks at ``max(activations x c + weight copies, gradients) + runtime``, with gradient accumulation or
  glibc's default allocator (which keeps freed blocks) at their sum. The optimizer step holds the gradients
  and, on CUDA, one trainable-sized temporary of AdamW's foreach update (that is also when an epoch's
  checkpoint copies the trainable weights). With a validation split the best epoch's trainable weights are kept.

The allowance ``c`` and the runtime constant were **fitted to CPU measurements** (:data:`CPU_CALIBRATION`):
the peak process RSS that training adds, which is what ``metrics.json``'s ``peak_memory_delta_mb`` reports
on CPU, against the saved-tensor count. They cover the backward pass's transient gradient buffers and what
glibc's allocator keeps of freed memory; the latter varies with the allocation pattern (DoRA, Mona,
checkpointing), so the CPU figure is within 15 % for plain ViT LoRA / full fine-tuning runs and up to about
25 % off for some others (``benchmarks/results/estimate-cpu.md`` lists each). The same runs with freed memory
returned at once (``MALLOC_MMAP_THRESHOLD_=16384``) peak at the live tensors, which is what a CUDA run's
``torch.cuda.max_memory_allocated`` (``peak_memory_mb``, weights included) counts too: all 15 are within 10 %
of the reuse model with the saved tensors as counted plus 30 MiB (:data:`LIVE_CALIBRATION`).
:data:`CUDA_CALIBRATION` rests on that until a GPU run measures it (``benchmarks/gpu_check.sh`` prints
estimate vs measured).

Written by hand: no library estimates training memory for timm models with these adapters.

Why one module over 500 lines: the accounting (weights, gradients, optimizer, peak) and the saved-tensor trace it
rests on are one model of memory, calibrated together (the constants of :data:`CPU_CALIBRATION` were fitted to this
trace's counts), and a sixth of the length is this docstring, which states the model and its error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from visiontune.errors import ConfigError
from visiontune.backbones import create_meta_backbone, default_img_size, input_size
from visiontune.methods.base import classifier_of
from visiontune.methods.nf4 import nf4_blocksize
from visiontune.registry import METHODS
from visiontune.train.speed import fast_forward

GIB = float(2**30)
MIB = float(2**20)


@dataclass(frozen=True)
class Calibration:
    """How saved-tensor bytes translate into a device's measured peak.

    Attributes:
        activation_factor: measured peak / saved-tensor bytes of the backward pass (transient gradient
            buffers, allocator slack).
        runtime_bytes: a constant the training loop adds regardless of size (first-use library code and
            thread buffers on CPU).
        measured: whether the numbers come from measurements (False: an assumption).
        source: where they come from.
        freed_reused: whether memory freed by the backward pass serves the gradients it produces (a caching
            allocator, or glibc returning freed memory at once): the backward pass then peaks at the larger of
            activations and gradients, not their sum. glibc's default keeps freed blocks in its arenas, and the
            two add up (the optimizer step then needed a second trainable-sized block, too).
    """

    activation_factor: float
    runtime_bytes: float
    measured: bool
    source: str
    freed_reused: bool = True


CPU_CALIBRATION = Calibration(
    activation_factor=1.34, runtime_bytes=38 * MIB, measured=True,
    source="least-squares fit to the peak RSS added by training (metrics.json peak_memory_delta_mb) of 15 runs: "
           "ViT-S/16 and DINOv3 ViT-S/16 at 64-96 px, batch 8-32, full / LoRA / DoRA / Mona, fp32, 2-core x86 CPU, "
           "glibc malloc (benchmarks/results/estimate-cpu.md)",
    freed_reused=False,
)
LIVE_CALIBRATION = Calibration(
    activation_factor=1.0, runtime_bytes=30 * MIB, measured=True,
    source="the same 15 CPU runs with freed memory returned to the OS at once (MALLOC_MMAP_THRESHOLD_=16384): "
           "their peaks are the live tensors, all within 10 % of this (benchmarks/results/estimate-cpu.md)",
)
CUDA_CALIBRATION = Calibration(
    activation_factor=1.0, runtime_bytes=64 * MIB, measured=False,
    source="assumed: the CUDA caching allocator's max_memory_allocated counts live tensors, which the CPU runs "
           "with freed memory returned at once put at the saved tensors plus ~30 MiB; cuBLAS workspace on top. "
           "benchmarks/gpu_check.sh measures it",
)
DEVICE_RESERVE = {"cuda": 1.0 * GIB, "cpu": 0.5 * GIB}
"""Memory a process cannot use for tensors: CUDA context and allocator slack; the interpreter and libraries on CPU."""


# ----------------------------------------------------------------------------- the estimate


@dataclass
class MemoryEstimate:
    """Parameters and memory of one run on one device (bytes); see the module docstring for each term."""

    backbone: str
    method: str
    img_size: int
    batch_size: int
    precision: str
    device: str
    grad_checkpointing: bool
    params_total: int
    params_trainable: int
    params_4bit: int
    linears_4bit: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    weight_copies: float
    best_copy: float
    runtime: float
    peak: float
    host_build: float
    activation_detail: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration = CPU_CALIBRATION
    device_memory: float | None = None
    device_memory_source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def training_added(self) -> float:
        """What training adds to the loaded model: ``peak - weights`` (on CPU: the measured peak RSS delta)."""
        return self.peak - self.weights

    @property
    def reserve(self) -> float:
        return DEVICE_RESERVE["cuda" if self.device == "cuda" else "cpu"]

    @property
    def fits(self) -> bool | None:
        """Whether ``peak`` plus the device's reserve fits ``device_memory`` (None when that is unknown)."""
        if self.device_memory is None:
            return None
        return self.peak + self.reserve <= self.device_memory

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(training_added=self.training_added, fits=self.fits, reserve=self.reserve)
        return out


def parse_size(text: str) -> float:
    """Bytes of a size such as ``24GB``, ``80GiB``, ``512MB`` or ``24`` (GB).

    GB and GiB both mean 2**30 bytes here: GPU memory is quoted that way (a "24 GB" card has 24 GiB).

    Raises:
        ConfigError: an unreadable size, naming it.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", str(text), flags=re.IGNORECASE)
    if not m or (m.group(3) and not m.group(3).lower().endswith("b")):
        raise ConfigError(f"--device-memory {text!r} is not a size; write e.g. 24GB, 80GiB or 512MB")
    unit = m.group(2).lower() or "g"
    return float(m.group(1)) * 2 ** {"k": 10, "m": 20, "g": 30, "t": 40}[unit]


def _device_kind(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu"


def _precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return precision


def device_memory(device: str) -> tuple[float | None, str]:
    """Memory of the current CUDA device, or of the machine (RAM) on CPU; (None, why) when unknown."""
    if device == "cuda":
        if not torch.cuda.is_available():
            return None, "no CUDA device here: pass --device-memory, e.g. 24GB"
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return float(props.total_memory), f"{props.name} (current CUDA device)"
    try:
        import psutil

        return float(psutil.virtual_memory().total), "this machine's RAM"
    except ImportError:  # psutil is a dependency; this is only for a broken install
        return None, "RAM unknown (psutil missing): pass --device-memory"


# ----------------------------------------------------------------------------- meta-device accounting


def _quantized_linears(model: nn.Module, method: Any) -> dict[int, tuple[str, int]]:
    """id(weight) -> (name, NF4 block size) of the Linears a q-method would store in 4 bits."""
    if not getattr(method, "quantized", False):
        return {}

    head = {id(m) for m in classifier_of(model).modules()}
    out = {}
    for name, m in model.named_modules():
        if type(m) is nn.Linear and id(m) not in head and ".lora_" not in name and "lora_" not in name.rsplit(".", 1)[-1]:
            bs = nf4_blocksize(m.in_features)
            if bs is not None and not m.weight.requires_grad:
                out[id(m.weight)] = (name, bs)
    return out


def _nf4_bytes(numel: int, blocksize: int, double_quant: bool) -> float:
    """Bytes of one NF4 weight: packed values plus block scales (bitsandbytes' layout)."""
    blocks = math.ceil(numel / blocksize)
    scales = blocks * 1 + math.ceil(blocks / 256) * 4 + 16 if double_quant else blocks * 4
    return numel / 2 + scales


def _weights(model: nn.Module, quantized: dict[int, tuple[str, int]], double_quant: bool) -> tuple[float, float, int]:
    """(bytes on the device, bytes of the fp32 host build, 4-bit parameter count); shared tensors counted once."""
    seen: set[int] = set()
    device = host = 0.0
    q_params = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        size = t.numel() * t.element_size()
        host += size
        if id(t) in quantized:
            device += _nf4_bytes(t.numel(), quantized[id(t)][1], double_quant)
            q_params += t.numel()
        else:
            device += size
    return device, host, q_params


class _FusedAttention(torch.autograd.Function):
    """Stands in for ``F.scaled_dot_product_attention`` while counting: saves what the fused kernels save.

    On the meta device PyTorch picks the math path, which keeps the N x N attention matrix; CUDA's flash /
    memory-efficient kernels and the CPU flash kernel keep q, k, v, the output and a log-sum-exp instead. Their
    output is laid out token-major (B, N, heads, dim) behind the (B, heads, N, dim) view, so the usual
    ``transpose(1, 2).reshape(B, N, C)`` that follows is a view of it, not a copy: the same here.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n = q.shape[:3] if q.dim() == 4 else (1, *q.shape[:2])
        out = q.new_empty((b, n, h, v.shape[-1])).transpose(1, 2).reshape((*q.shape[:-1], v.shape[-1]))
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # never called: nothing is trained
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


@contextlib.contextmanager
def _fused_attention_accounting() -> Iterator[None]:
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if q.device.type != "meta":
            return real(q, k, v, *args, **kwargs)
        return _FusedAttention.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


@dataclass
class _Trace:
    """Saved-tensor bytes of one forward pass, split into blocks and the rest."""

    activations: dict[str, float]  # segment ("other" or block index) -> bytes of saved non-parameter tensors
    norm_inputs: dict[str, float]  # of which LayerNorm inputs (counted at fp32 under autocast)
    saved_weights: dict[str, dict[int, tuple[int, list[nn.Parameter]]]]  # segment -> storage -> (values, params)
    # saved weights: under autocast a matmul saves a low-precision copy of these instead (fused q/k/v: one copy)
    block_inputs: list[float]  # bytes of each block's input, when it requires grad (what checkpointing keeps)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _trace(model: nn.Module, forward: nn.Module, x: torch.Tensor, blocks: list[nn.Module]) -> _Trace:
    """Run ``forward(x)`` with grad and count, per segment, what autograd still holds when the forward ends.

    A tensor saved by a part of the graph that is dropped before the end (DoRA's weight norm is computed and
    detached) is not held at the backward pass, so each saved tensor is tracked by a weak reference and only
    those alive at the end count; each storage once (views of one tensor share it).
    """
    import weakref

    params: dict[int, list[nn.Parameter]] = {}
    for p in model.parameters():
        params.setdefault(_storage_key(p), []).append(p)
    current = ["other"]
    saved: dict[int, tuple[Any, float, str]] = {}  # storage key -> (weak ref, bytes, segment)
    weights: dict[str, dict[int, tuple[int, list[nn.Parameter]]]] = {}
    norm_storages: dict[int, Any] = {}  # storage key -> weak ref of a LayerNorm input
    inputs: list[float] = []

    def forget(table: dict[int, Any], key: int) -> Callable[[Any], None]:
        # A dead tensor's storage address can be reused by a later one: drop its entry when it dies.
        def drop(ref: Any) -> None:
            entry = table.get(key)
            if entry is not None and (entry[0] if isinstance(entry, tuple) else entry) is ref:
                del table[key]
        return drop

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key in params:
            seg = weights.setdefault(current[0], {})
            seg[key] = (max(t.numel(), seg.get(key, (0, []))[0]), params[key])
            return t
        if key not in saved:
            saved[key] = (weakref.ref(t, forget(saved, key)), float(t.untyped_storage().nbytes()), current[0])
        return t

    handles = []

    def norm_pre(_m: nn.Module, args: tuple) -> None:
        if args and torch.is_tensor(args[0]):
            key = _storage_key(args[0])
            norm_storages[key] = weakref.ref(args[0], forget(norm_storages, key))

    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or type(m).__name__ in ("LayerNorm2d", "RmsNorm", "LayerNormFp32"):
            handles.append(m.register_forward_pre_hook(norm_pre))
    for i, blk in enumerate(blocks):
        def enter(_m: nn.Module, args: tuple, i: int = i) -> None:
            current[0] = str(i)
            t = args[0] if args else None
            if torch.is_tensor(t) and t.requires_grad:
                inputs.append(float(t.numel() * t.element_size()))

        def leave(_m: nn.Module, _args: tuple, _out: Any) -> None:
            current[0] = "other"

        handles += [blk.register_forward_pre_hook(enter), blk.register_forward_hook(leave)]
    try:
        with _fused_attention_accounting(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
            out = forward(x)
            acts: dict[str, float] = {}
            norms: dict[str, float] = {}
            for key, (ref, nbytes, seg) in list(saved.items()):
                if ref() is None:
                    continue
                acts[seg] = acts.get(seg, 0.0) + nbytes
                if key in norm_storages:
                    norms[seg] = norms.get(seg, 0.0) + nbytes
            del out
    finally:
        for h in handles:
            h.remove()
    return _Trace(acts, norms, weights, inputs)


def _matmul_weight(model: nn.Module) -> set[int]:
    """ids of parameters that enter a matmul or convolution (autocast casts those to the low-precision dtype)."""
    out: set[int] = set()
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            out.add(id(m.weight))
    return out


def _inference_bytes(forward: nn.Module, x: torch.Tensor) -> float:
    """Largest few tensors alive at once in a no-grad forward: the biggest module output, three times."""
    biggest = [0.0]

    def hook(_m: nn.Module, _a: tuple, out: Any) -> None:
        if torch.is_tensor(out):
            biggest[0] = max(biggest[0], float(out.numel() * out.element_size()))

    handles = [m.register_forward_hook(hook) for m in forward.modules()]
    try:
        with _fused_attention_accounting(), torch.no_grad():
            forward(x)
    finally:
        for h in handles:
            h.remove()
    return 3 * biggest[0]


def _blocks_of(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, (nn.Sequential, nn.ModuleList)) else []


def _has_validation(cfg: Any) -> bool:
    return cfg.data.val_per_class is not None or cfg.data.val_fraction is not None


def estimate_memory(
    cfg: Any, num_classes: int = 10, device: str | None = None, device_mem: float | None = None,
    calibration: Calibration | None = None,
) -> MemoryEstimate:
    """Estimate ``cfg``'s parameters and per-device memory without loading weights or data.

    Args:
        cfg: a validated :class:`~visiontune.config.Config`.
        num_classes: classifier size (the data is not read; only the head's few parameters depend on it).
        device: ``cpu`` / ``cuda`` / ``auto`` (default: ``cfg.run.device``); decides the autocast dtype
            (``optim.precision=auto``) and the calibration.
        device_mem: the memory to check against (default: the current CUDA device's, or the machine's RAM).
        calibration: instead of the device's (:data:`CPU_CALIBRATION` / :data:`CUDA_CALIBRATION`).

    Raises:
        ConfigError / WeightsError: the run could not start (as ``visiontune sweep --dry-run`` reports).
    """

    kind = _device_kind(device or cfg.run.device)
    precision = _precision(cfg.optim.precision, kind)
    method = METHODS.get(cfg.method.name)(cfg.method)
    backbone_cfg = cfg.backbone if method.pretrained else dataclasses.replace(cfg.backbone, weights="none")
    model = create_meta_backbone(backbone_cfg, num_classes)
    notes = list(method.apply_on_meta(model))
    notes = [n for n in notes if "not run on the meta device" not in n]  # 4-bit is accounted for below
    quantized = _quantized_linears(model, method)
    double_quant = bool(getattr(cfg.method, "double_quant", False))
    weights, host, q_params = _weights(model, quantized, double_quant)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    grads = float(sum(p.numel() * 4 for p in trainable))  # fp32 parameters, fp32 gradients
    size = input_size(model, cfg.backbone.img_size or default_img_size(cfg.backbone.name))
    calib = calibration or (CUDA_CALIBRATION if kind == "cuda" else CPU_CALIBRATION)
    batch = cfg.optim.batch_size
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    detail: dict[str, Any] = {"tokens": None, "dim": getattr(model, "embed_dim", None), "blocks": len(_blocks_of(model))}
    if hasattr(model, "patch_embed") and getattr(model.patch_embed, "grid_size", None) is not None:
        grid = model.patch_embed.grid_size
        detail["tokens"] = int(grid[0] * grid[1] + getattr(model, "num_prefix_tokens", 0))

    if method.feature_cache:
        # Frozen backbone, features computed without gradients; the head is fitted on cached features.
        ebs = cfg.optim.eval_batch_size
        model.eval()
        acts = _inference_bytes(fast_forward(model, check=False), torch.empty(ebs, cfg.data.input_bands(), size, size, device="meta"))
        copies = 0.0
        optimizer = 2 * grads
        detail.update(kind="inference", batch=ebs)
        notes.append(f"{method.name} trains no backbone parameter: activations are one no-grad batch of "
                     f"{ebs} (optim.eval_batch_size); the cached features (images x views x width x 4 bytes) come on top")
        backward = acts
        best = 0.0
    else:
        model.train()
        if getattr(model, "grad_checkpointing", False):
            model.set_grad_checkpointing(False)  # counted whole, then composed per block below
        blocks = _blocks_of(model)
        forward = fast_forward(model, check=False)
        x32 = torch.empty(batch, cfg.data.input_bands(), size, size, device="meta")
        trace = _trace(model, forward, x32, blocks)
        matmul = _matmul_weight(model)
        q_ids = set(quantized)
        low_bytes = 2 if low is not None else 4

        def seg_acts(seg: str) -> float:
            # Under autocast everything a matmul touches is saved in the low-precision dtype; LayerNorm runs in
            # fp32 and its inputs are the fp32 residual stream (the check against real CPU autocast is in tests).
            a, norms = trace.activations.get(seg, 0.0), trace.norm_inputs.get(seg, 0.0)
            return (a - norms) * low_bytes / 4 + norms

        def seg_copies(seg: str) -> float:
            if low is None:
                return 0.0
            return float(sum(
                n * 2 for n, ps in trace.saved_weights.get(seg, {}).values()
                if any(id(p) in matmul for p in ps) and not any(id(p) in q_ids for p in ps)
            ))

        segs = set(trace.activations) | set(trace.saved_weights)
        block_segs = [s for s in segs if s != "other"]
        if cfg.backbone.grad_checkpointing and blocks:
            per_block = [seg_acts(s) + seg_copies(s) for s in block_segs] or [0.0]
            kept_inputs = sum(trace.block_inputs)  # the residual stream: fp32 under autocast too
            raw = seg_acts("other") + kept_inputs + max(per_block)
            copies = seg_copies("other")
            acts = raw
            detail.update(checkpointed_blocks=len(trace.block_inputs), block_inputs=kept_inputs, largest_block=max(per_block))
        else:
            acts = sum(seg_acts(s) for s in segs)
            copies = sum(seg_copies(s) for s in segs)
            if cfg.backbone.grad_checkpointing:
                notes.append(f"gradient checkpointing is not modelled for {type(model).__name__} (no `blocks`): "
                             "activations are counted without it, an upper bound")
        acts += x32.numel() * 4  # the input batch
        detail.update(kind="training", batch=batch, saved_bytes=acts, weight_copy_bytes=copies,
                      blocks_with_grad=len(block_segs))
        if detail["tokens"] and detail["dim"] and detail["blocks"]:
            per = acts / (batch * detail["tokens"] * detail["dim"] * detail["blocks"])
            detail["per_block_factor_bytes"] = per  # k x bytes per value in B x N x D x L x k
        acts = acts * calib.activation_factor
        optimizer = 2 * grads
        # Gradients appear as the backward pass frees the activations, layer by layer from the top; where that
        # memory is reused the pass peaks at the larger of the two (unless gradients of earlier micro-steps
        # are still held: accumulation), otherwise they add up.
        if calib.freed_reused and cfg.optim.grad_accum == 1:
            backward = max(acts + copies, grads)
        else:
            backward = acts + copies + grads
        best = grads if _has_validation(cfg) else 0.0
    backward += calib.runtime_bytes
    # The optimizer step holds the gradients and AdamW's temporaries: its foreach path (the default on CUDA)
    # makes one trainable-sized buffer (sqrt of the second moment), the per-tensor path (CPU) one tensor's.
    # glibc's default allocator measured a second trainable-sized block at the step, whatever the path.
    temp = grads if kind == "cuda" or not calib.freed_reused else 0.0
    step = grads + temp
    peak = weights + optimizer + max(backward, step) + best
    if device_mem is None:
        device_mem, source = device_memory(kind)
    else:
        source = "--device-memory"
    if q_params and kind == "cpu":
        notes.append("4-bit weights on CPU: bitsandbytes' CPU path, fp32 compute")
    if not calib.measured:
        notes.append(f"{kind} allowance not yet measured ({calib.source})")
    return MemoryEstimate(
        backbone=cfg.backbone.name, method=method.describe() if hasattr(method, "describe") else method.name,
        img_size=size, batch_size=batch if not method.feature_cache else cfg.optim.eval_batch_size,
        precision=precision, device=kind, grad_checkpointing=bool(cfg.backbone.grad_checkpointing),
        params_total=n_total, params_trainable=n_trainable, params_4bit=q_params, linears_4bit=len(quantized),
        weights=weights, gradients=grads, optimizer=optimizer,
        activations=acts, weight_copies=copies, best_copy=best, runtime=calib.runtime_bytes, peak=peak,
        host_build=host, activation_detail=detail, calibration=calib, device_memory=device_mem,
        device_memory_source=source, notes=notes,
    )


# ----------------------------------------------------------------------------- text


def _gib(b: float) -> str:
    return f"{b / GIB:8.2f} GiB" if b >= 0.95 * GIB else f"{b / MIB:8.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e6:,.1f} M" if n >= 10e6 else f"{n / 1e6:,.2f} M" if n >= 1e6 else f"{n:,}"


def format_estimate(e: MemoryEstimate) -> str:
    """The ``visiontune estimate`` report: parameters, memory terms per device, the verdict."""
    prec = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[e.precision]
    head = (f"{e.backbone} · {e.method} · {e.img_size} px · batch {e.batch_size} · {prec}"
            f"{' · gradient checkpointing' if e.grad_checkpointing else ''} · {e.device}")
    pct = 100.0 * e.params_trainable / max(1, e.params_total)
    lines = [head, f"parameters        {_count(e.params_total)}, trainable {_count(e.params_trainable)} ({pct:.2f} %)"]
    if e.params_4bit:
        lines.append(f"4-bit (NF4)       {_count(e.params_4bit)} parameters in {e.linears_4bit} Linears")
    d = e.activation_detail
    act_note = "saved for backward"
    if d.get("kind") == "inference":
        act_note = f"no-grad batch of {d['batch']}"
    elif d.get("per_block_factor_bytes") is not None:
        act_note = (f"B x N x D x L = {e.batch_size} x {d['tokens']} x {d['dim']} x {d['blocks']}, "
                    f"{d['per_block_factor_bytes']:.1f} bytes each, x{e.calibration.activation_factor:.2f}")
    lines += [
        f"memory per device (an estimate, not a measurement; {e.device}):",
        f"  weights          {_gib(e.weights)}" + ("   (NF4 + block scales for the 4-bit Linears)" if e.params_4bit else ""),
        f"  gradients        {_gib(e.gradients)}   (trainable parameters, fp32)",
        f"  optimizer        {_gib(e.optimizer)}   (AdamW: 2 x trainable, fp32)",
        f"  activations      {_gib(e.activations)}   ({act_note})",
    ]
    if e.weight_copies >= MIB:
        lines.append(f"  weight copies    {_gib(e.weight_copies)}   (autocast's bf16 copies of weights, kept for backward)")
    if e.best_copy:
        lines.append(f"  best epoch       {_gib(e.best_copy)}   (trainable weights of the best validation epoch)")
    lines += [
        f"  runtime          {_gib(e.runtime)}   (library buffers during the backward pass)",
        f"  peak             {_gib(e.peak)}   (training adds {_gib(e.training_added).strip()} to the weights)",
    ]
    if e.device_memory is not None:
        spare = e.device_memory - e.reserve - e.peak
        verdict = "fits" if e.fits else "does NOT fit"
        lines.append(f"device memory     {_gib(e.device_memory).strip()} ({e.device_memory_source}): {verdict}, "
                     f"{_gib(abs(spare)).strip()} {'spare' if spare >= 0 else 'short'} after a {_gib(e.reserve).strip()} reserve")
    else:
        lines.append(f"device memory     unknown ({e.device_memory_source})")
    lines.append(f"host RAM to build {_gib(e.host_build).strip()} (the backbone is built in fp32 on the host"
                 f"{', then quantized' if e.params_4bit else ''})")
    for n in e.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)
