"""Live TensorBoard scalars for a run (``run.tensorboard: true``), through torch's own ``SummaryWriter``.

Only the thin switch is written here: off, it costs nothing; on, it needs the optional ``tensorboard``
package (``pip install 'visiontune[tensorboard]'``) and says so before training starts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from visiontune.atomic import record_made
from visiontune.errors import ConfigError


def require_tensorboard() -> None:
    """Raise unless the tensorboard package is importable (checked before a run touches its directory).

    Raises:
        ConfigError: saying how to install it, or to set run.tensorboard=false.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            "run.tensorboard=true needs the tensorboard package, which is not installed: "
            "pip install 'visiontune[tensorboard]' (or pip install tensorboard), or set run.tensorboard=false"
        ) from e


class ScalarLogger:
    """Writes per-epoch scalars (``train/loss``, ``train/lr``, ``val/accuracy`` ...) to a TensorBoard log folder.

    Created disabled (``log_dir=None``) it does nothing, so the training loop calls it unconditionally.
    """

    def __init__(self, log_dir: str | Path | None) -> None:
        """Open the writer.

        Args:
            log_dir: folder for the event files (a run's ``tensorboard/``); None disables logging.

        Raises:
            ConfigError: logging was asked for but the tensorboard package is not installed.
        """
        self._writer = None
        if log_dir is None:
            return
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(log_dir)
        before = set(log_dir.iterdir()) if log_dir.is_dir() else set()
        self._writer = SummaryWriter(log_dir=str(log_dir))
        self._writer.flush()  # the event file exists from here on
        # The event files are not written atomically: each is listed in the run's manifest as it is made (a file, not
        # the folder, so a file of the user's in tensorboard/ survives run.overwrite=true).
        for made in sorted(set(log_dir.iterdir()) - before):
            record_made(made)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def log(self, step: int, scalars: dict[str, Any]) -> None:
        """Write every finite number in ``scalars`` at ``step``, then flush so a live TensorBoard sees it.

        Keys like ``train_loss`` / ``val_accuracy`` become ``train/loss`` / ``val/accuracy`` (TensorBoard
        groups by the part before the slash); a bare key such as ``lr`` goes under ``train/``.
        """
        if self._writer is None:
            return
        for key, value in scalars.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            tag = key if "/" in key else key.replace("_", "/", 1) if "_" in key else f"train/{key}"
            self._writer.add_scalar(tag, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
