"""What a step gets: the run's context (SPEC section 7 environment) and a way to report.

A step knows nothing of metrics, sockets or the CLI: it reads `ctx.config` and
`ctx.facts`, runs commands through `ctx.run_command`, reports through
`ctx.event`/`ctx.progress`, and calls `ctx.checkpoint()` in long loops so that
its time limit and a shutdown can stop it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import CommandSpec, Config
from pipeline.errors import StepAborted, StepTimeout
from pipeline.process import CancelToken, CommandResult, run_command


class Reporter(Protocol):
    """How a step's reports reach the journal, the run log and the observers (the runner)."""

    def event(self, run_id: int, step: str, message: str) -> None: ...

    def log(self, run_id: int, line: str) -> None: ...

    def progress(self, run_id: int, step: str, ratio: float, message: str | None) -> None: ...

    def update_run(self, run_id: int, **fields: Any) -> None: ...


@dataclass
class StepContext:
    """The run as one step sees it.

    `facts` is persisted in the journal after every step (and on `save_facts`),
    so that a later step, a restart or a rollback finds what earlier steps did.
    Known keys: manifest, from_version, to_version, release_dir, downtime,
    downtime_reason, previous_release, backup_dir, approved_at, prereq_at,
    maintenance_since.
    """

    run_id: int
    step: str
    archive: Path
    archive_name: str
    sha256: str
    config: Config
    facts: dict[str, Any]
    reporter: Reporter
    cancel: CancelToken = field(default_factory=CancelToken)
    protected_runs: frozenset[int] = frozenset()  # runs whose backups pruning must keep
    deadline: float | None = None
    now: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        # The part of the step's bar that progress reported now fills (see `share`), and how far it got.
        self._span: tuple[float, float] = (0.0, 1.0)
        self._reached = 0.0

    # -- reporting -------------------------------------------------------
    def event(self, message: str) -> None:
        """A line in the run's history (journal), the run log and `show`."""
        self.reporter.event(self.run_id, self.step, message)

    def log(self, line: str) -> None:
        """A line in the run log only (command output, details)."""
        self.reporter.log(self.run_id, line)

    def progress(self, ratio: float, message: str | None = None) -> None:
        """Progress within this step, 0..1 (shown in status, the page and the metrics).

        Inside `share(low, high)` the ratio fills only that part of the bar. What
        is shown never goes back: a lower report keeps the bar where it was.
        """
        low, high = self._span
        mapped = low + (high - low) * min(1.0, max(0.0, ratio))
        self._reached = max(self._reached, mapped)
        self.reporter.progress(self.run_id, self.step, self._reached, message)

    @contextmanager
    def share(self, low: float, high: float) -> Iterator[None]:
        """Progress reported inside the block (by the step, or by a command's DROPGATE_PROGRESS_FD)
        fills [low, high] of the current part of the bar: a migration's own 0..1 is its share of apply."""
        outer = self._span
        width = outer[1] - outer[0]
        self._span = (outer[0] + width * low, outer[0] + width * high)
        try:
            yield
        finally:
            self._span = outer

    def save_facts(self, **facts: Any) -> None:
        """Record facts now (not only at the end of the step): they must survive a crash."""
        self.facts.update(facts)
        self.reporter.update_run(self.run_id, facts=dict(self.facts))

    def update_run(self, **fields: Any) -> None:
        """Set journal columns of the run (from_version, to_version, platform_changed, maintenance)."""
        self.reporter.update_run(self.run_id, **fields)

    # -- time ------------------------------------------------------------
    def checkpoint(self) -> None:
        """Raise if the step was cancelled or ran past its time limit."""
        if self.cancel.cancelled:
            raise StepAborted(f"{self.step} was stopped: {self.cancel.reason}", resumable=self.cancel.resumable)
        if self.deadline is not None and self.now() >= self.deadline:
            raise StepTimeout(f"{self.step} ran past its time limit")

    def wait(self, seconds: float) -> None:
        """Sleep up to `seconds` (less if the deadline comes first), then checkpoint."""
        if self.deadline is not None:
            seconds = min(seconds, self.deadline - self.now())
        self.cancel.wait(seconds)
        self.checkpoint()

    # -- commands --------------------------------------------------------
    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The context variables every hook and command gets (SPEC section 7)."""
        env = {
            "DROPGATE_RUN_ID": str(self.run_id),
            "DROPGATE_FROM_VERSION": str(self.facts.get("from_version") or ""),
            "DROPGATE_TO_VERSION": str(self.facts.get("to_version") or ""),
            "DROPGATE_RELEASE_DIR": str(self.facts.get("release_dir") or ""),
            "DROPGATE_BACKUP_DIR": str(self.facts.get("backup_dir") or ""),
        }
        env.update(extra or {})
        return env

    def run_command(
        self,
        cmd: CommandSpec | Sequence[str],
        *,
        what: str = "",
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        progress: bool = True,
        stdin_path: Path | None = None,
        stdout_path: Path | None = None,
        check: bool = True,
        starts_services: bool = False,
    ) -> CommandResult:
        """Run a command or hook under this step's deadline and cancel token, output to the run log.

        What it leaves running in its session when it exits is ended, unless
        `starts_services` (services.start and restart: that is the platform).
        """
        self.checkpoint()
        return run_command(
            cmd,
            log=self.log,
            what=what,
            env=self.environment(env),
            cwd=cwd,
            deadline=self.deadline,
            cancel=self.cancel,
            on_progress=self.progress if progress else None,
            stdin_path=stdin_path,
            stdout_path=stdout_path,
            check=check,
            starts_services=starts_services,
            now=self.now,
        )
