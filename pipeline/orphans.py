"""Commands an earlier daemon left running: found at start-up, ended, recorded.

Every command is in the journal's `commands` table while it runs (see
`pipeline.process`). A record still there at start-up belongs to a daemon that
died without seeing its command end. Before anything else happens (before runs
are settled or resumed, before the inbox or the control socket start), what
lives of each such command's session is ended (SIGTERM, SIGKILL after a grace)
and the run's events say which command, its pid, how long it had run and what
became of it. A command that cannot be ended keeps its record, and no rollback
starts while it lives (`living_commands`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.journal import Journal
from pipeline.runlog import RunLog
from pipeline.sessions import TERM_GRACE_SECONDS, CommandRecord, end_session

log = logging.getLogger("dropgate")

STEP = "restart"  # the step name these events carry in a run's history


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _clock(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def describe(record: CommandRecord) -> str:
    return f"{record.label} (pid {record.pid}, session {record.pid}, `{record.command}`)"


def end_orphan(record: CommandRecord, *, grace_seconds: float, now: Callable[[], float]) -> tuple[str, bool]:
    """End what lives of `record`'s session; the event text, and whether it is gone now."""
    ran = _duration(now() - record.started)
    since = f"started {_clock(record.started)}"
    if not record.survivors():
        return (
            f"{describe(record)} was running when the previous daemon stopped ({since}); "
            "it was no longer running at this start (it ended, or the service manager ended it)",
            True,
        )
    ending = end_session(record.survivors, grace_seconds=grace_seconds)
    how = f"SIGKILL after {grace_seconds:g}s of SIGTERM" if ending.killed else "SIGTERM"
    count = f"{ending.processes} process{'es' if ending.processes != 1 else ''}"
    if ending.left:
        pids = ", ".join(str(member.pid) for member in ending.left)
        return (
            f"{describe(record)}, left running by the previous daemon ({since}, {ran} ago), could NOT be killed "
            f"(still running: pid {pids}); no rollback starts while it runs",
            False,
        )
    return (
        f"killed {describe(record)}, left running by the previous daemon: it had run {ran} ({since}); "
        f"{count} ended by {how}",
        True,
    )


def sweep_orphans(
    journal: Journal,
    runs_dir: Path,
    *,
    grace_seconds: float = TERM_GRACE_SECONDS,
    now: Callable[[], float] = time.time,
) -> list[str]:
    """End every command an earlier daemon left running; record each in its run's events. The messages."""
    messages = []
    for record in journal.commands():
        message, gone = end_orphan(record, grace_seconds=grace_seconds, now=now)
        messages.append(message)
        log.warning("start-up: %s", message)
        if record.run_id is not None and journal.run(record.run_id) is not None:
            journal.add_event(record.run_id, STEP, message)
            run_log = RunLog(runs_dir / f"{record.run_id}.log")
            try:
                run_log.write(f"{STEP}: {message}")
            finally:
                run_log.close()
        if gone:
            journal.command_ended(record.token)
    return messages


def living_commands(journal: Journal) -> list[CommandRecord]:
    """Recorded commands whose session still lives (asked on the runner's thread, where no command of
    this daemon is running at that moment: so these are survivors of an earlier one)."""
    return [record for record in journal.commands() if record.survivors()]
