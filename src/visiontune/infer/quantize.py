"""INT8 post-training static quantization of an exported ONNX model, with onnxruntime's own toolkit.

``onnxruntime.quantization.quantize_static`` does the quantization: QDQ format (what onnxruntime's
CPU kernels fuse into integer matrix products), uint8 asymmetric activations with one scale per
tensor, fixed from calibration images (min/max), and int8 symmetric weights with one scale per
output channel. Only the inputs of layers with weights are quantized (MatMul / Gemm / Conv with a
constant weight): that is where the arithmetic is. LayerNorm, Softmax, GELU, residual additions and
the two activation-by-activation products of attention (scores, weighted values) stay fp32: a small
share of the work at ViT token counts, and quantizing them costs accuracy for little speed. Three
choices were measured on the demo's DINOv2-S runs (``benchmarks/RESULTS.md``):

- Layer outputs stay float. ``quantize_static`` by default also rounds each MatMul's output to
  uint8 with one scale for the whole tensor; that doubled the logit error. Float outputs let
  onnxruntime fuse into ``MatMulIntegerToFloat``, which is as fast.
- Small layers stay fp32 (:data:`SMALL_LAYER_FRACTION`): a 4-class head, Mona's adapters and
  depth-wise convolutions add rounding error but almost no arithmetic.
- SmoothQuant (Xiao et al. 2023) for LayerNorm-fed layers (q/k/v, MLP fc1): a few input channels
  carry values 10-40x the others, so with one scale per tensor most channels get a handful of levels.
  For a LayerNorm whose output feeds only weight MatMuls, channel ``j`` of its scale and shift is
  divided by ``s_j = max|x_j|^a / max|W_j|^(1-a)`` and row ``j`` of each consumer's weight is
  multiplied by it: the fp32 function is unchanged (up to float rounding), the channels even out,
  and the weights, quantized per output channel, absorb the spread. The best strength ``a`` differed
  between runs of the same backbone, so by default several are tried and the one whose logits on the
  calibration images stay closest to fp32's is kept.

Written by hand: the graph walk and the smoothing (onnxruntime's own SmoothQuant option needs Intel
Neural Compressor, a heavy dependency); the quantization itself is onnxruntime's.
"""

from __future__ import annotations

import ast
import fnmatch
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from visiontune.atomic import atomic_write
from visiontune.errors import ConfigError
from visiontune.infer.backends import require_onnxruntime, session_options

DEFAULT_CALIBRATION = 128
"""Calibration images by default (the run's training split, all of it when smaller)."""
SMALL_LAYER_FRACTION = 1 / 16
"""Layers with fewer weights than this share of the largest layer's stay fp32 (a few-class head, Mona's
adapters, depth-wise convolutions): their rounding error counts as much as a big layer's while their
share of the arithmetic is negligible. On DINOv2-S: the 4-class head and Mona's adapters stay fp32,
every q/k/v, projection, MLP layer and the patch embedding are quantized."""
SMOOTHING_CANDIDATES = (0.0, 0.5, 0.8)
"""SmoothQuant strengths ``a`` tried by default (0 = off); the best on the calibration images is kept.
On the demo's runs the best was 0.8 for the linear probe, 0.5 for LoRA, 0 for Mona (RESULTS.md)."""
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


@dataclass
class QuantizableNode:
    """A node of the fp32 graph that ``quantize_static`` may quantize, and why it is kept fp32 or not."""

    name: str
    op: str
    scope: str
    """The module path it came from (``blocks.3.mlp.fc2``), when the exporter recorded it; else ``""``."""
    has_weight: bool
    weight_elements: int = 0


@dataclass
class Int8Report:
    """What the quantization did (recorded in the export JSON)."""

    quantized: dict[str, int] = field(default_factory=dict)
    kept_fp32: list[str] = field(default_factory=list)
    smoothed: int = 0
    alpha: float = 0.0
    min_weight_elements: int = 0
    calibration_images: int = 0
    candidates: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self, keep: Sequence[str]) -> dict[str, Any]:
        return {
            "method": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "activations": "uint8, asymmetric, one scale per tensor (static, min/max over the calibration images)",
            "weights": "int8, symmetric, one scale per output channel",
            "quantized_ops": self.quantized, "kept_fp32": self.kept_fp32, "keep_fp32_patterns": list(keep),
            "small_layers_fp32_below_weights": self.min_weight_elements,
            "smoothquant": {"alpha": self.alpha, "layernorms_smoothed": self.smoothed, "tried": self.candidates},
            "calibration": {"images": self.calibration_images, "source": "the run's training split, eval preprocessing"},
        }


def _scope(node: Any) -> str:
    """Module path of a node: torch's dynamo exporter records it in metadata, the legacy tracer in the name."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            # ['', 'blocks', 'blocks.0', 'blocks.0.attn', 'blocks.0.attn.qkv', 'linear']: the module is the one
            # before the op's own name.
            return str(scopes[-2]) if len(scopes) >= 2 else ""
    if node.name.startswith("/"):  # legacy: /blocks/blocks.0/attn/qkv/MatMul
        path = ""
        for part in (p for p in node.name.split("/")[1:-1] if p):
            path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
        return path
    return ""


def quantizable_nodes(model: Any, scopes: dict[str, str] | None = None) -> list[QuantizableNode]:
    """The MatMul / Gemm / Conv nodes of ``model`` (an ``onnx.ModelProto``), with or without a constant weight."""
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type in WEIGHT_OPS and len(n.input) >= 2:
            scope = (scopes or {}).get(n.name) or _scope(n)
            out.append(QuantizableNode(n.name, n.op_type, scope, n.input[1] in sizes, sizes.get(n.input[1], 0)))
    return out


def check_keep_patterns(keep: Sequence[str]) -> list[str]:
    """Validate ``--keep-fp32`` patterns (module paths with ``*`` wildcards, e.g. ``head``, ``*.mlp.fc2``)."""
    out = []
    for p in keep:
        p = p.strip()
        if not p or any(c in p for c in " /\\"):
            raise ConfigError(f"keep-fp32 pattern {p!r} is invalid; give module paths with * wildcards, e.g. "
                              "head,patch_embed.proj,*.mlp.fc2")
        out.append(p)
    return out


class _Batches:
    """onnxruntime's ``CalibrationDataReader`` protocol over preprocessed batches (get_next / rewind)."""

    def __init__(self, batches: Sequence[np.ndarray], input_name: str):
        self.batches, self.input_name, self.i = list(batches), input_name, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.input_name: self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0

    def __len__(self) -> int:
        return len(self.batches)


def _reader(batches: Sequence[np.ndarray], input_name: str) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_Batches, CalibrationDataReader):  # the ABC, so quantize_static's isinstance checks pass
        pass

    return Reader(batches, input_name)


def smooth_layernorms(model: Any, batches: Sequence[np.ndarray], input_name: str, alpha: float, threads: int) -> int:
    """SmoothQuant on every LayerNorm -> weight-MatMul pattern of ``model`` (in place); returns how many.

    Per-channel |max| of each LayerNorm's output comes from running the fp32 model on ``batches`` with
    those tensors added as outputs.
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            uses.setdefault(i, []).append(n)
    pairs = []
    for n in graph.node:
        if n.op_type != "LayerNormalization" or len(n.input) < 3 or n.input[1] not in inits or n.input[2] not in inits:
            continue
        consumers = uses.get(n.output[0], [])
        if not consumers or any(c.op_type != "MatMul" or c.input[0] != n.output[0] or c.input[1] not in inits for c in consumers):
            continue  # something else reads the normalised tensor: scaling it would change that too
        if any(len(uses.get(t, [])) != 1 for t in (n.input[1], n.input[2], *(c.input[1] for c in consumers))):
            continue  # a shared initializer would be rescaled twice
        axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
        if axis != -1 and axis != len(numpy_helper.to_array(inits[n.input[1]]).shape) * -1:
            continue
        pairs.append((n, consumers))
    if not pairs:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for n, _ in pairs:
        if n.output[0] not in known:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(n.output[0]))
    with tempfile.TemporaryDirectory(prefix="vt-smooth-") as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(probe, str(path))
        session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        names = [n.output[0] for n, _ in pairs]
        amax: list[np.ndarray | None] = [None] * len(names)
        for x in batches:
            outs = session.run(names, {input_name: x})
            for k, o in enumerate(outs):
                m = np.abs(o.reshape(-1, o.shape[-1])).max(0)
                amax[k] = m if amax[k] is None else np.maximum(amax[k], m)
    for (n, consumers), act in zip(pairs, amax):
        gamma, beta = (numpy_helper.to_array(inits[n.input[i]]).astype(np.float32) for i in (1, 2))
        weights = [numpy_helper.to_array(inits[c.input[1]]).astype(np.float32) for c in consumers]  # [in, out]
        wmax = np.max([np.abs(w).max(1) for w in weights], axis=0)
        s = np.power(np.maximum(act, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
        s = np.clip(s, 1e-5, None).astype(np.float32)
        inits[n.input[1]].CopyFrom(numpy_helper.from_array(gamma / s, n.input[1]))
        inits[n.input[2]].CopyFrom(numpy_helper.from_array(beta / s, n.input[2]))
        for c, w in zip(consumers, weights):
            inits[c.input[1]].CopyFrom(numpy_helper.from_array(w * s[:, None], c.input[1]))
    return len(pairs)


def _logits(path: Path, batches: Sequence[np.ndarray], input_name: str, threads: int | None) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {input_name: x})[0] for x in batches])


def check_smoothing(smoothing: float | None) -> None:
    """Refuse a SmoothQuant strength outside [0, 1) (NaN included); None (try several) is fine."""
    if smoothing is not None and not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"smoothing={smoothing} is invalid; use a value in [0, 1) (0 turns SmoothQuant off), or "
                          f"leave it out to try {', '.join(map(str, SMOOTHING_CANDIDATES))} and keep the best")


def quantize_int8(
    fp32_path: Path, out_path: Path, batches: Sequence[np.ndarray], input_name: str, keep_fp32: Sequence[str] = (),
    smoothing: float | None = None, threads: int | None = None, small_fraction: float = SMALL_LAYER_FRACTION,
) -> Int8Report:
    """Write an INT8 (QDQ) copy of ``fp32_path`` to ``out_path``, calibrated on ``batches``.

    Args:
        fp32_path: the fp32 export.
        out_path: where the INT8 model goes.
        batches: preprocessed calibration images, ``[b, 3, H, W]`` float32 arrays.
        input_name: the model's input name.
        keep_fp32: module-path patterns (``*`` wildcards) whose layers stay fp32, e.g. ``head``.
        smoothing: SmoothQuant strength in [0, 1) (0 turns it off); None tries each of
            :data:`SMOOTHING_CANDIDATES` and keeps the one whose logits on the calibration images are
            closest to fp32's (which strength is best differs between runs of the same backbone).
        threads: onnxruntime threads for calibration.
        small_fraction: layers with fewer weights than this share of the largest layer's stay fp32.

    Raises:
        ConfigError: onnxruntime missing, a bad smoothing value, or nothing left to quantize.
    """
    import onnx

    require_onnxruntime("INT8 quantization")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    check_smoothing(smoothing)
    keep = check_keep_patterns(keep_fp32)
    raw = onnx.load(str(fp32_path))
    # Module paths are in the exporter's node metadata, which onnxruntime's pre-processing drops; node names survive.
    scopes = {n.name: _scope(n) for n in raw.graph.node if n.op_type in WEIGHT_OPS}
    del raw
    report = Int8Report(calibration_images=int(sum(len(b) for b in batches)))
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static logs advice at WARNING on every call
    try:
        with tempfile.TemporaryDirectory(prefix="vt-int8-") as tmp:
            pre = Path(tmp) / "pre.onnx"
            # Shape inference + basic graph optimisation: onnxruntime's recommended first step.
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
            base = onnx.load(str(pre))
            exclude = []
            nodes = quantizable_nodes(base, scopes)
            min_weight_elements = small_fraction * max([n.weight_elements for n in nodes] or [0])
            report.min_weight_elements = int(min_weight_elements)
            for n in nodes:
                small = n.weight_elements < min_weight_elements
                if not n.has_weight or small or any(fnmatch.fnmatchcase(n.scope, p) for p in keep):
                    exclude.append(n.name)
                    why = "activation x activation" if not n.has_weight else "small" if small else "keep-fp32"
                    report.kept_fp32.append(f"{n.scope or n.name} ({why})")
                else:
                    report.quantized[n.op] = report.quantized.get(n.op, 0) + 1
            if not report.quantized:
                raise ConfigError(f"nothing to quantize in {fp32_path}: no MatMul / Gemm / Conv with weights outside "
                                  f"the keep-fp32 patterns {keep}; loosen --keep-fp32")
            reference = _logits(pre, batches, input_name, threads)
            best: tuple[float, float, Path, int] | None = None
            for alpha in (SMOOTHING_CANDIDATES if smoothing is None else (smoothing,)):
                model = onnx.ModelProto()
                model.CopyFrom(base)
                smoothed = smooth_layernorms(model, batches, input_name, alpha, threads or 0) if alpha > 0 else 0
                src, dst = Path(tmp) / f"smooth-{alpha}.onnx", Path(tmp) / f"int8-{alpha}.onnx"
                onnx.save(model, str(src))
                del model
                quantize_static(
                    str(src), str(dst), _reader(batches, input_name), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(WEIGHT_OPS), per_channel=True, reduce_range=False,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                    calibrate_method=CalibrationMethod.MinMax,
                    # Inputs only: by default quantize_static also rounds each MatMul's *output* to uint8 (one
                    # scale for, e.g., every pre-GELU value), which doubled the logit error on DINOv2-S. Float
                    # outputs let onnxruntime fuse DQ + MatMul into MatMulIntegerToFloat, just as fast.
                    extra_options={"OpTypesToExcludeOutputQuantization": list(WEIGHT_OPS)},
                )
                got = _logits(dst, batches, input_name, threads)
                err = float(np.abs(got - reference).mean())
                agree = float((got.argmax(1) == reference.argmax(1)).mean())
                report.candidates.append({"smoothquant_alpha": alpha, "calibration_logit_mae": round(err, 5),
                                          "calibration_top1_agreement": round(agree, 4)})
                if best is None or err < best[0]:
                    best = (err, alpha, dst, smoothed)
            assert best is not None
            report.alpha, report.smoothed = best[1], best[3]
            # Copied into place all at once: a reader never sees half an INT8 model.
            atomic_write(out_path, lambda tmp: shutil.copyfile(best[2], tmp))
    finally:
        logging.getLogger().setLevel(quiet)
    return report


def batches_of(images: Iterable[np.ndarray], size: int) -> list[np.ndarray]:
    """Stack preprocessed ``3 x H x W`` arrays into float32 batches of ``size``."""
    items = list(images)
    return [np.stack(items[i:i + size]).astype(np.float32) for i in range(0, len(items), size)]
