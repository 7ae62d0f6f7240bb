"""The journal is the memory of the gate: no journal, no start, when the site shows earlier runs.

A missing or empty `journal.db` beside spooled archives, run logs, snapshots
or several releases means the journal was lost, not that nothing ever
happened: starting fresh would forget a blocked run and what it changed. The
daemon refuses (exit code `EXIT_NO_JOURNAL`), naming what it found, until the
journal is restored from backup or the operator starts afresh on purpose
(`dropgate run --fresh-journal NOTE`), which the new journal records.
A truly fresh state folder starts normally.
"""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError, JournalMissing
from pipeline.journal import Journal
from pipeline.journal.database import open_readonly

if TYPE_CHECKING:
    from pipeline.quickconfig import SiteConfig as Config

EXIT_NO_JOURNAL = 5
JOURNAL_NAME = "journal.db"
LOCK_NAME = "dropgate.lock"
FRESH_START = "fresh-journal"


def _entries(folder: Path, keep: Callable[[str], bool] | None = None) -> list[str]:
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    return [name for name in names if keep is None or keep(name)]


def _plural(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def _snapshot_name(name: str) -> bool:
    return name.isdigit() or (name.startswith(".") and name.endswith(".partial") and name[1:-8].isdigit())


def run_evidence(config: Config, *, first_may_be_uncommitted: bool = False) -> list[str]:
    """What in the state and backup folders shows that runs happened here (empty: nothing).

    `first_may_be_uncommitted` (a journal that holds no runs yet): the first run's file
    without its run is what a crash inside the transaction creating that run leaves (the
    file placed, the commit never made); the inbox screens it again at start-up, so it
    is no evidence of a lost run.
    """
    state = config.paths.state
    found = []
    first = "1" if first_may_be_uncommitted else None
    spooled = _entries(state / "spool", lambda name: name != first)
    if spooled:
        found.append(f"{_plural(len(spooled), 'spooled archive')} ({state / 'spool'})")
    rejected = _entries(
        state / "rejected", lambda name: not name.endswith(".reason") and name.partition("-")[0] != first
    )
    if rejected:
        found.append(f"{_plural(len(rejected), 'rejected archive')} ({state / 'rejected'})")
    logs = _entries(state / "runs", lambda name: name.endswith(".log"))
    if logs:
        found.append(f"{_plural(len(logs), 'run log')} ({state / 'runs'})")
    snapshots = _entries(config.paths.backups, _snapshot_name)
    if snapshots:
        found.append(f"{_plural(len(snapshots), 'snapshot')} ({config.paths.backups})")
    return found


def last_run_id(config: Config) -> int:
    """The highest run id the state and backup folders show (0: none), whatever the journal says."""
    state = config.paths.state
    ids = [int(name) for name in _entries(state / "spool") if name.isdigit()]
    ids += [int(name.partition("-")[0]) for name in _entries(state / "rejected") if name.partition("-")[0].isdigit()]
    ids += [int(name[:-4]) for name in _entries(state / "runs", lambda n: n.endswith(".log")) if name[:-4].isdigit()]
    ids += [int(name.strip(".").partition(".")[0]) for name in _entries(config.paths.backups, _snapshot_name)]
    return max(ids, default=0)


def site_evidence(config: Config) -> list[str]:
    """Run evidence, plus what only a daemon or an update leaves: the lock with a pid, a WAL, releases."""
    state = config.paths.state
    found = run_evidence(config)
    releases = _entries(config.platform.root / "releases", lambda name: not name.startswith("."))
    if len(releases) > 1:
        found.append(f"{len(releases)} releases ({config.platform.root / 'releases'})")
    for suffix in ("-wal", "-shm"):
        leftover = state / (JOURNAL_NAME + suffix)
        if leftover.exists():
            found.append(f"{leftover.name} (the journal's own write-ahead files, without the journal)")
            break
    try:
        holder = (state / LOCK_NAME).read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        holder = ""
    if holder:
        found.append(f"{LOCK_NAME} (a daemon ran here, last as pid {holder})")
    return found


def journal_state(path: Path) -> str:
    """`missing`, `empty` (0 bytes, or no runs table), `no runs`, or `ok`."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size == 0:
        return "empty"
    db = open_readonly(path)  # also for an admin who may not write the state folder
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "runs" not in tables:
            return "empty"
        if db.execute("SELECT 1 FROM runs LIMIT 1").fetchone() is not None:
            return "ok"
        if "gate_events" in tables and db.execute(
            "SELECT 1 FROM gate_events WHERE kind = ? LIMIT 1", (FRESH_START,)
        ).fetchone():
            return "ok"
        return "no runs"
    finally:
        db.close()


def what_to_do(path: Path) -> str:
    return (
        f"restore {path.name} (with {path.name}-wal if your backup has it) from the backup of {path.parent}, "
        'or, to start with an empty history on purpose, run `dropgate run --fresh-journal "WHY"` once '
        "(the decision is recorded in the new journal; see README, The journal)"
    )


def check_memory(config: Config) -> None:
    """Raise JournalMissing when the journal is missing or empty but the site shows earlier runs."""
    problem = memory_problem(config)
    if problem is not None:
        raise JournalMissing(problem + ". Without its journal the gate would forget a blocked run and what it "
                             "changed, so it does not start: " + what_to_do(config.paths.state / JOURNAL_NAME))


def memory_problem(config: Config) -> str | None:
    """What is wrong when the journal is missing, empty or holds no runs while the site shows earlier runs."""
    path = config.paths.state / JOURNAL_NAME
    state = journal_state(path)
    if state == "ok":
        return None
    if state in ("missing", "empty"):
        found = site_evidence(config)
    else:
        found = run_evidence(config, first_may_be_uncommitted=True)
    if not found:
        return None
    what = {"missing": "is missing", "empty": "is empty", "no runs": "holds no runs"}[state]
    return f"the journal {path} {what}, but this site shows earlier runs: {'; '.join(found)}"


def missing_message(config: Config) -> str:
    """What the read-only commands say when there is no journal to read."""
    path = config.paths.state / JOURNAL_NAME
    found = site_evidence(config)
    if found:
        return (
            f"the journal {path} is missing: the gate's state is unknown (not idle), "
            f"and this site shows earlier runs ({'; '.join(found)}): " + what_to_do(path)
        )
    return (
        f"the journal {path} is missing: the gate's state is unknown; "
        "if dropgate never ran here, start the daemon (it creates the journal)"
    )


def _operator() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


def refuse_to_replace(path: Path) -> None:
    """`--fresh-journal` is for a lost journal only: one that holds a journal is never replaced."""
    if journal_state(path) in ("ok", "no runs"):
        raise ConfigError(
            [
                f"--fresh-journal: {path} exists and holds a journal; it is never replaced "
                "(move it aside first if it really must be started afresh)"
            ]
        )


def start_afresh(config: Config, note: str) -> Journal:
    """Begin a new journal on purpose: set aside what is left of the old one, record who, when and why."""
    path = config.paths.state / JOURNAL_NAME
    refuse_to_replace(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = []
    for name in (JOURNAL_NAME, JOURNAL_NAME + "-wal", JOURNAL_NAME + "-shm"):
        leftover = path.with_name(name)
        if leftover.exists():
            target = leftover.with_name(f"{name}.before-fresh-{stamp}")
            leftover.rename(target)
            aside.append(target.name)
    journal = Journal(path)
    found = site_evidence(config)
    last = last_run_id(config)
    if last:
        journal.continue_ids_after(last)  # new runs never reuse an earlier run's spool folder, log or snapshot
    message = (
        f"journal started afresh by {_operator()} (pid {os.getpid()}): {note}"
        + (f"; earlier evidence on the site: {'; '.join(found)}" if found else "")
        + (f"; set aside: {', '.join(aside)}" if aside else "")
        + (f"; run ids continue after {last}, the highest found there" if last else "")
    )
    journal.add_gate_event(FRESH_START, message)
    return journal
