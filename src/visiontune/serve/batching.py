"""Micro-batching: concurrent requests for the same adapter share one forward pass.

One worker thread owns every forward pass. Requests put ``(adapter, image tensor)`` on a queue and
get a :class:`concurrent.futures.Future`; the worker takes the oldest request, gathers whatever else
is queued (waiting at most ``max_wait_ms`` for more, up to ``max_batch`` requests), groups them by
adapter, and runs one batched forward per adapter. Under load this turns N queued single-image
requests into a few batched passes (a batch of 32 costs far less than 32 passes on CPU and GPU
alike); an isolated request waits at most ``max_wait_ms``.

Having one thread run the model is also the service's thread-safety story: adapter selection and
forward never interleave between requests, whatever the method.

Written by hand: the serving libraries that batch (Triton, TorchServe, Ray Serve) are servers of
their own; inside a FastAPI app this is a queue and a thread.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

_STOP = object()


@dataclass
class BatchResult:
    """What a request's future resolves to: its row of the output and the size of the batch it ran in."""

    output: torch.Tensor
    batch_size: int


@dataclass
class _Request:
    key: str
    x: torch.Tensor
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Group concurrent single-item requests per key into batched calls on one worker thread.

    Args:
        run: ``run(key, batch [B, ...]) -> output [B, ...]``; called only from the worker thread.
        max_batch: most requests in one call.
        max_wait_ms: how long the worker waits for more requests after the first one arrives.
    """

    def __init__(self, run: Callable[[str, torch.Tensor], torch.Tensor], max_batch: int = 32, max_wait_ms: float = 1.0):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={max_wait_ms} must be >= 0")
        self._run = run
        self.max_batch = int(max_batch)
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "errors": 0}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="visiontune-batcher", daemon=True)
        self._thread.start()

    def submit(self, key: str, x: torch.Tensor) -> Future:
        """Queue one item (no batch dimension); the future resolves to a :class:`BatchResult`."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        req = _Request(key, x)
        self._queue.put(req)
        return req.future

    def close(self, timeout: float | None = 5.0) -> None:
        """Finish the queued requests, then stop the worker thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker
    def _gather(self, first: _Request) -> tuple[list[_Request], bool]:
        """The first request plus what arrives within the wait window; True when a stop was seen."""
        pending = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(pending) < self.max_batch:
            try:
                # Take what is already queued without waiting; wait only while the window is open.
                remaining = deadline - time.monotonic()
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return pending, True
            pending.append(item)
        return pending, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            pending, stop = self._gather(first)
            groups: dict[str, list[_Request]] = {}
            for req in pending:
                groups.setdefault(req.key, []).append(req)
            for key, reqs in groups.items():
                self._run_group(key, reqs)
        # A submit racing with close() may land behind the stop marker: fail it rather than leave it hanging.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item.future.set_exception(RuntimeError("the service is shutting down"))

    def _run_group(self, key: str, reqs: list[_Request]) -> None:
        try:
            out = self._run(key, torch.stack([r.x for r in reqs]))
        except Exception as exc:  # noqa: BLE001 - delivered to each waiting request, the worker goes on
            with self._lock:
                self.stats["errors"] += len(reqs)
            for r in reqs:
                r.future.set_exception(exc)
            return
        with self._lock:
            self.stats["requests"] += len(reqs)
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(reqs))
        for i, r in enumerate(reqs):
            r.future.set_result(BatchResult(out[i], len(reqs)))

    def snapshot(self) -> dict[str, int]:
        """Counters so far: requests served, batched calls, largest batch, failed requests."""
        with self._lock:
            return dict(self.stats, queued=self._queue.qsize())
