"""The micro-batcher: grouping per adapter, results routed to the right caller, failures isolated."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from visiontune.serve.batching import MicroBatcher


def test_concurrent_items_are_grouped_per_key_and_answered_in_place() -> None:
    calls: list[tuple[str, int]] = []
    gate = threading.Event()

    def run(key: str, x: torch.Tensor) -> torch.Tensor:
        gate.wait(5)  # hold the worker so that the rest of the submissions queue up behind the first
        calls.append((key, len(x)))
        return x * (10 if key == "a" else -1)

    b = MicroBatcher(run, max_batch=8, max_wait_ms=0)
    futures = [(i, key, b.submit(key, torch.tensor([float(i)]))) for i, key in enumerate("aabababbbaaa")]
    gate.set()
    for i, key, fut in futures:
        res = fut.result(5)
        assert res.output.item() == i * (10 if key == "a" else -1)
    b.close()
    # The first item ran alone (the worker took it before the others arrived); the rest were grouped
    # by key, at most max_batch per gathering round, so there are far fewer calls than items.
    assert sum(n for _, n in calls) == 12 and len(calls) <= 5 and max(n for _, n in calls) > 1
    assert b.snapshot()["requests"] == 12 and b.snapshot()["largest_batch"] == max(n for _, n in calls)


def test_a_failing_group_fails_only_its_requests_and_the_worker_goes_on() -> None:
    def run(key: str, x: torch.Tensor) -> torch.Tensor:
        if key == "bad":
            raise RuntimeError("boom")
        return x + 1

    b = MicroBatcher(run, max_batch=4, max_wait_ms=5)
    with ThreadPoolExecutor(8) as pool:
        futs = list(pool.map(lambda k: b.submit(k, torch.zeros(2)), ["ok", "bad", "ok", "bad", "ok"]))
    for key, fut in zip(["ok", "bad", "ok", "bad", "ok"], futs):
        if key == "bad":
            with pytest.raises(RuntimeError, match="boom"):
                fut.result(5)
        else:
            assert torch.equal(fut.result(5).output, torch.ones(2))
    assert b.submit("ok", torch.zeros(1)).result(5).output.item() == 1.0
    assert b.snapshot()["errors"] == 2
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.submit("ok", torch.zeros(1))


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_batch=0"):
        MicroBatcher(lambda k, x: x, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_ms=-1"):
        MicroBatcher(lambda k, x: x, max_wait_ms=-1)
