"""`Runner`: the thread that takes queued runs one at a time while the gate is open.

It takes each run through the machine (`pipeline.runner.machine`), one step at
a time: `states.<step>.run(ctx)` under the step's time limit, each start and
end recorded in the journal and the run's log and told to the observers; a
step's failure takes the failure path (rejected before backup, rolled back or
failed from then on). It is also the steps' reporter (events, log lines,
progress), and it serves the operator's commands (`pipeline.runner.commands`)
and the first and second SIGTERM.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.config import STEPS, Config, format_duration
from pipeline.context import StepContext
from pipeline.errors import ArchiveMisnamed, ControlRefused, SiteFault, StepAborted, StepFailed
from pipeline.faults import site_fault
from pipeline.inbox.order import start_order
from pipeline.journal import Journal, Run
from pipeline.observers import Observers
from pipeline.priority import run_step
from pipeline.process import CancelToken
from pipeline.recovery import PRE_CHANGE_STEPS, rollback_blocker, settle_runs
from pipeline.runlog import RunLog
from pipeline.runner.archives import discard_staged_release, prune_archives, set_aside
from pipeline.runner.commands import OperatorCommands
from pipeline.runner.machine import CHANGE_STEPS, ROLLBACK_AFTER, RunModel, build_machine, load_steps

log = logging.getLogger("dropgate")

PROGRESS_WRITE_INTERVAL = 0.5
COMPARABLE_RUNS = 3


class Runner(OperatorCommands, threading.Thread):
    """Takes queued runs one at a time while the gate is open, and answers operator commands."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        observers: Observers,
        *,
        steps: Mapping[str, ModuleType] | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name="dropgate-runner")
        self.config = config
        self.journal = journal
        self.observers = observers
        self.steps = dict(steps) if steps is not None else load_steps()
        self.now = now
        self.state_dir = config.paths.state
        self._wake = threading.Event()
        self._stop_requested = threading.Event()
        self._requests: queue.Queue[tuple[Callable[[], str], Future[str]]] = queue.Queue()
        self._lock = threading.RLock()
        self._ctx: StepContext | None = None
        self._logs: dict[int, RunLog] = {}
        self._progress_written: dict[int, float] = {}
        self._gate = ""
        self.crashed: Exception | None = None

    # -- the Reporter protocol (what steps report through their context) --
    def _run_log(self, run_id: int) -> RunLog:
        with self._lock:
            if run_id not in self._logs:
                self._logs[run_id] = RunLog(self.state_dir / "runs" / f"{run_id}.log")
            return self._logs[run_id]

    def event(self, run_id: int, step: str, message: str) -> None:
        self.journal.add_event(run_id, step, message)
        self._run_log(run_id).write(f"{step}: {message}")
        log.info("run %d %s: %s", run_id, step, message)

    def log(self, run_id: int, line: str) -> None:
        self._run_log(run_id).write(line)

    def progress(self, run_id: int, step: str, ratio: float, message: str | None) -> None:
        now = self.now()
        if now - self._progress_written.get(run_id, 0.0) >= PROGRESS_WRITE_INTERVAL or ratio >= 1.0:
            self._progress_written[run_id] = now
            self.journal.update_run(run_id, progress=ratio, progress_message=message)
        self.observers.step_progress(run_id, step, ratio, message)

    def update_run(self, run_id: int, **fields: Any) -> None:
        self.journal.update_run(run_id, **fields)
        run = self.journal.run(run_id)
        if run is not None:
            self.observers.run_updated(run)

    # -- control (called from other threads) ------------------------------
    def wake(self) -> None:
        self._wake.set()

    def request_stop(self) -> None:
        """First SIGTERM: a waiting or pre-change step stops now (the run resumes on restart);
        a step that may change the platform finishes, then the daemon stops (the run is `interrupted`)."""
        self._stop_requested.set()
        with self._lock:
            ctx = self._ctx
        if ctx is not None and ctx.step in PRE_CHANGE_STEPS:
            ctx.cancel.cancel("the daemon is stopping; the run resumes when it starts again", resumable=True)
        self.wake()

    def abort(self) -> None:
        """Second SIGTERM: stop the current step now, killing its commands."""
        self._stop_requested.set()
        with self._lock:
            ctx = self._ctx
        if ctx is not None:
            resumable = ctx.step in PRE_CHANGE_STEPS
            ctx.cancel.cancel("aborted by a second SIGTERM", resumable=resumable)
        self.wake()

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    def _submit(self, action: Callable[[], str]) -> Future[str]:
        future: Future[str] = Future()
        self._requests.put((action, future))
        self.wake()
        return future

    # -- the loop ----------------------------------------------------------
    def _publish_gate(self) -> str:
        gate = self.journal.gate()
        if gate != self._gate:
            self._gate = gate
            self.observers.gate_changed(gate)
        return gate

    def run(self) -> None:
        try:
            while True:
                self._serve_requests()
                if self.stopping:
                    break
                gate = self._publish_gate()
                queued = start_order(self.journal.queued()) if gate == "idle" else []
                if queued:
                    self._execute(queued[0])
                    continue
                self._wake.wait(1.0)
                self._wake.clear()
        except Exception as error:
            # The journal itself failed (a full disk, a broken database): stop rather than go on
            # blind. The daemon exits non-zero; the next start settles the run as `interrupted`.
            self.crashed = error
            log.critical("the runner stopped on an error it cannot record: %r", error, exc_info=True)
        finally:
            self._serve_requests(refuse="the daemon is stopping")
            with self._lock:
                for run_log in self._logs.values():
                    run_log.close()
                self._logs.clear()

    def _serve_requests(self, refuse: str | None = None) -> None:
        while True:
            try:
                action, future = self._requests.get_nowait()
            except queue.Empty:
                return
            if refuse is not None:
                future.set_exception(ControlRefused(refuse))
                continue
            try:
                future.set_result(action())
            except Exception as error:  # handed to the caller, who reports it
                future.set_exception(error)

    # -- one run -----------------------------------------------------------
    def _protected_runs(self, current: int) -> frozenset[int]:
        protected = {current, *(run.id for run in self.journal.blocking())}
        last = self.journal.last_with_outcome("succeeded")
        if last is not None:
            protected.add(last.id)
        return frozenset(protected)

    def _execute(self, run: Run) -> None:
        model = RunModel(self.config, dict(run.facts), self.steps)
        build_machine(model)
        self.journal.update_run(run.id, started=run.started or self.now(), error=None)
        model.start()  # type: ignore[attr-defined]
        while model.state in STEPS:
            step = model.state
            error = self._run_step(run, model, step)
            if error is None:
                if self.stopping and step in CHANGE_STEPS:
                    self._finish(
                        run,
                        model,
                        "interrupt",
                        f"the daemon was stopped (SIGTERM); it stopped at a safe point after {step}",
                    )
                    return
                model.advance()  # type: ignore[attr-defined]
                continue
            if isinstance(error, StepAborted) and error.resumable and step in PRE_CHANGE_STEPS:
                model.requeue()  # type: ignore[attr-defined]
                self.journal.update_run(run.id, step="queued", step_started=None, step_deadline=None, progress=None)
                self.event(
                    run.id,
                    step,
                    "the daemon is stopping: nothing was changed; the run resumes from validate when it starts again",
                )
                return
            message = str(error)
            if step in PRE_CHANGE_STEPS:
                fault = "site" if isinstance(error, SiteFault) else "archive"
                fault = "name" if isinstance(error, ArchiveMisnamed) else fault
                self._finish(run, model, "reject", message, fault=fault)
            elif isinstance(error, StepAborted):
                self._finish(run, model, "interrupt", message)
            elif step in ROLLBACK_AFTER and self.config.policy.on_failure == "rollback":
                self.journal.update_run(run.id, error=message)
                model.roll_back()  # type: ignore[attr-defined]
                self._roll_back(run, model, cause=message)
            else:
                if step in ROLLBACK_AFTER:
                    message += " (policy on_failure: hold; the platform is left as it is for inspection)"
                self._finish(run, model, "fail", message)
            return
        self._finish(run, model, None, None)

    def _expected_downtime(self) -> float:
        """What the last comparable runs (those that had a downtime) say this one's will be: the longest."""
        downtimes = [
            float(run.facts["downtime_seconds"])
            for run in self.journal.runs(limit=200)
            if run.outcome == "succeeded" and run.facts.get("downtime_seconds") is not None
        ]
        return max(downtimes[:COMPARABLE_RUNS], default=0.0)

    def _run_step(self, run: Run, model: RunModel, step: str) -> StepFailed | None:
        if step == "window":
            model.facts["expected_downtime_seconds"] = self._expected_downtime()
        limit = self.config.policy.timeouts.limit(step)
        started = self.now()
        deadline = started + limit if limit > 0 else None
        ctx = StepContext(
            run_id=run.id,
            step=step,
            archive=Path(run.path),
            archive_name=run.archive,
            sha256=run.sha256 or "",
            config=self.config,
            facts=model.facts,
            reporter=self,
            cancel=CancelToken(),
            deadline=deadline,
            now=self.now,
            protected_runs=self._protected_runs(run.id),
        )
        with self._lock:
            self._ctx = ctx
        if self.stopping and step in PRE_CHANGE_STEPS:
            ctx.cancel.cancel("the daemon is stopping; the run resumes when it starts again", resumable=True)
        self._progress_written.pop(run.id, None)
        self.journal.update_run(
            run.id, step=step, step_started=started, step_deadline=deadline, progress=None, progress_message=None
        )
        limit_text = f" (time limit {format_duration(limit)})" if limit > 0 else ""
        self.event(run.id, step, f"{step} started{limit_text}")
        self._publish_gate()  # busy from the first step on; _finish publishes what follows the outcome
        current = self.journal.run(run.id) or run
        self.observers.step_started(current, step, started, deadline)
        error: StepFailed | None = None
        try:
            if step == CHANGE_STEPS[0]:
                self._release_staged(ctx)
            run_step(self.steps[step], ctx)  # a BACKGROUND step on its own lowered thread
        except StepFailed as failure:
            error = failure
        except Exception as unexpected:
            self.log(run.id, traceback.format_exc().rstrip())
            fault = site_fault(unexpected, doing=step, run_id=run.id) if step in PRE_CHANGE_STEPS else None
            error = fault or StepFailed(f"{step}: unexpected error: {unexpected!r}")
        finally:
            with self._lock:
                self._ctx = None
        finished = self.now()
        result = "ok" if error is None else _result_of(error)
        self.journal.update_run(run.id, facts=model.facts)
        self.journal.add_step_timing(run.id, step, started, finished, result)
        if error is None:
            self.event(run.id, step, f"{step} done in {finished - started:.1f}s")
        else:
            self.event(run.id, step, f"{step} {result}: {error}")
        current = self.journal.run(run.id) or run
        self.observers.step_finished(current, step, result, finished - started)
        return error

    def _release_staged(self, ctx: StepContext) -> None:
        """The run leaves the pre-change steps: its staged release moves under releases/ (states/validate.py)."""
        release: Callable[[StepContext], None] | None = getattr(self.steps["validate"], "release_staged", None)
        if release is not None:
            release(ctx)

    def _roll_back(self, run: Run, model: RunModel, cause: str) -> bool:
        blocker = rollback_blocker(self.journal)
        if blocker is not None:
            self._finish(run, model, "fail", f"{cause}; ROLLBACK NOT STARTED: {blocker}")
            return False
        error = self._run_step(run, model, "rollback")
        if error is None:
            self._finish(run, model, "restored", cause)
            return True
        loud = f"{cause}; ROLLBACK FAILED: {error} (the snapshot is untouched; restore by hand, then resolve)"
        if isinstance(error, StepAborted):
            again = f"{cause}; ROLLBACK INTERRUPTED: {error}; run `dropgate rollback {run.id}` again"
            self._finish(run, model, "interrupt", again)
        else:
            self._finish(run, model, "fail", loud)
        return False

    def _finish(
        self, run: Run, model: RunModel, trigger: str | None, error: str | None, *, fault: str | None = None
    ) -> None:
        if trigger is not None:
            getattr(model, trigger)()
        outcome = model.state
        fields: dict[str, Any] = {
            "outcome": outcome,
            "finished": self.now(),
            "step_deadline": None,
            "error": error,
            "facts": model.facts,
        }
        if outcome == "rejected":
            fields["fault"] = fault
            fields["path"] = str(set_aside(run, self.state_dir, error or "rejected"))
            discard_staged_release(self.steps["validate"], self.config.platform.root, run.id, model.facts, self.event)
        self.journal.update_run(run.id, **fields)
        if outcome == "succeeded":
            prune_archives(self.journal, self.state_dir, self.config.platform.keep_releases, self.event)
        summary = f"outcome: {outcome}" + (f" — {error}" if error else "")
        if outcome in ("failed", "rolled_back", "interrupted"):
            summary += f"; the gate is blocked until `dropgate resolve {run.id} --note ...`"
        self.event(run.id, outcome, summary)
        finished = self.journal.run(run.id)
        if finished is not None:
            self.observers.run_finished(finished)
        self._publish_gate()

    # -- start-up ----------------------------------------------------------
    def recover(self) -> None:
        """Settle what a previous daemon left: resume pre-change runs (their approval void), mark later ones
        interrupted (see `pipeline.recovery`)."""
        settle_runs(self.journal, self.observers, self.event, self.now)


def _result_of(error: StepFailed) -> str:
    if isinstance(error, StepAborted):
        return "stopped" if error.resumable else "interrupted"
    return "failed"
