"""What the operator reads: `status`, `history`, `show`, and `/status.json`.

Everything comes from the journal (and a look at the inbox, the lock and the
heartbeat), so it works the same whether the daemon is up, down or frozen,
and says which. Whatever this user may not read (the inbox is the upload
group's) is reported as such under `unreadable`. Names and reasons are
printed through `printable`: they come from uploaders and archives.

These commands start without the configuration schema (see quickconfig) and
without the daemon's libraries: keep imports here light.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.changes import describe_changes
from pipeline.errors import DropgateError, JournalDamaged, JournalMissing, NotAllowed
from pipeline.heartbeat import STALE_SECONDS, last_beat
from pipeline.journal import Journal, Run, check_header
from pipeline.quickconfig import QuickConfig, config_path, load_quick
from pipeline.release import installed_version
from pipeline.runlog import tail
from pipeline.terminal import printable

if TYPE_CHECKING:
    from pipeline.quickconfig import SiteConfig

LOCK_NAME = "dropgate.lock"
JOURNAL_NAME = "journal.db"


def daemon_pid(state: Path) -> int | None:
    """The pid of the daemon holding the state folder's lock, or None when no daemon runs."""
    lock = state / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def open_journal(config: SiteConfig) -> Journal | None:
    """The journal, read-only; a missing or empty one is JournalMissing: without it the gate is unknown, not idle."""
    state = config.paths.state
    if os.path.isdir(state) and not os.access(state, os.R_OK | os.X_OK):
        raise NotAllowed(
            f"cannot read the state folder {state}: permission denied "
            f"(the read-only commands are for root and group {config.control.admin_group})"
        )
    path = state / JOURNAL_NAME
    try:
        empty = path.stat().st_size == 0
    except FileNotFoundError:
        empty = True
    if empty:
        from pipeline.evidence import missing_message

        raise JournalMissing(missing_message(config))
    check_header(path)
    journal = Journal(path, readonly=True)
    try:
        journal.check_tables()
    except JournalDamaged:
        journal.close()
        raise
    # No runs: idle only if the site shows none either (the daemon's own rule at its start). While a daemon
    # runs it has passed that check, and a file it is placing for a run not yet committed is no evidence.
    if daemon_pid(state) is None and not journal.runs(limit=1):
        from pipeline.evidence import memory_problem, what_to_do

        problem = memory_problem(config)
        if problem is not None:
            journal.close()
            raise JournalMissing(f"{problem}: the gate's state is unknown (not idle); {what_to_do(path)}")
    return journal


def describe_change(run: Run) -> str:
    if run.outcome == "rolled_back":
        return "changed, then restored by the rollback (release, data and services as before the run)"
    return describe_changes(run.platform_changed, run.facts)


def run_view(run: Run) -> dict[str, Any]:
    view = run.to_json()
    view["platform"] = describe_change(run)
    return view


def daemon_liveness(state: Path, now: float) -> dict[str, Any]:
    """Whether a daemon holds the lock, and whether its main loop still beats (a frozen one does not)."""
    pid = daemon_pid(state)
    beat = last_beat(state)
    age = max(0.0, now - beat) if beat is not None else None
    responding = None if pid is None or age is None else age <= STALE_SECONDS
    return {"running": pid is not None, "pid": pid, "heartbeat": beat, "heartbeat_age": age, "responding": responding}


def list_uploads(config: SiteConfig, unreadable: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Files in the inbox that are shorter than they announce (uploads in progress).

    Each entry is opened once, as the daemon does (`pipeline.inbox.files`: no link
    followed, no FIFO waited on). An inbox this user may not list (it belongs to the
    upload group) is noted in `unreadable`, not raised: the rest of the status is
    still worth reading.
    """
    inbox = config.paths.inbox
    if os.path.isdir(inbox) and not os.access(inbox, os.R_OK | os.X_OK):
        unreadable.append({"what": "inbox", "path": str(inbox), "error": "permission denied"})
        return []
    from pipeline.inbox.files import list_uploads as uploads_in

    return uploads_in(config)


def list_screening(config: SiteConfig, unreadable: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Files taken from the inbox and still being screened (`state/intake/<arrival>-<inode>.<n>/<name>`).

    Neither in the inbox any more nor a run yet: in a flood, hundreds may wait here for
    their hash and repeat check, and `status` must not lose sight of them. Oldest first.
    """
    intake = config.paths.state / "intake"
    found: list[dict[str, Any]] = []
    try:
        tokens = [entry for entry in os.scandir(intake) if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    except PermissionError:
        unreadable.append({"what": "intake", "path": str(intake), "error": "permission denied"})
        return []
    for token in tokens:
        with contextlib.suppress(OSError, ValueError):  # screened and gone meanwhile, or not one of ours
            names = os.listdir(token.path)
            arrived = int(token.name.split("-", 1)[0]) / 1e9
            found += [{"name": name, "arrived": arrived} for name in names]
    return sorted(found, key=lambda item: (item["arrived"], item["name"]))


def list_recording(config: SiteConfig, above: int) -> list[dict[str, Any]]:
    """Files that left `intake/` for their run's place (`spool/<id>/<name>`, `rejected/<id>-<name>`) in a run the
    journal has not committed yet: ids above `above`, the last run id read after the intake was listed.

    The intake moves a file to its place inside the transaction that records its run (a run never exists
    without its file); for the instant of the commit the file is neither being screened nor a run, and in a
    flood on a busy disk that instant is long enough for `status` to miss it. Listed with the moment it moved.
    """
    state = config.paths.state
    found: list[dict[str, Any]] = []
    with contextlib.suppress(OSError):
        for folder in os.scandir(state / "spool"):
            if folder.name.isdigit() and int(folder.name) > above:
                with contextlib.suppress(OSError):
                    for entry in os.scandir(folder.path):
                        found.append({"name": entry.name, "arrived": entry.stat(follow_symlinks=False).st_ctime,
                                      "run": int(folder.name)})
    with contextlib.suppress(OSError):
        for entry in os.scandir(state / "rejected"):
            number, dash, name = entry.name.partition("-")
            if dash and number.isdigit() and int(number) > above and not name.endswith(".reason"):
                with contextlib.suppress(OSError):
                    found.append({"name": name, "arrived": entry.stat(follow_symlinks=False).st_ctime,
                                  "run": int(number)})
    return found


def _installed(config: SiteConfig, unreadable: list[dict[str, str]]) -> str | None:
    root = config.platform.root
    version = installed_version(root)
    if version is None:
        try:
            os.lstat(root / "current")
        except PermissionError:
            unreadable.append({"what": "platform", "path": str(root), "error": "permission denied"})
        except OSError:
            pass
    return version


def _log_tail(config: SiteConfig, run_id: int, lines: int, unreadable: list[dict[str, str]]) -> list[str]:
    path = config.paths.state / "runs" / f"{run_id}.log"
    try:
        return tail(path, lines)
    except PermissionError:
        unreadable.append({"what": "run log", "path": str(path), "error": "permission denied"})
        return []


def status_dict(
    config: SiteConfig,
    journal: Journal | None,
    *,
    now: Callable[[], float] = time.time,
    uploads: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The `status --json` structure (SPEC section 7), plus the daemon's liveness.

    `uploads`: the daemon's own view of the uploads in progress; without it the inbox is looked at.
    """
    from pipeline.inbox.order import start_order

    moment = now()
    unreadable: list[dict[str, str]] = []
    result: dict[str, Any] = {
        "gate": "idle",
        "daemon": daemon_liveness(config.paths.state, moment),
        "run": None,
        "queued": [],
        "uploading": list_uploads(config, unreadable) if uploads is None else list(uploads),
        "screening": list_screening(config, unreadable),
        "installed_version": _installed(config, unreadable),
        "blocked_by": [],
        "inbox": str(config.paths.inbox),  # where to drop an archive (deploy/ansible/rollout.yml does)
        "now": moment,
        "unreadable": unreadable,
    }
    result.update(_unattended(config, journal, moment, running=result["daemon"]["running"]))
    if journal is None:
        return result
    committed = journal.last_run_id()  # read after the intake was listed, before the runs are
    result["gate"] = journal.gate()
    active = journal.unfinished()
    blocking = journal.blocking()
    current = active[0] if active else (blocking[-1] if blocking else None)
    if current is None:
        recent = journal.runs(limit=1)
        current = recent[0] if recent else None
    if current is not None:
        view = run_view(current)
        view["events"] = [{"ts": e.ts, "step": e.step, "message": e.message} for e in journal.events(current.id)[-8:]]
        view["notes"] = (current.facts.get("manifest") or {}).get("notes")
        view["steps"] = journal.step_timings(current.id)
        view["log_tail"] = _log_tail(config, current.id, 20, unreadable)
        deadline = current.step_deadline if current.active else None
        view["overdue"] = deadline is not None and moment > deadline
        view["overdue_seconds"] = moment - deadline if deadline is not None and moment > deadline else None
        result["run"] = view
    result["queued"] = [
        {"id": r.id, "archive": r.archive, "arrived": r.arrived, "notes": journal.fetched_notes(r.sha256 or "")}
        for r in start_order(journal.queued())
    ]
    result["blocked_by"] = [{"id": r.id, "outcome": r.outcome, "error": r.error} for r in blocking]
    queued_ids = {item["id"] for item in result["queued"]}
    recording = [item for item in list_recording(config, committed) if item["run"] not in queued_ids]
    result["screening"] = sorted(result["screening"] + recording, key=lambda item: (item["arrived"], item["name"]))
    return result


def _unattended(config: SiteConfig, journal: Journal | None, now: float, *, running: bool) -> dict[str, Any]:
    """The nightly job and the maintenance windows, for `status` and the page."""
    from pipeline.autoupdate import schedule_now, view
    from pipeline.schedule import describe_windows

    return {
        "auto_update": view(config, journal, now=schedule_now(), running=running),
        "window": describe_windows(config.policy, now) if config.policy.windows else None,
    }


def release_notes(config: SiteConfig, journal: Journal, run: Run) -> str | None:
    """A run's release notes: from its validated manifest, the feed it was fetched from, or its signed head."""
    manifest = run.facts.get("manifest")
    if manifest:
        return str(manifest.get("notes") or "")
    notes = journal.fetched_notes(run.sha256) if run.sha256 else None
    if notes is not None or run.outcome is not None:
        return notes
    from pipeline.archive import authenticate
    from pipeline.signing import load_trusted_keys

    try:
        return authenticate(Path(run.path), load_trusted_keys(config.trust.keys)).notes
    except DropgateError:
        return None  # not authenticated yet: nothing of it is shown


def _window_lines(window: dict[str, Any] | None, config: SiteConfig) -> list[str]:
    if window is None:
        return []
    from pipeline.schedule import local_text, zone

    tz = zone(config.policy.timezone)
    if window["open"]:
        state = f"open until {local_text(window['closes'], tz)}"
    elif window["next_open"] is not None:
        state = f"closed; the next opens {local_text(window['next_open'], tz)}"
    else:
        state = "closed; none opens within a week"
    spec = ", ".join(window["windows"])
    return [f"windows:   {spec} ({window['timezone']}, for {window['windows_for']} updates): {state}"]


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _red(text: str, color: bool) -> str:
    return f"\x1b[1;31m{text}\x1b[0m" if color else text


def _daemon_line(daemon: dict[str, Any], color: bool) -> str:
    if not daemon["running"]:
        return _red("NOT RUNNING", color)
    if daemon.get("responding") is False:
        beat = time.strftime("%H:%M:%S", time.localtime(daemon["heartbeat"]))
        return _red(f"NOT RESPONDING for {_ago(daemon['heartbeat_age'])}", color) + (
            f" (pid {daemon['pid']}: frozen or overloaded; its main loop last beat at {beat})"
        )
    return f"running (pid {daemon['pid']})"


def render_status(status: dict[str, Any], config: SiteConfig | None = None, *, color: bool = False) -> str:
    """`status` as text; every name and reason escaped, what is wrong in red when `color`.

    With `config`, also the maintenance windows and the nightly job (in their time zones).
    """
    p = printable
    lines = []
    daemon = status["daemon"]
    lines.append(f"gate:      {status['gate']}    daemon: {_daemon_line(daemon, color)}")
    lines.append(f"installed: {p(status['installed_version'] or '(none)')}")
    run = status["run"]
    if run is not None:
        versions = f"{p(run['from_version'] or '?')} → {p(run['to_version'] or '?')}"
        state = run["outcome"] or f"in {run['step']}"
        lines.append(f"run {run['id']}:    {p(run['archive'])} ({versions}) {state}")
        if run["outcome"] is None and run["step"] != "queued":
            since = status["now"] - (run["step_started"] or status["now"])
            progress = "" if run["progress"] is None else f", {run['progress'] * 100:.0f}%"
            message = f" ({p(run['progress_message'])})" if run["progress_message"] else ""
            deadline = ""
            if run.get("overdue"):
                deadline = ", " + _red(f"OVERDUE by {_ago(run['overdue_seconds'])}", color)
                deadline += f" (its time limit passed at {_when(run['step_deadline'])})"
            elif run["step_deadline"]:
                deadline = f", time limit in {_ago(run['step_deadline'] - status['now'])}"
            lines.append(f"  step:    {run['step']} for {_ago(since)}{progress}{message}{deadline}")
            if not daemon["running"]:
                lines.append(
                    "  WARNING: no daemon is running: this run is not progressing (it is settled at the next start)"
                )
            elif daemon.get("responding") is False:
                lines.append("  WARNING: the daemon is not responding: this run is not progressing")
        lines.append(f"  platform: {run['platform']}" + (", maintenance ON" if run["maintenance"] else ""))
        if run["downtime"] is not None:
            lines.append(f"  downtime: {'yes' if run['downtime'] else 'no'} ({p(run['downtime_reason'])})")
        if run["error"]:
            lines.append(f"  error:   {p(run['error'])}")
    for blocker in status["blocked_by"]:
        lines.append(
            f"BLOCKED by run {blocker['id']} ({blocker['outcome']}): after repair, "
            f"`dropgate resolve {blocker['id']} --note ...` (or `dropgate rollback {blocker['id']}` first)"
        )
    for upload in status["uploading"]:
        lines.append(f"uploading: {p(upload['name'])} {upload['bytes']} of {upload['total']} bytes")
    screening = status.get("screening", [])
    if screening:
        first = screening[0]
        more = f" and {len(screening) - 1} more" if len(screening) > 1 else ""
        lines.append(
            f"screening: {p(first['name'])}{more} (taken from the inbox since {_when(first['arrived'])}; "
            "hashed and checked before they become runs)"
        )
    for queued in status["queued"]:
        lines.append(f"queued:    run {queued['id']} {p(queued['archive'])} (since {_when(queued['arrived'])})")
    for part in status.get("unreadable", []):
        lines.append(f"not shown: {part['what']} {p(part['path'])}: {part['error']} for this user")
    if config is not None:
        from pipeline.autoupdate import render
        from pipeline.schedule import zone

        lines += _window_lines(status.get("window"), config)
        lines += [p(line) for line in render(status["auto_update"], zone(config.auto_update.timezone))]
    return "\n".join(lines)


def _color(stream: Any) -> bool:
    """Red for what is wrong, on a terminal that wants it (https://no-color.org)."""
    return bool(stream.isatty()) and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def _load(args: argparse.Namespace) -> QuickConfig:
    return load_quick(config_path(args.config))


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    while True:
        journal = open_journal(config)
        try:
            status = status_dict(config, journal)
        finally:
            if journal is not None:
                journal.close()
        if args.json:
            print(json.dumps(status, indent=2, default=str))
        elif args.watch:
            sys.stdout.write("\x1b[H\x1b[2J" + render_status(status, config, color=_color(sys.stdout)) + "\n")
            sys.stdout.flush()
        else:
            print(render_status(status, config, color=_color(sys.stdout)))
        if not args.watch:
            return 0
        time.sleep(args.interval)


def cmd_history(args: argparse.Namespace) -> int:
    config = _load(args)
    journal = open_journal(config)
    runs = journal.runs(limit=args.limit) if journal is not None else []
    if args.json:
        print(json.dumps([run_view(run) for run in runs], indent=2, default=str))
        return 0
    if not runs:
        print("no runs yet")
        return 0
    print(f"{'id':>5}  {'arrived':19}  {'archive':32}  {'versions':20}  outcome")
    for run in runs:
        versions = printable(f"{run.from_version or '?'} → {run.to_version or '?'}") if run.to_version else "-"
        outcome = run.outcome or f"({run.step})"
        if run.blocking:
            outcome += " BLOCKING"
        print(f"{run.id:>5}  {_when(run.arrived):19}  {printable(run.archive)[:32]:32}  {versions:20}  {outcome}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    config = _load(args)
    journal = open_journal(config)
    run = journal.run(args.id) if journal is not None else None
    if journal is None or run is None:
        raise DropgateError(f"there is no run {args.id}")
    events = journal.events(run.id)
    timings = journal.step_timings(run.id)
    log_path = config.paths.state / "runs" / f"{run.id}.log"
    notes = release_notes(config, journal, run)
    if args.json:
        view = run_view(run)
        view["notes"] = notes
        view["events"] = [{"ts": e.ts, "step": e.step, "message": e.message} for e in events]
        view["steps"] = timings
        view["facts"] = run.facts
        if args.log:
            unreadable: list[dict[str, str]] = []
            view["log"] = _log_tail(config, run.id, args.lines, unreadable)
            view["unreadable"] = unreadable
        print(json.dumps(view, indent=2, default=str))
        return 0
    p = printable
    versions = f"{p(run.from_version or '?')} → {p(run.to_version or '?')}"
    print(f"run {run.id}: {p(run.archive)} ({versions})")
    print(f"  sha256:   {run.sha256 or '-'}")
    print(f"  outcome:  {run.outcome or 'in ' + run.step}" + ("  (blocks the gate)" if run.blocking else ""))
    print(f"  platform: {describe_change(run)}")
    if run.error:
        print(f"  error:    {p(run.error)}")
    if run.resolved:
        print(f"  resolved: {_when(run.resolved)}: {p(run.resolved_note)}")
    print(f"  archive:  {p(run.path)}")
    if notes is not None:
        print("release notes:")
        for line in notes.splitlines() or ["(none)"]:
            print(f"  {p(line)}")
    print("events:")
    for event in events:
        print(f"  {_when(event.ts)}  {event.step:12} {p(event.message)}")
    if args.log:
        denied: list[dict[str, str]] = []
        lines = _log_tail(config, run.id, args.lines, denied)
        print(f"log ({p(log_path)}):" if not denied else f"log ({p(log_path)}): permission denied for this user")
        for line in lines:
            print(f"  {p(line)}")
    return 0
