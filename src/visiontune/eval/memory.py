"""Peak memory of a block of code: CUDA allocator peak on GPU, sampled process RSS elsewhere.

On CUDA the caching allocator keeps an exact high-water mark that can be reset, so we use it. A CPU
process has no resettable equivalent that works everywhere, so a daemon thread samples the resident set
size every ``interval_s``; a spike shorter than the interval can be missed, which is acceptable for
training runs whose peaks last whole steps.
"""

from __future__ import annotations

import os
import threading
from types import TracebackType

import torch

_MIB = float(2**20)


def _rss_reader():
    """Returns a zero-argument function giving the process RSS in bytes, or ``None`` if none is available."""
    try:
        import psutil

        process = psutil.Process()
        return lambda: process.memory_info().rss
    except ImportError:
        pass
    if os.path.exists("/proc/self/statm"):
        page = os.sysconf("SC_PAGE_SIZE")

        def read_statm() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        return read_statm
    return None


class PeakMemory:
    """Context manager that records the peak memory used while its block runs.

    On CUDA it resets the device's peak statistics on entry, so nesting two of them on one GPU makes the
    outer one under-report.

    Example::

        with PeakMemory(device) as pm:
            train()
        print(pm.peak_mb, pm.kind)

    Attributes:
        kind: ``"cuda_allocated"`` (peak of ``torch.cuda.max_memory_allocated``: tensors only, not the
            allocator cache or CUDA context), ``"cpu_rss_peak"`` (peak resident set size of the whole
            process) or ``"unavailable"`` (no psutil and no ``/proc``; the values are then ``None``).
        peak_mb: peak in MiB; readable during the block (the peak so far) and after it.
        delta_mb: ``peak_mb`` minus the usage at entry, i.e. what the block itself added.
    """

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.02):
        """
        Args:
            device: the device the block computes on; CUDA devices use the allocator statistics.
            interval_s: RSS sampling period on non-CUDA devices.
        """
        self.device = torch.device(device)
        self.interval_s = interval_s
        self._cuda = self.device.type == "cuda"
        self._read_rss = None if self._cuda else _rss_reader()
        if self._cuda:
            self.kind = "cuda_allocated"
        else:
            self.kind = "cpu_rss_peak" if self._read_rss is not None else "unavailable"
        self._start_bytes: int | None = None
        self._peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._active = False

    def __enter__(self) -> PeakMemory:
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_bytes = torch.cuda.memory_allocated(self.device)
            self._peak_bytes = self._start_bytes
        elif self._read_rss is not None:
            self._start_bytes = self._peak_bytes = self._read_rss()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="visiontune-peak-rss", daemon=True)
            self._thread.start()
        self._active = True
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record(self._read_rss())

    def _record(self, rss: int) -> None:
        # Only the sampling thread writes while the block runs; __exit__ writes after joining it.
        if self._peak_bytes is None or rss > self._peak_bytes:
            self._peak_bytes = rss

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._active = False
        if self._cuda:
            torch.cuda.synchronize(self.device)
            self._peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._record(self._read_rss())
        # Returning None lets an exception from the block propagate.

    @property
    def peak_mb(self) -> float | None:
        if self._cuda and self._active:
            # Inside the block the allocator's running maximum is the live peak; after it, later
            # allocations must not leak into this block's figure, so the value frozen at exit is used.
            self._peak_bytes = max(self._peak_bytes or 0, torch.cuda.max_memory_allocated(self.device))
        return None if self._peak_bytes is None else self._peak_bytes / _MIB

    @property
    def delta_mb(self) -> float | None:
        peak = self.peak_mb
        if peak is None or self._start_bytes is None:
            return None
        return peak - self._start_bytes / _MIB

    @property
    def running(self) -> bool:
        """Whether the CPU sampling thread is alive (False after the block, even if it raised)."""
        return self._thread is not None and self._thread.is_alive()
