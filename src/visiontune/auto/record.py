"""What a selection keeps in its ``--out`` folder between runs: ``auto.json`` (:class:`Record`), written atomically
after each fold, so that after Ctrl-C or a kill the same command continues where it stopped; a rerun with other
settings is refused, naming each difference. The pruner's study sits beside it (``search.journal``,
:mod:`visiontune.auto.rungs`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from visiontune.atomic import write_text_atomic
from visiontune.auto.schedule import Clock
from visiontune.errors import ConfigError
from visiontune.rundir import claim_output_folder, read_json

STATE_FILE, STUDY_FILE = "auto.json", "search.journal"
AUTO_MAKES = (STATE_FILE, STUDY_FILE, "leaderboard.md", "leaderboard.json", "accuracy_vs_time.png", "per_class_f1.png",
              "labeled-data.yaml", "folds", "explora", "model")
"""Every top-level entry a selection writes into ``--out`` (what an older selection folder without a manifest holds)."""


def _is_old_selection(folder: Path) -> bool:
    """A selection folder from before manifests: its auto.json reads back with the selection's signature."""
    state, problem = read_json(folder / STATE_FILE)
    return not problem and isinstance(state, dict) and isinstance(state.get("signature"), dict)


def _effective_overrides(overrides: Any) -> dict[str, str]:
    """``key=value`` overrides as {key: value}, the last one of a key winning, as the config applies them."""
    out: dict[str, str] = {}
    for text in overrides if isinstance(overrides, list) else []:
        key, _, value = str(text).partition("=")
        out[key.strip()] = value.strip()
    return out


def _signature_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between a stored selection's signature and this one's, each named (overrides key by key;
    the same overrides in another order are the same selection)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key == "overrides":
            a, b = _effective_overrides(old.get(key)), _effective_overrides(new.get(key))
            out += [f"override {k}: {a.get(k, '(absent)')!s} in the stored selection, {b.get(k, '(absent)')!s} now"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key)!r} in the stored selection, {new.get(key)!r} now")
    return out


class Record:
    """``OUT/auto.json``: the selection's state (``signature``, ``cheap``, ``finetune``, ``explora``, ``final``), the
    time spent across runs by ``clock``, and the selection's log lines (when ``progress``)."""

    def __init__(self, out: str | Path, signature: dict[str, Any], clock: Clock, progress: bool):
        self.out = Path(out)
        self.signature = signature
        self.clock = clock
        self.progress = progress
        self.state: dict[str, Any] = {"signature": signature, "elapsed_s": 0.0, "cheap": {}, "finetune": {}}
        self._t0 = clock()
        self._elapsed_before = 0.0

    def claim(self) -> None:
        """Make ``--out`` this selection's folder (refusing one that holds anything else)."""
        claim_output_folder(self.out, "auto", AUTO_MAKES, _is_old_selection, "--out")

    def load(self) -> None:
        """Continue the selection ``auto.json`` holds, if any; refuse one made with other settings."""
        path = self.out / STATE_FILE
        if not path.is_file():
            return
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is unreadable ({e}); move it away to start the selection again") from e
        old = state.get("signature", {})
        if old != self.signature:
            diff = _signature_differences(old, self.signature)
            if diff:
                raise ConfigError(
                    f"{self.out} holds a selection with other settings ({'; '.join(diff)}); rerun with the same "
                    "data, backbones, folds and overrides to continue it, or choose another --out"
                )
            state["signature"] = self.signature  # the same overrides in another order: the same selection
        self.state = state
        self._elapsed_before = float(state.get("elapsed_s", 0.0))

    def save(self) -> None:
        self.state["elapsed_s"] = self.elapsed()
        write_text_atomic(self.out / STATE_FILE, json.dumps(self.state, indent=1, default=float))  # numpy scalars

    def elapsed(self) -> float:
        """Seconds this selection has run, earlier runs of the same ``--out`` included."""
        return self._elapsed_before + self.clock() - self._t0

    def log(self, text: str) -> None:
        if self.progress:
            print(f"[auto] {text}", flush=True)


__all__ = ["AUTO_MAKES", "Record", "STATE_FILE", "STUDY_FILE"]
