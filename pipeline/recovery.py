"""What a restart settles, and what a rollback waits for.

At start-up (after `pipeline.orphans` ended what an earlier daemon left
running), runs without an outcome are settled: one caught before `backup`
changed nothing and resumes from `validate`; one caught later is recorded
`interrupted`, with exactly what it had changed (`pipeline.changes`) and what
`dropgate rollback` would do. A restart is never an approval: an approval
given before it is void, recorded as such, and the run waits for
`dropgate approve` again.

A rollback (automatic or the operator's) never starts while a command of an
earlier daemon still runs: it could change the platform after the restore.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from pipeline.changes import restart_summary, rollback_plan
from pipeline.journal import Journal, Run
from pipeline.observers import Observers
from pipeline.orphans import describe, living_commands

PRE_CHANGE_STEPS = ("validate", "prereq", "approval", "window")
ADVICE = " Next: "  # what the restart message says to do follows this; the rest is what happened


class Events(Protocol):
    def __call__(self, run_id: int, step: str, message: str) -> None: ...


def _clock(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def void_approval(journal: Journal, run: Run, event: Events) -> None:
    """A restart is not an approval: forget the one given before it, and say so."""
    if "approved_at" not in run.facts:
        return
    facts = dict(run.facts)
    approved_at = float(facts.pop("approved_at") or 0.0)
    approved_by = facts.pop("approved_by", None) or "an operator"
    journal.update_run(run.id, facts=facts)
    event(
        run.id,
        "approval",
        f"the approval by {approved_by} at {_clock(approved_at)} is void: the daemon restarted before the run "
        f"got past its pre-change steps; it waits for `dropgate approve {run.id}` again",
    )


def settle_runs(journal: Journal, observers: Observers, event: Events, now: Callable[[], float]) -> None:
    """Settle what a previous daemon left: resume pre-change runs, mark later ones interrupted."""
    for run in journal.unfinished():
        if run.step in PRE_CHANGE_STEPS:
            journal.update_run(run.id, step="queued", step_started=None, step_deadline=None, progress=None)
            event(
                run.id,
                run.step,
                f"the daemon restarted during {run.step}; nothing on the platform was changed, "
                "the run resumes from validate",
            )
            continue
        changed = restart_summary(run.platform_changed, run.facts)
        maintenance = "; maintenance is still ON" if run.maintenance else ""
        if run.platform_changed:
            todo = (
                f"inspect, then `dropgate rollback {run.id}` ({rollback_plan(run.facts)}) "
                f"or `dropgate resolve {run.id} --note ...`"
            )
        else:
            todo = f"nothing to roll back; inspect, then `dropgate resolve {run.id} --note ...`"
        message = f"the daemon stopped during {run.step} ({changed}{maintenance}); nothing was re-run.{ADVICE}{todo}"
        journal.update_run(run.id, outcome="interrupted", finished=now(), step_deadline=None, error=message)
        event(run.id, "interrupted", message)
        finished = journal.run(run.id)
        if finished is not None:
            observers.run_finished(finished)
    for run in journal.queued():
        void_approval(journal, run, event)


def rollback_blocker(journal: Journal) -> str | None:
    """Why no rollback may start now (a command of an earlier daemon still runs), or None."""
    living = living_commands(journal)
    if not living:
        return None
    first = living[0]
    of_run = f" of run {first.run_id}" if first.run_id is not None else ""
    return (
        f"{describe(first)}{of_run}, started by an earlier daemon, is still running and could change the platform "
        f"after a restore: no rollback starts until it has ended (kill -KILL -- -{first.pid})"
    )
