"""``visiontune sweep --executor ray``: each run of a sweep as a Ray task, on a local instance or a cluster.

Why Ray: a sweep's runs are independent, so they spread over the GPUs (or CPU groups) of several machines
with nothing more than a scheduler that knows each machine's resources, and Ray is that scheduler. Each run
is one task reserving ``gpus_per_run`` GPUs (Ray sets ``CUDA_VISIBLE_DEVICES``, so ``run.device=auto``
trains on the GPU it was given) or ``cpus_per_run`` CPUs (also the run's torch threads). The task calls
:func:`visiontune.sweep.run_entry`, the same function the local process pool runs, and the driver records
its outcome with the same callback: finished runs are skipped on a rerun, a run killed mid-way resumes from
its checkpoint, ``failures.json`` names failures, and a worker process that dies (killed, out of memory, its
node lost) is recorded as that run's failure while the rest go on. Nothing is retried automatically: a
run that brought its worker down would likely do it again; rerunning the sweep retries it, from its checkpoint.

Paths: a task changes to the driver's working directory when that exists on its node, so relative paths in
the sweep (its ``dir``, ``data.dataset``) mean what they mean locally. On a multi-node cluster every node
needs the data, the sweep folder (a shared filesystem) and visiontune installed; a relative sweep folder on
a node without the driver's directory is reported as that run's failure, naming the fix.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from visiontune.errors import ConfigError
from visiontune.sweep.spec import entry_config

DEFAULT_CPUS_PER_RUN = 4
"""CPUs (and torch threads) per run when runs get no GPU and ``--cpus-per-run`` is not given (fewer on a
smaller cluster): beyond about four threads a small-batch ViT step gains little, and more runs at once use
the cores better."""

RAY_HINT = ("the Ray executor needs ray; install it with pip install 'visiontune[cluster]' (or pip install ray), "
            "or run the sweep with --executor local")


EXECUTORS = ("local", "ray")
"""Where a sweep's runs or a selection's folds execute: ``local`` (this machine) or ``ray``."""


def check_executor(executor: str, **ray_options: Any) -> None:
    """Refuse an unknown executor, and Ray options (``ray_address=...``) given without the Ray executor; with it,
    check that ray is installed. Called before anything is written."""
    if executor not in EXECUTORS:
        raise ConfigError(f"executor {executor!r} is not one of {', '.join(EXECUTORS)}; use --executor local or ray")
    if executor == "local":
        for name, value in ray_options.items():
            if value is not None:
                raise ConfigError(f"{name}={value!r} applies to the Ray executor only; add --executor ray, or drop it")
    else:
        cpus = ray_options.get("cpus_per_run")
        if cpus is not None and cpus < 1:  # refused here, not after a Ray instance was started
            raise ConfigError(f"--cpus-per-run {cpus} must be >= 1")
        gpus = ray_options.get("gpus_per_run")
        if gpus is not None and not (math.isfinite(gpus) and gpus >= 0):
            raise ConfigError(f"--gpus-per-run {gpus!r} is invalid; use a number of GPUs >= 0 (fractions share one)")
        require_ray()


def require_ray() -> Any:
    """The ``ray`` module, or a ConfigError with the install command (ray is an optional extra)."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError(RAY_HINT) from e
    return ray


def connect(address: str | None = None, cores: int | None = None) -> tuple[Any, bool, str]:
    """Join the Ray instance to use: already initialised, ``address``, ``RAY_ADDRESS``, or a new local one
    (with ``cores`` CPUs; None: Ray counts them).

    Returns:
        (ray module, whether this call started it, the address in words).
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray, False, address or os.environ.get("RAY_ADDRESS") or "the Ray instance this process joined"
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        try:
            ray.init(address=target, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(
                f"cannot join the Ray cluster at {target!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "start it with `ray start --head` on the head node and pass its address (--ray-address HOST:6379, "
                "or ray://HOST:10001 for Ray Client), or leave --ray-address and RAY_ADDRESS unset for a local instance"
            ) from e
        return ray, True, target
    ray.init(num_cpus=cores, include_dashboard=False)
    return ray, True, "local instance"


def plan_resources(
    cluster: dict[str, float], devices: list[str], cpus_per_run: int | None, gpus_per_run: float | None,
) -> tuple[int, float]:
    """(CPUs, GPUs) each run's task reserves on ``cluster`` (Ray's ``cluster_resources()``).

    Args:
        devices: the runs' ``run.device`` values; ``cpu`` everywhere means no GPU is reserved by default.

    Raises:
        ConfigError: a request no node of that size can meet (Ray would wait for it forever).
    """
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if gpus_per_run is None:
        gpus_per_run = 1.0 if gpus >= 1 and any(d != "cpu" for d in devices) else 0.0
    if gpus_per_run < 0:
        raise ConfigError(f"gpus_per_run={gpus_per_run} must be >= 0")
    if gpus_per_run > gpus:
        raise ConfigError(
            f"--gpus-per-run {gpus_per_run:g} but the Ray cluster has {gpus:g} GPUs; use --gpus-per-run 0 "
            "(CPU runs) or join a cluster with GPUs (--ray-address)"
        )
    if cpus_per_run is None:
        share = int(cpus // gpus) if gpus_per_run and gpus else DEFAULT_CPUS_PER_RUN
        cpus_per_run = max(1, min(share, int(cpus) or 1))
    if cpus_per_run < 1:
        raise ConfigError(f"--cpus-per-run {cpus_per_run} must be >= 1")
    if cpus_per_run > cpus:
        raise ConfigError(
            f"--cpus-per-run {cpus_per_run} but the Ray cluster has {cpus:g} CPUs, so no run could ever start; "
            f"use --cpus-per-run {max(1, int(cpus))} or less"
        )
    return int(cpus_per_run), float(gpus_per_run)


def _ray_task(
    run_entry: Callable[..., tuple[str, str]], sweep_base: dict[str, Any], entry: Any, out: str, threads: int, cwd: str,
) -> tuple[str, str]:
    """The body of one run's Ray task (a module-level function: workers import it by name). ``run_entry`` is
    :func:`visiontune.sweep.run_entry`, passed in (by reference: it is module level) so that this module does
    not import the package that imports it."""
    import ray

    if os.path.isdir(cwd):
        os.chdir(cwd)
    elif not Path(out).is_absolute():
        return "failed", (
            f"the sweep folder {out!r} is relative and the driver's directory {cwd!r} does not exist on node "
            f"{ray.get_runtime_context().get_node_id()}; give the sweep an absolute dir on a filesystem every node shares"
        )
    where = {"executor": "ray", "node": ray.get_runtime_context().get_node_id()}
    return run_entry(sweep_base, entry, out, threads, where)


def _lost_worker_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return (f"the Ray worker running this run died before reporting ({type(e).__name__}: {first}); killed, out of "
            "memory or its node lost? Rerun the sweep to resume it from its checkpoint")


class RayTasks:
    """A function run as Ray tasks, each reserving ``cpus`` CPUs and ``gpus`` GPUs, at most ``limit`` in flight.

    Shared by the sweep (one task per run) and ``visiontune auto`` (one task per candidate's fold). A task that
    raises re-raises its own exception here; a task whose worker died (killed, out of memory, its node lost)
    comes back as a text saying so, for the caller to record while the rest go on.
    """

    def __init__(self, ray: Any, fn: Callable[..., Any], cpus: int, gpus: float, limit: int, facts: dict[str, Any] | None = None):
        # max_retries=0: a task that killed its worker (out of memory, say) is recorded, not blindly repeated.
        self.ray = ray
        self.facts = dict(facts or {})
        self.threads = cpus  # each task's torch threads: the CPUs it reserved
        self.task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(fn)
        self.limit = max(1, int(limit))
        self.in_flight: dict[Any, Any] = {}

    @property
    def free(self) -> bool:
        return len(self.in_flight) < self.limit

    @property
    def busy(self) -> list[Any]:
        """The keys of the tasks in flight."""
        return list(self.in_flight.values())

    def submit(self, key: Any, *args: Any) -> None:
        self.in_flight[self.task.remote(*args)] = key

    def wait_one(self) -> tuple[Any, Any, str | None]:
        """(key, result, None) for the next task to finish, or (key, None, why) when its worker died."""
        ready, _ = self.ray.wait(list(self.in_flight), num_returns=1)
        key = self.in_flight.pop(ready[0])
        try:
            return key, self.ray.get(ready[0]), None
        except self.ray.exceptions.RayTaskError as e:  # the task raised: its own error, as if run here
            raise e.as_instanceof_cause() from None
        except self.ray.exceptions.RayError as e:
            return key, None, _lost_worker_text(e)

    def cancel(self) -> None:
        """Stop the tasks in flight (interrupted: their checkpoints or records let a rerun continue)."""
        for ref in self.in_flight:
            self.ray.cancel(ref, force=True)
        self.in_flight.clear()


@contextlib.contextmanager
def ray_session(
    address: str | None, devices: list[str], cpus_per_run: int | None, gpus_per_run: float | None,
    cores: int | None = None,
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Join (or start) Ray, plan each task's resources (:func:`plan_resources`); yield (ray, session facts).

    The facts: executor, address, cluster resources, cpus/gpus per run and ``slots`` (how many such tasks the
    cluster holds at once). A local instance started here is shut down on leaving.
    """
    ray, started_here, where = connect(address, cores)
    try:
        cluster = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        cpus, gpus = plan_resources(cluster, devices, cpus_per_run, gpus_per_run)
        slots = int(cluster.get("CPU", 1) // cpus)
        if gpus:
            slots = min(slots, int(cluster.get("GPU", 0) // gpus))
        yield ray, {"executor": "ray", "address": where, "cluster": cluster, "cpus_per_run": cpus,
                    "gpus_per_run": gpus, "slots": max(1, slots)}
    finally:
        if started_here:
            ray.shutdown()


def run_on_ray(
    sweep: Any, todo: list[Any], bar: Any, record: Callable[[Any, str, str], None], address: str | None = None,
    cpus_per_run: int | None = None, gpus_per_run: float | None = None, max_in_flight: int | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    run_entry: Callable[..., tuple[str, str]] | None = None, cores: int | None = None,
) -> dict[str, Any]:
    """Run ``todo`` as Ray tasks; ``record(entry, state, text)`` is called as each finishes.

    Args:
        sweep: the :class:`~visiontune.sweep.Sweep`.
        todo: its entries still to run.
        bar: a tqdm bar, advanced by one per finished run.
        address: see :func:`connect`.
        cpus_per_run / gpus_per_run: see :func:`plan_resources`.
        max_in_flight: submit at most this many tasks at a time (default: all; Ray starts as many as the
            cluster's free resources allow and queues the rest).
        on_start: called with the session facts (address, cluster, resources) once they are known, so
            the session log has them even if the sweep is interrupted.
        run_entry: the per-run function (:func:`visiontune.sweep.run_entry`, the local pool's too).
        cores: CPUs of a new local Ray instance (see :func:`connect`).

    Returns:
        The session facts: executor, address, cluster resources, cpus/gpus per run.
    """
    if run_entry is None:
        raise ConfigError("run_on_ray needs the per-run function (visiontune.sweep.run_entry)")
    devices = [entry_config(sweep.base, e, sweep.dir).run.device for e in todo]
    with ray_session(address, devices, cpus_per_run, gpus_per_run, cores) as (ray, facts):
        facts = {k: v for k, v in facts.items() if k != "slots"}
        if on_start is not None:
            on_start(facts)
        tasks = RayTasks(ray, _ray_task, facts["cpus_per_run"], facts["gpus_per_run"], max_in_flight or len(todo) or 1)
        pending = list(todo)
        cwd = os.getcwd()
        try:
            while pending or tasks.in_flight:
                while pending and tasks.free:
                    entry = pending.pop(0)
                    tasks.submit(entry, run_entry, sweep.base, entry, str(sweep.dir), facts["cpus_per_run"], cwd)
                entry, outcome, lost = tasks.wait_one()
                state, text = ("failed", lost) if lost else outcome
                if state == "interrupted":
                    raise KeyboardInterrupt(entry.name)
                record(entry, state, text)
                bar.update(1)
        finally:
            tasks.cancel()
        return facts
