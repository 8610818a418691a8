"""``visiontune sweep --dry-run``: every run of a sweep checked against the real model classes.

Each entry's config is validated, then its backbone is built on the meta device, its method applied and a
batch of its input size pushed through (:func:`visiontune.check.check_config`), so a cell that cannot run
(a preset that selects nothing on that architecture, an unknown timm name, an ``img_size`` the model
rejects) is reported before the first GPU hour rather than after the cells before it have run. Entries
whose configs agree on everything that reaches the model share one model check (seeds, learning rates and
LoRA ranks never decide whether a model can be built).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from visiontune.check import MetaDeviceLimit, check_config, check_key
from visiontune.errors import ConfigError
from visiontune.sweep.spec import Sweep, entry_config

Status = Literal["ok", "invalid", "unchecked"]


@dataclass
class EntryCheck:
    """The dry-run verdict on one sweep entry.

    Attributes:
        name: the run name.
        status: ``ok``; ``invalid`` (the run would fail; ``detail`` says why and how to fix it); or
            ``unchecked`` (a step needs tensor values, so the meta device could not tell; ``detail`` says which).
        detail: the error, for ``invalid`` / ``unchecked``.
        notes: what was not checked for an ``ok`` run (e.g. 4-bit quantization).
        shared_with: the run whose model check this entry shares (same :func:`~visiontune.check.check_key`).
        seconds: time the check took.
    """

    name: str
    status: Status
    detail: str = ""
    notes: list[str] = field(default_factory=list)
    shared_with: str | None = None
    seconds: float = 0.0


def check_sweep(sweep: Sweep, on_result: Callable[[EntryCheck], None] | None = None) -> list[EntryCheck]:
    """Check every entry of ``sweep`` (see the module docstring); ``on_result`` is called as each is decided.

    Every entry's config is validated on its own; the model check is shared by entries whose configs agree
    on everything that reaches the model (:func:`visiontune.check.check_key`: seeds, optimiser settings and
    LoRA ranks do not), and such an entry names the one it shares the check with.

    Args:
        sweep: from :func:`visiontune.sweep.load_sweep` (``validate=False`` lets config problems show per run).
        on_result: e.g. a printer, so a long sweep shows progress.

    Returns:
        One :class:`EntryCheck` per entry, in sweep order.
    """
    checked: dict[str, EntryCheck] = {}
    out = []
    for entry in sweep.entries:
        started = time.perf_counter()
        try:
            cfg = entry_config(sweep.base, entry, sweep.dir)
        except ConfigError as e:
            result = EntryCheck(entry.name, "invalid", "\n".join(e.problems))
        else:
            key = check_key(cfg)
            first = checked.get(key)
            if first is not None:
                result = EntryCheck(entry.name, first.status, first.detail, list(first.notes), shared_with=first.name)
            else:
                result = checked[key] = _check_model(entry.name, cfg)
        result.seconds = time.perf_counter() - started
        out.append(result)
        if on_result is not None:
            on_result(result)
    return out


def _check_model(name: str, cfg: Any) -> EntryCheck:
    try:
        return EntryCheck(name, "ok", notes=check_config(cfg))
    except ConfigError as e:
        return EntryCheck(name, "invalid", "\n".join(e.problems))
    except MetaDeviceLimit as e:
        return EntryCheck(name, "unchecked", f"could not be checked on the meta device: {e}")
    except Exception as e:  # timm / peft / visiontune errors alike: the run would stop with this
        return EntryCheck(name, "invalid", f"{type(e).__name__}: {str(e).strip() or '(no message)'}")


def format_check(result: EntryCheck) -> str:
    """One run's line(s): ``ok        name``; an error follows, indented, under an invalid or unchecked run
    (once: a run that shares another's model check points to it instead of repeating the error)."""
    line = f"{result.status:9s} {result.name}"
    if result.shared_with:
        return line + f"  (same model check as {result.shared_with})"
    if result.detail:
        line += "".join(f"\n{'':10s}{d}" for d in result.detail.splitlines())
    return line


def summarize_checks(results: list[EntryCheck]) -> str:
    """The closing lines: distinct notes with their run counts, then the verdict naming every invalid run."""
    lines = []
    notes: dict[str, int] = {}
    for r in results:
        for n in r.notes:
            notes[n] = notes.get(n, 0) + 1
    if notes:
        lines.append("notes:")
        lines += [f"  - {n} ({count} run{'s' if count > 1 else ''})" for n, count in notes.items()]
    invalid = [r.name for r in results if r.status == "invalid"]
    unchecked = [r.name for r in results if r.status == "unchecked"]
    scope = "backbone and method checked on the meta device; data not read, weights not loaded"
    if invalid:
        lines.append(f"{len(invalid)} of {len(results)} runs invalid: {', '.join(invalid)}")
    else:
        checked = len(results) - len(unchecked)
        lines.append(f"all {checked} checked run{'s' if checked != 1 else ''} valid ({scope})")
    if unchecked:
        lines.append(f"{len(unchecked)} run(s) could not be checked on the meta device: {', '.join(unchecked)}")
    return "\n".join(lines)
