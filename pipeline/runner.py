"""The runner: one run at a time through the `transitions` machine, and the gate.

The machine is the order of SPEC section 1: queued → validate → prereq →
[approval] → [window] → backup → [maintenance] → apply → verify → succeeded,
with `rejected` before backup, `failed`/`interrupted` from backup on, and the
`rollback` state between a failure (or an operator's command) and
`rolled_back`. Each step is `states.<step>.run(ctx)`; the runner owns time
limits, the journal records and the failure paths; observers only watch.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import queue
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from types import ModuleType
from typing import Any

from transitions import Machine

from pipeline.changes import rollback_done
from pipeline.config import STEPS, Config, format_duration
from pipeline.context import StepContext
from pipeline.errors import ArchiveMisnamed, ControlRefused, SiteFault, StepAborted, StepFailed
from pipeline.faults import site_fault
from pipeline.inbox.order import start_order
from pipeline.journal import OUTCOMES, Journal, Run
from pipeline.observers import Observers
from pipeline.priority import run_step
from pipeline.process import CancelToken
from pipeline.recovery import ADVICE, PRE_CHANGE_STEPS, rollback_blocker, settle_runs
from pipeline.release import current_release
from pipeline.runlog import RunLog

log = logging.getLogger("dropgate")

CHANGE_STEPS = ("backup", "maintenance", "apply", "verify")
OPTIONAL_STEPS = ("approval", "window", "maintenance")
ROLLBACK_AFTER = ("maintenance", "apply", "verify")
ROLLBACK_OF_OUTCOMES = ("failed", "interrupted", "succeeded")
MACHINE_STATES = ("queued", *STEPS, "rollback", *OUTCOMES)
PROGRESS_WRITE_INTERVAL = 0.5
COMPARABLE_RUNS = 3


def machine_transitions() -> list[dict[str, Any]]:
    """The machine's transitions; optional steps are entered only when their condition holds."""
    transitions: list[dict[str, Any]] = [{"trigger": "start", "source": "queued", "dest": "validate"}]
    for index, step in enumerate(STEPS):
        for later in STEPS[index + 1 :]:
            if later in OPTIONAL_STEPS:
                transitions.append(
                    {"trigger": "advance", "source": step, "dest": later, "conditions": f"needs_{later}"}
                )
                continue
            transitions.append({"trigger": "advance", "source": step, "dest": later})
            break
        else:
            transitions.append({"trigger": "advance", "source": step, "dest": "succeeded"})
    transitions += [
        {"trigger": "reject", "source": list(PRE_CHANGE_STEPS), "dest": "rejected"},
        {"trigger": "requeue", "source": list(PRE_CHANGE_STEPS), "dest": "queued"},
        {"trigger": "fail", "source": [*CHANGE_STEPS, "rollback"], "dest": "failed"},
        {"trigger": "interrupt", "source": [*CHANGE_STEPS, "rollback"], "dest": "interrupted"},
        {"trigger": "roll_back", "source": [*ROLLBACK_AFTER, *ROLLBACK_OF_OUTCOMES], "dest": "rollback"},
        {"trigger": "restored", "source": "rollback", "dest": "rolled_back"},
    ]
    return transitions


class RunModel:
    """The object the machine moves; its conditions ask the optional steps."""

    state: str

    def __init__(self, config: Config, facts: dict[str, Any], steps: Mapping[str, ModuleType]) -> None:
        self.config = config
        self.facts = facts
        self._steps = steps

    def _required(self, step: str) -> bool:
        required: Callable[[Config, dict[str, Any]], bool] | None = getattr(self._steps[step], "required", None)
        return True if required is None else bool(required(self.config, self.facts))

    def needs_approval(self) -> bool:
        return self._required("approval")

    def needs_window(self) -> bool:
        return self._required("window")

    def needs_maintenance(self) -> bool:
        return self._required("maintenance")


def build_machine(model: Any, initial: str = "queued") -> Machine:
    return Machine(
        model=model,
        states=list(MACHINE_STATES),
        transitions=machine_transitions(),
        initial=initial,
        auto_transitions=False,
    )


def mermaid() -> str:
    """The machine as a Mermaid state diagram, generated from the machine itself."""
    from transitions.extensions import GraphMachine

    class _Model:
        def needs_approval(self) -> bool:
            return True

        def needs_window(self) -> bool:
            return True

        def needs_maintenance(self) -> bool:
            return True

    model = _Model()
    GraphMachine(
        model=model,
        states=list(MACHINE_STATES),
        transitions=machine_transitions(),
        initial="queued",
        auto_transitions=False,
        graph_engine="mermaid",
        show_conditions=True,
        title="dropgate run",
    )
    text: str = model.get_graph().draw(None)  # type: ignore[attr-defined]
    return text


def cmd_graph(args: argparse.Namespace) -> int:
    print(mermaid())
    return 0


def load_steps() -> dict[str, ModuleType]:
    """`states.<step>` for every step, and `states.rollback`."""
    return {name: importlib.import_module(f"states.{name}") for name in (*STEPS, "rollback")}


class Runner(threading.Thread):
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
            fields["path"] = str(self._set_aside(run, error or "rejected"))
            self._discard_staged_release(run.id, model.facts)
        self.journal.update_run(run.id, **fields)
        if outcome == "succeeded":
            self._prune_archives()
        summary = f"outcome: {outcome}" + (f" — {error}" if error else "")
        if outcome in ("failed", "rolled_back", "interrupted"):
            summary += f"; the gate is blocked until `dropgate resolve {run.id} --note ...`"
        self.event(run.id, outcome, summary)
        finished = self.journal.run(run.id)
        if finished is not None:
            self.observers.run_finished(finished)
        self._publish_gate()

    def _discard_staged_release(self, run_id: int, facts: dict[str, Any]) -> None:
        """A rejected run leaves no trace among the releases: remove what its validate staged."""
        discard: Callable[[Path, dict[str, Any]], Path | None] | None = getattr(
            self.steps["validate"], "discard_staged", None
        )
        if discard is not None and discard(self.config.platform.root, facts) is not None:
            self.event(run_id, "rejected", "removed the staged release (never made live)")
        staged = facts.get("release_dir")
        if not staged:
            return
        staged_path = Path(staged)
        if staged_path == current_release(self.config.platform.root) or not staged_path.is_dir():
            return
        shutil.rmtree(staged_path, ignore_errors=True)
        facts.pop("release_dir", None)
        self.event(run_id, "rejected", f"removed the staged release {staged_path.name} (never made live)")

    def _prune_archives(self) -> None:
        """Keep the archives of as many succeeded runs as releases are kept; older ones go.

        Only archives that were installed successfully are ever removed: rejected
        and failed ones stay (they are evidence, and `retry` needs them).
        """
        succeeded = [run for run in self.journal.runs(limit=1000) if run.outcome == "succeeded"]
        for old in succeeded[self.config.platform.keep_releases :]:
            folder = self.state_dir / "spool" / str(old.id)
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
                self.event(old.id, "succeeded", f"archive removed from {folder} (its release is no longer kept)")

    def _set_aside(self, run: Run, reason: str) -> Path:
        """Move a rejected archive to `<state>/rejected/` with a `.reason` file beside it."""
        source = Path(run.path)
        target = self.state_dir / "rejected" / f"{run.id}-{run.archive}"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            return source
        target.with_name(target.name + ".reason").write_text(reason + "\n", encoding="utf-8")
        with contextlib.suppress(OSError):
            source.parent.rmdir()
        return target

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

    # -- start-up ----------------------------------------------------------
    def recover(self) -> None:
        """Settle what a previous daemon left: resume pre-change runs (their approval void), mark later ones
        interrupted (see `pipeline.recovery`)."""
        settle_runs(self.journal, self.observers, self.event, self.now)


def _result_of(error: StepFailed) -> str:
    if isinstance(error, StepAborted):
        return "stopped" if error.resumable else "interrupted"
    return "failed"
