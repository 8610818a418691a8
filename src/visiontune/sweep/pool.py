"""The local multi-process executor of a sweep: one fresh process per run, ``workers`` at a time
(:func:`run_parallel`)."""

from __future__ import annotations

from typing import Any, Callable

from visiontune.sweep.spec import Sweep, SweepEntry
from visiontune.sweep.worker import run_entry, worker_threads


def _worker(sweep_base: dict[str, Any], entry: SweepEntry, out: str, threads: int, conn: Any) -> None:
    """Body of one worker process of the process pool: :func:`run_entry`, its outcome sent back on ``conn``."""
    try:
        conn.send(run_entry(sweep_base, entry, out, threads))
    finally:
        conn.close()


def run_parallel(
    sweep: Sweep, todo: list[SweepEntry], workers: int, bar: Any, record: Callable[[SweepEntry, str, str], None]
) -> None:
    """Run ``todo`` in up to ``workers`` fresh processes at a time, one process per run.

    ``record(entry, state, text)`` is called as each finishes ("ok" with its accuracy, or "failed" with
    the error); ``bar`` (tqdm) advances by one per finished run.

    A process per run gives every run a clean interpreter, so a crash, a leak or an out-of-memory kill
    costs that run only. Processes come from a fork server that imported torch and visiontune once
    (never forked from this process: forking after torch started its thread pools can hang), so a run
    does not pay the imports again; ``spawn`` where there is no fork server (Windows). A hand-rolled
    scheduler rather than ``ProcessPoolExecutor``: a worker killed by the OS breaks a whole executor,
    and here it must only be recorded as that run's failure.
    """
    import multiprocessing as mp
    from multiprocessing.connection import wait

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["visiontune", "visiontune.train.loop", "visiontune.runs", "visiontune.sweep"])
    else:
        ctx = mp.get_context("spawn")
    threads = worker_threads(workers)
    pending = list(todo)
    running: dict[Any, tuple[Any, SweepEntry]] = {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                entry = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker, args=(sweep.base, entry, str(sweep.dir), threads, send),
                                   name=f"visiontune-sweep {entry.name}")
                proc.start()
                send.close()  # the parent keeps only its read end, so a dead child reads as EOF
                running[recv] = (proc, entry)
            for recv in wait(list(running)):
                proc, entry = running.pop(recv)
                try:
                    state, text = recv.recv()
                except EOFError:
                    state, text = "failed", ""
                proc.join()
                if state == "interrupted":
                    raise KeyboardInterrupt(entry.name)
                if state == "failed" and not text:
                    text = (f"worker process exited with code {proc.exitcode} before reporting "
                            "(killed by a signal or out of memory?)")
                record(entry, state, text)
                bar.update(1)
    finally:
        for proc, _ in running.values():  # interrupted: stop the others; their checkpoints let them resume
            proc.terminate()
            proc.join()


__all__ = ["run_parallel"]
