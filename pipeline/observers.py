"""The small set of hooks through which metrics and the status page follow the runner.

A failing observer is logged and never fails an update (STYLE item 5).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pipeline.journal import Run

log = logging.getLogger("dropgate")


class Observer:
    """Every hook does nothing by default; observers override what they need."""

    def gate_changed(self, gate: str) -> None:
        """The gate is now `idle`, `busy` or `blocked`."""

    def step_started(self, run: Run, step: str, started: float, deadline: float | None) -> None:
        """`step` (a step name or `rollback`) began for `run`."""

    def step_finished(self, run: Run, step: str, result: str, seconds: float) -> None:
        """`step` ended with `result` (`ok`, `rejected`, `failed`, `interrupted`, `resumable`)."""

    def step_progress(self, run_id: int, step: str, ratio: float, message: str | None) -> None:
        """Progress within the current step."""

    def run_updated(self, run: Run) -> None:
        """A run's journal record changed (maintenance on/off, platform changed, facts)."""

    def run_finished(self, run: Run) -> None:
        """`run` reached its outcome."""

    def inbox_changed(self, files: int, oldest_age: float, uploading: Sequence[dict[str, Any]]) -> None:
        """The backlog: files waiting (in the inbox or queued) and the age of the oldest."""


class Observers(Observer):
    """Fans each hook out to many observers, isolating their failures."""

    def __init__(self, observers: Sequence[Observer] = ()) -> None:
        self._observers = list(observers)

    def _each(self, hook: str, *args: Any) -> None:
        for observer in self._observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:
                log.exception("observer %s failed in %s; the update goes on", type(observer).__name__, hook)

    def gate_changed(self, gate: str) -> None:
        self._each("gate_changed", gate)

    def step_started(self, run: Run, step: str, started: float, deadline: float | None) -> None:
        self._each("step_started", run, step, started, deadline)

    def step_finished(self, run: Run, step: str, result: str, seconds: float) -> None:
        self._each("step_finished", run, step, result, seconds)

    def step_progress(self, run_id: int, step: str, ratio: float, message: str | None) -> None:
        self._each("step_progress", run_id, step, ratio, message)

    def run_updated(self, run: Run) -> None:
        self._each("run_updated", run)

    def run_finished(self, run: Run) -> None:
        self._each("run_finished", run)

    def inbox_changed(self, files: int, oldest_age: float, uploading: Sequence[dict[str, Any]]) -> None:
        self._each("inbox_changed", files, oldest_age, uploading)
