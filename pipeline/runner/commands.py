"""The operator's commands to the runner: approve, reject, resolve, retry, and the checks before a rollback.

Each either does what was asked and says so in one line, or refuses with a
`ControlRefused` naming why. They are called from the control socket's
threads; a rollback itself runs on the runner's thread (`Runner.rollback`).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pipeline.changes import rollback_done
from pipeline.config import Config
from pipeline.context import StepContext
from pipeline.errors import ControlRefused
from pipeline.journal import Journal, Run
from pipeline.recovery import ADVICE, rollback_blocker
from pipeline.runner.machine import ROLLBACK_OF_OUTCOMES, RunModel, build_machine


class OperatorCommands:
    """The commands part of the `Runner` (a base class of it: it uses the runner's state and reporting)."""

    config: Config
    journal: Journal
    steps: dict[str, ModuleType]
    state_dir: Path
    now: Callable[[], float]
    _lock: threading.RLock
    _ctx: StepContext | None

    if TYPE_CHECKING:

        def event(self, run_id: int, step: str, message: str) -> None: ...

        def update_run(self, run_id: int, **fields: Any) -> None: ...

        def wake(self) -> None: ...

        def _submit(self, action: Callable[[], str]) -> Future[str]: ...

        def _roll_back(self, run: Run, model: RunModel, cause: str) -> bool: ...

    def approve(self, run_id: int, who: str) -> str:
        with self._lock:
            ctx = self._ctx
            if ctx is None or ctx.run_id != run_id or ctx.step != "approval":
                run = self.journal.run(run_id)
                if run is None:
                    raise ControlRefused(f"there is no run {run_id}")
                where = run.outcome or run.step
                raise ControlRefused(f"run {run_id} is not waiting for approval (it is {where})")
            ctx.save_facts(approved_at=self.now(), approved_by=who)
            ctx.event(f"approved by {who}")
        return f"run {run_id} approved; it continues"

    def reject(self, run_id: int, note: str, who: str) -> str:
        """Refuse a run waiting in approval or window: it ends `rejected`, its archive is set aside."""
        with self._lock:
            ctx = self._ctx
            if ctx is None or ctx.run_id != run_id or ctx.step not in ("approval", "window"):
                run = self.journal.run(run_id)
                if run is None:
                    raise ControlRefused(f"there is no run {run_id}")
                where = run.outcome or run.step
                raise ControlRefused(
                    f"run {run_id} is not waiting in approval or window (it is {where}): "
                    "only a waiting run can be rejected"
                )
            ctx.save_facts(rejected_at=self.now(), rejected_by=who, rejected_note=note)
            ctx.event(f"rejected by {who}: {note}")
            ctx.cancel.cancel(f"rejected by {who}", resumable=False)
        return f"run {run_id} rejected; its archive is set aside in {self.state_dir / 'rejected'}"

    def resolve(self, run_id: int, note: str, who: str) -> str:
        run = self.journal.run(run_id)
        if run is None:
            raise ControlRefused(f"there is no run {run_id}")
        if not run.blocking:
            raise ControlRefused(f"run {run_id} does not block the gate (it is {run.outcome or run.step})")
        self.update_run(run_id, resolved=self.now(), resolved_note=note, maintenance=False)  # observers too
        self.event(run_id, "resolve", f"resolved by {who}: {note}")
        message = f"run {run_id} resolved"
        flag = self.config.maintenance.flag_file
        if flag.exists():
            message += f"; note: the maintenance flag {flag} still exists, remove it when the platform is ready"
        left = self.journal.blocking()
        if left:
            message += f"; the gate is still blocked by run {left[0].id} ({left[0].outcome})"
        else:
            message += "; the gate is open"
        self.wake()
        return message

    def retry(self, run_id: int, who: str) -> str:
        run = self.journal.run(run_id)
        if run is None:
            raise ControlRefused(f"there is no run {run_id}")
        if run.outcome not in ("rejected", "failed", "rolled_back", "interrupted"):
            raise ControlRefused(
                f"run {run_id} is {run.outcome or run.step}: only a rejected or failed run can be retried"
            )
        blocking = self.journal.blocking()
        if blocking:
            first = blocking[0]
            raise ControlRefused(
                f"the gate is blocked by run {first.id} ({first.outcome}): resolve it first "
                f"(dropgate resolve {first.id} --note ...)"
            )
        pending = (*self.journal.unfinished(), *self.journal.queued())
        waiting = [r for r in pending if run.sha256 is not None and r.sha256 == run.sha256]
        if waiting:  # a second click, or a retry repeated because a crash cut off the first one's answer
            raise ControlRefused(f"run {run_id} is queued again already, as run {waiting[0].id}: it runs once")
        source = Path(run.path)
        if not source.is_file():
            raise ControlRefused(f"the archive of run {run_id} is no longer at {source}")
        spool = self.state_dir / "spool"

        def place(new_id: int) -> Path:
            # Inside the journal's transaction: the new run never exists without its file and hash.
            target = spool / str(new_id) / run.archive
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
            return target

        new_id = self.journal.add_run(
            run.archive, spool=spool, arrived=self.now(), retry_of=run_id, place=place, sha256=run.sha256, size=run.size
        )
        self.event(new_id, "queued", f"retry of run {run_id}, asked by {who}")
        self.event(run_id, run.outcome or run.step, f"retried as run {new_id} by {who}")
        self.wake()
        return f"run {run_id} is queued again as run {new_id}"

    def rollback(self, run_id: int | None, who: str) -> Future[str]:
        """Put the platform back as it was before `run_id`; done on the runner thread."""
        return self._submit(lambda: self._operator_rollback(run_id, who))

    def _operator_rollback(self, run_id: int | None, who: str) -> str:
        if run_id is None:
            last = self.journal.last_with_outcome("failed", "interrupted")
            if last is None:
                raise ControlRefused("no failed or interrupted run to roll back; name one: dropgate rollback ID")
            run_id = last.id
        run = self.journal.run(run_id)
        if run is None:
            raise ControlRefused(f"there is no run {run_id}")
        if run.outcome not in ROLLBACK_OF_OUTCOMES:
            raise ControlRefused(
                f"run {run_id} is {run.outcome or run.step}: "
                "only a failed, interrupted or succeeded run can be rolled back"
            )
        later = [
            r
            for r in self.journal.runs(limit=1000)
            if r.id > run_id and r.platform_changed and r.outcome != "rolled_back"
        ]
        if later:
            raise ControlRefused(
                f"run {later[-1].id} changed the platform after run {run_id}: roll back run {later[-1].id} first"
            )
        if not run.platform_changed:
            raise ControlRefused(f"run {run_id} did not change the platform: there is nothing to roll back")
        blocker = rollback_blocker(self.journal)
        if blocker is not None:
            raise ControlRefused(blocker)
        model = RunModel(self.config, dict(run.facts), self.steps)
        build_machine(model, initial=run.outcome or "failed")
        self.event(run_id, "rollback", f"rollback asked by {who}")
        model.roll_back()  # type: ignore[attr-defined]
        self.journal.update_run(run_id, outcome=None, resolved=None)
        before = (run.error or "").split(ADVICE)[0]
        cause = (f"{before} — " if before else "") + f"rolled back by {who}: {rollback_done(run.facts)}"
        if self._roll_back(run, model, cause=cause):
            return f"run {run_id} rolled back; check the platform, then `dropgate resolve {run_id} --note ...`"
        raise ControlRefused(f"rollback of run {run_id} failed: see `dropgate show {run_id} --log`")
