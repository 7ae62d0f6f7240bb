"""What the operator reads: `status`, `history`, `show`, and `/status.json`.

Everything comes from the journal (and a look at the inbox and the lock), so
it works the same whether the daemon is up or down, and says which.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Config, config_path, load_config
from pipeline.errors import DropgateError
from pipeline.journal import Journal, Run
from pipeline.release import installed_version
from pipeline.runlog import tail

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


def open_journal(config: Config) -> Journal | None:
    path = config.paths.state / JOURNAL_NAME
    if not path.exists():
        return None
    return Journal(path, readonly=True)


def describe_change(run: Run) -> str:
    if run.platform_changed:
        return "changed — rollback restores release and backup"
    return "untouched"


def run_view(run: Run) -> dict[str, Any]:
    view = run.to_json()
    view["platform"] = describe_change(run)
    return view


def status_dict(config: Config, journal: Journal | None, *, now: Callable[[], float] = time.time) -> dict[str, Any]:
    """The `status --json` structure (SPEC section 7), plus the daemon's liveness."""
    from pipeline.inbox import list_uploads

    pid = daemon_pid(config.paths.state)
    result: dict[str, Any] = {
        "gate": "idle",
        "daemon": {"running": pid is not None, "pid": pid},
        "run": None,
        "queued": [],
        "uploading": list_uploads(config),
        "installed_version": installed_version(config.platform.root),
        "blocked_by": [],
        "now": now(),
    }
    result.update(_unattended(config, journal, result["now"], running=pid is not None))
    if journal is None:
        return result
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
        view["log_tail"] = tail(config.paths.state / "runs" / f"{current.id}.log", 20)
        result["run"] = view
    result["queued"] = [
        {"id": r.id, "archive": r.archive, "arrived": r.arrived, "notes": journal.fetched_notes(r.sha256 or "")}
        for r in journal.queued()
    ]
    result["blocked_by"] = [{"id": r.id, "outcome": r.outcome, "error": r.error} for r in blocking]
    return result


def _unattended(config: Config, journal: Journal | None, now: float, *, running: bool) -> dict[str, Any]:
    """The nightly job and the maintenance windows, for `status` and the page."""
    from pipeline.autoupdate import view
    from states.window import describe

    return {
        "auto_update": view(config, journal, now=now, running=running),
        "window": describe(config, now) if config.policy.windows else None,
    }


def release_notes(config: Config, journal: Journal, run: Run) -> str | None:
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


def _window_lines(window: dict[str, Any] | None, config: Config) -> list[str]:
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


def render_status(status: dict[str, Any], config: Config | None = None) -> str:
    lines = []
    daemon = status["daemon"]
    alive = f"running (pid {daemon['pid']})" if daemon["running"] else "NOT RUNNING"
    lines.append(f"gate:      {status['gate']}    daemon: {alive}")
    lines.append(f"installed: {status['installed_version'] or '(none)'}")
    run = status["run"]
    if run is not None:
        versions = f"{run['from_version'] or '?'} → {run['to_version'] or '?'}"
        state = run["outcome"] or f"in {run['step']}"
        lines.append(f"run {run['id']}:    {run['archive']} ({versions}) {state}")
        if run["outcome"] is None and run["step"] != "queued":
            since = status["now"] - (run["step_started"] or status["now"])
            progress = "" if run["progress"] is None else f", {run['progress'] * 100:.0f}%"
            message = f" ({run['progress_message']})" if run["progress_message"] else ""
            deadline = f", time limit in {_ago(run['step_deadline'] - status['now'])}" if run["step_deadline"] else ""
            lines.append(f"  step:    {run['step']} for {_ago(since)}{progress}{message}{deadline}")
            if not daemon["running"]:
                lines.append(
                    "  WARNING: no daemon is running: this run is not progressing (it is settled at the next start)"
                )
        lines.append(f"  platform: {run['platform']}" + (", maintenance ON" if run["maintenance"] else ""))
        if run["downtime"] is not None:
            lines.append(f"  downtime: {'yes' if run['downtime'] else 'no'} ({run['downtime_reason']})")
        if run["error"]:
            lines.append(f"  error:   {run['error']}")
    for blocker in status["blocked_by"]:
        lines.append(
            f"BLOCKED by run {blocker['id']} ({blocker['outcome']}): after repair, "
            f"`dropgate resolve {blocker['id']} --note ...` (or `dropgate rollback {blocker['id']}` first)"
        )
    for upload in status["uploading"]:
        lines.append(f"uploading: {upload['name']} {upload['bytes']} of {upload['total']} bytes")
    for queued in status["queued"]:
        lines.append(f"queued:    run {queued['id']} {queued['archive']} (since {_when(queued['arrived'])})")
    if config is not None:
        from pipeline.autoupdate import render
        from pipeline.schedule import zone

        lines += _window_lines(status.get("window"), config)
        lines += render(status["auto_update"], zone(config.auto_update.timezone))
    return "\n".join(lines)


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


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
            sys.stdout.write("\x1b[H\x1b[2J" + render_status(status, config) + "\n")
            sys.stdout.flush()
        else:
            print(render_status(status, config))
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
        versions = f"{run.from_version or '?'} → {run.to_version or '?'}" if run.to_version else "-"
        outcome = run.outcome or f"({run.step})"
        if run.blocking:
            outcome += " BLOCKING"
        print(f"{run.id:>5}  {_when(run.arrived):19}  {run.archive[:32]:32}  {versions:20}  {outcome}")
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
            view["log"] = tail(log_path, args.lines)
        print(json.dumps(view, indent=2, default=str))
        return 0
    versions = f"{run.from_version or '?'} → {run.to_version or '?'}"
    print(f"run {run.id}: {run.archive} ({versions})")
    print(f"  sha256:   {run.sha256 or '-'}")
    print(f"  outcome:  {run.outcome or 'in ' + run.step}" + ("  (blocks the gate)" if run.blocking else ""))
    print(f"  platform: {describe_change(run)}")
    if run.error:
        print(f"  error:    {run.error}")
    if run.resolved:
        print(f"  resolved: {_when(run.resolved)}: {run.resolved_note}")
    print(f"  archive:  {run.path}")
    if notes is not None:
        print("release notes:")
        for line in notes.splitlines() or ["(none)"]:
            printable = "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in line)
            print(f"  {printable}")
    print("events:")
    for event in events:
        print(f"  {_when(event.ts)}  {event.step:12} {event.message}")
    if args.log:
        print(f"log ({log_path}):")
        for line in tail(log_path, args.lines):
            print(f"  {line}")
    return 0
