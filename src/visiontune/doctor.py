"""``visiontune doctor``: what this machine can do with visiontune, and the commands that fix what is missing.

Versions (Python, torch, torchvision, timm, peft), the optional extras, the CPU's vector extensions and what
they mean for bf16, INT8 and 4-bit, GPUs and their memory, the offline weights (packages and converted
files), whether the model hub answers, and the free disk where runs are written. Nothing heavy is imported
(timm and peft are asked for their versions, not imported) and the hub check is one TCP connection with a
short timeout, so the report takes a few seconds and never waits on a network that is not there.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import shutil
import socket
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from visiontune.version import __version__
from visiontune.errors import ConfigError
from visiontune.extras import EXTRAS, WHAT_NEEDS, install_hint, installed_extras
from visiontune.registry import WEIGHT_SOURCES
from visiontune.runtime import cpu_info

HUB = ("huggingface.co", 443)
"""Where timm downloads pretrained weights from (``pretrained=True``)."""

LOW_DISK_BYTES = 5 * 1024**3
"""Below this much free space in the runs folder the report warns (a ViT-B run with checkpoints takes ~1 GB)."""


@dataclass
class Report:
    """Everything ``visiontune doctor`` found; ``fixes`` are commands, one per problem, in the order found."""

    versions: dict[str, str]
    extras: dict[str, dict[str, Any]]
    cpu: dict[str, Any]
    capabilities: dict[str, str]
    gpus: list[dict[str, Any]]
    offline_weights: list[dict[str, Any]]
    hub: dict[str, Any]
    disk: dict[str, Any]
    fixes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Python, visiontune and the libraries it is built on (installed distributions' versions; none is imported)."""
    out = {"python": platform.python_version(), "visiontune": __version__, "torch": torch.__version__}
    out.update({dist: _version(dist) for dist in ("torchvision", "timm", "peft")})
    return out


def capabilities(cpu: dict[str, Any], have_bnb: bool, gpus: list[dict[str, Any]]) -> dict[str, str]:
    """What the CPU's extensions (and any GPU) mean for bf16, INT8 and 4-bit, in one line each."""
    isa = set(cpu["isa"])
    if gpus:
        bf16 = "bf16 on the GPU: use optim.precision=auto (bf16 autocast on CUDA)"
    elif {"amx_bf16", "amx_tile"} & isa:
        bf16 = "AMX: bf16 inference is the fast path here (predict/eval/serve --precision bf16; benchmarks/RESULTS.md)"
    elif "avx512_bf16" in isa:
        bf16 = "AVX-512 BF16: bf16 inference can be faster (--precision bf16; measure it: bench-infer --bf16); train in fp32"
    else:
        bf16 = "no AVX-512 BF16 or AMX: bf16 is emulated and slow here; keep fp32 (the default on a CPU)"
    if cpu["vnni"]:
        int8 = "VNNI: INT8 ONNX models (visiontune export --int8, then --backend onnxruntime --int8) run fast"
    elif "avx2" in isa:
        int8 = "no VNNI: INT8 ONNX models run, smaller but little faster than fp32"
    else:
        int8 = "no AVX2: INT8 and fp32 kernels fall back to slow code paths"
    if not have_bnb:
        four_bit = f"4-bit (qlora/qdora) needs bitsandbytes: {install_hint('quant')}"
    elif gpus:
        four_bit = "4-bit NF4 (qlora/qdora) on the GPU with bitsandbytes' CUDA kernels"
    elif "avx512_bf16" in isa:
        four_bit = ("4-bit NF4 on the CPU (bitsandbytes, fp32 compute); visiontune keeps bitsandbytes' portable layout "
                    "(no AVX-512 BF16 repacking); slower than LoRA, for memory, not speed")
    else:
        four_bit = "4-bit NF4 on the CPU (bitsandbytes, fp32 compute): slower than LoRA, for memory, not speed"
    return {"bf16": bf16, "int8": int8, "4bit": four_bit}


def gpus() -> list[dict[str, Any]]:
    """CUDA devices with their name and memory (empty on a CPU-only machine)."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 1024**3, 1),
                    "bf16": bool(torch.cuda.is_bf16_supported()) if i == 0 else None})
    return out


def offline_weights() -> list[dict[str, Any]]:
    """Each offline weight source: whether its package is installed and whether it is converted already."""
    out = []
    for name in WEIGHT_SOURCES.names():
        src = WEIGHT_SOURCES.get(name)
        installed = src.available()
        cached = src.cache_path() if installed else None
        out.append({"name": name, "arch": src.arch, "package": src.package, "installed": installed,
                    "converted": bool(cached and cached.is_file()), "install": src.install_hint()})
    return out


def reachable(host: str, port: int, timeout_s: float) -> bool | None:
    """Whether a TCP connection to ``host:port`` opens within ``timeout_s``; None when it did not answer in time.

    Name resolution has no timeout of its own, so the attempt runs in a daemon thread that is waited on for
    ``timeout_s`` and then left behind: an offline machine gets its answer in ``timeout_s`` at most.
    """
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return result[0] if result else None


def hub_status(check: bool, timeout_s: float = 1.5, target: tuple[str, int] = HUB) -> dict[str, Any]:
    """Whether the model hub can be reached (skipped when ``check`` is False or HF_HUB_OFFLINE is set)."""
    host = f"{target[0]}:{target[1]}"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return {"host": host, "reachable": None, "note": "HF_HUB_OFFLINE is set: not checked"}
    if not check:
        return {"host": host, "reachable": None, "note": "not checked (--offline)"}
    ok = reachable(*target, timeout_s)
    note = {True: "reachable", False: "unreachable", None: f"no answer within {timeout_s:g} s"}[ok]
    return {"host": host, "reachable": ok, "note": note}


def disk(runs_dir: str | Path) -> dict[str, Any]:
    """Free space on the file system that holds ``runs_dir`` (its nearest existing parent when it does not exist)."""
    path = Path(runs_dir).expanduser().resolve()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {"runs_dir": str(path), "free_gib": round(usage.free / 1024**3, 1), "low": usage.free < LOW_DISK_BYTES}


def diagnose(runs_dir: str | Path = "runs", check_hub: bool = True, hub_timeout_s: float = 1.5) -> Report:
    """Build the report (see the module docstring); ``check_hub=False`` makes no network connection."""
    if not (math.isfinite(hub_timeout_s) and hub_timeout_s > 0):  # nan: a socket traceback; inf: wait forever
        raise ConfigError(f"--hub-timeout {hub_timeout_s!r} is invalid; use a number of seconds above zero, e.g. 1.5")
    missing = installed_extras()
    extras = {extra: {"installed": not missing[extra], "missing": missing[extra], "enables": WHAT_NEEDS[extra],
                      "install": install_hint(extra)} for extra in EXTRAS}
    cpu = cpu_info()
    found_gpus = gpus()
    report = Report(versions=versions(), extras=extras, cpu=cpu,
                    capabilities=capabilities(cpu, not missing["quant"], found_gpus), gpus=found_gpus,
                    offline_weights=offline_weights(), hub=hub_status(check_hub, hub_timeout_s), disk=disk(runs_dir))
    report.fixes = fixes(report)
    return report


def fixes(report: Report) -> list[str]:
    """The commands (or settings) that fix what the report found missing, one per problem."""
    out = [f"{e['install']}   # {e['enables']}" for e in report.extras.values() if not e["installed"]]
    weights = report.offline_weights
    if weights and not any(w["installed"] for w in weights):
        out.append(f"{weights[0]['install']}   # offline pretrained weights ({weights[0]['arch']}), "
                   "for machines that cannot reach the hub")
    if report.hub["reachable"] is False or (report.hub["reachable"] is None and "no answer" in report.hub["note"]):
        out.append("export HF_HUB_OFFLINE=1   # the hub is out of reach: use backbone.weights=offline "
                   "(or a local file: backbone.weights=PATH.safetensors)")
    if report.disk["low"]:
        out.append(f"run.dir=SOMEWHERE_LARGER   # only {report.disk['free_gib']} GiB free under {report.disk['runs_dir']}")
    return out


def format_report(report: Report) -> str:
    """The report as the text ``visiontune doctor`` prints."""
    v, cpu = report.versions, report.cpu
    lines = ["versions   " + "  ".join(f"{k} {val}" for k, val in v.items())]
    lines.append("extras     " + "  ".join(f"{k} {'yes' if e['installed'] else 'no'}" for k, e in report.extras.items()))
    lines.append(f"cpu        {cpu['cpu']}, {cpu['cores']} cores, torch threads {cpu['torch_threads']}; "
                 f"extensions: {', '.join(cpu['isa']) or 'none of AVX2/AVX-512/VNNI/BF16/AMX'}")
    lines += [f"  {k:<8} {text}" for k, text in report.capabilities.items()]
    if report.gpus:
        lines += [f"gpu {g['index']}      {g['name']}, {g['memory_gib']} GiB" for g in report.gpus]
    else:
        lines.append("gpu        none (CUDA not available): training and inference run on the CPU")
    for w in report.offline_weights:
        state = ("converted" if w["converted"] else "installed, converted on first use") if w["installed"] else "not installed"
        lines.append(f"weights    offline:{w['name']} ({w['arch']}): {state}")
    lines.append(f"hub        {report.hub['host']}: {report.hub['note']}")
    d = report.disk
    lines.append(f"disk       {d['free_gib']} GiB free under {d['runs_dir']}" + ("  (low)" if d["low"] else ""))
    if report.fixes:
        lines.append("to fix:")
        lines += [f"  {f}" for f in report.fixes]
    else:
        lines.append("nothing to fix")
    return "\n".join(lines)
