"""The one place dropgate runs subprocesses.

Each command runs in its own session (so all of it can be killed), with the
run's context in its environment, its output streamed line by line to the run
log, an optional progress pipe (`DROPGATE_PROGRESS_FD`), and a deadline and a
cancel token that end it: SIGTERM to the session, then SIGKILL after a grace.

Every command is findable after the daemon's death: the child is started held
at a gate (a tiny `sh` waiting on a pipe), its identity (pid = session id,
start time, boot id) is recorded durably in the daemon's ledger (the journal),
and only then is it let go to `exec` the command. If the daemon dies before,
the pipe closes and nothing runs. The record is cleared when the command ends;
what a command leaves running in its session when it exits is ended with it,
except for the commands that start the platform's services.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from pipeline.config import CommandSpec
from pipeline.errors import CommandFailed, StepAborted, StepTimeout
from pipeline.sessions import CommandRecord, boot_id, end_session, session_members, start_ticks

LogLine = Callable[[str], None]
Progress = Callable[[float, "str | None"], None]


@dataclass
class CancelToken:
    """Set from outside to stop whatever a step is doing; `resumable` says the run may resume."""

    event: threading.Event = field(default_factory=threading.Event)
    reason: str = ""
    resumable: bool = False

    def cancel(self, reason: str, *, resumable: bool = False) -> None:
        self.reason = reason
        self.resumable = resumable
        self.event.set()

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True if cancelled meanwhile."""
        return self.event.wait(max(0.0, seconds))


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    seconds: float


class CommandLedger(Protocol):
    """Where a command is recorded before it runs and cleared when it ends (the journal)."""

    def command_started(self, record: CommandRecord) -> None: ...

    def command_ended(self, token: str) -> None: ...


_ledger: list[CommandLedger] = []  # the one ledger of this process, when the daemon installed it

# The gate reads "go" on its standard input (a pipe from the daemon), then becomes the command
# with its real standard input, the file named by $1. A closed pipe without "go": exit, run nothing.
_GATE = 'IFS= read -r go && [ "$go" = go ] || exit 125; input=$1; shift; exec "$@" <"$input"'


def record_commands_in(ledger: CommandLedger | None) -> None:
    """Record every command started from now on in `ledger` (the daemon's journal); None: stop recording."""
    _ledger[:] = [] if ledger is None else [ledger]


def as_spec(cmd: CommandSpec | Sequence[str]) -> CommandSpec:
    return cmd if isinstance(cmd, CommandSpec) else CommandSpec(argv=tuple(cmd))


def _pump_lines(stream: IO[bytes], emit: LogLine, prefix: str) -> None:
    for raw in iter(stream.readline, b""):
        emit(prefix + raw.decode("utf-8", "replace").rstrip("\n"))
    stream.close()


def _pump_progress(fd: int, on_progress: Progress, emit: LogLine, prefix: str) -> None:
    with os.fdopen(fd, "rb") as stream:
        for raw in stream:
            try:
                report = json.loads(raw)
                ratio = float(report["progress"])
            except (ValueError, KeyError, TypeError):
                emit(f'{prefix}ignored a progress line that is not {{"progress": 0..1}}: {raw[:200]!r}')
                continue
            message = report.get("message")
            on_progress(min(1.0, max(0.0, ratio)), str(message) if message is not None else None)


def _exit_waiter(proc: subprocess.Popen[bytes]) -> Callable[[float | None], bool]:
    """A function waiting up to N seconds for `proc` to exit, returning the moment it does (True, reaped).

    Linux 5.3+: the process's pidfd is polled, so the wait ends as the command ends
    (Popen.wait with a timeout sleeps in steps of up to 50 ms). Called with None it
    closes the pidfd. Elsewhere it falls back to Popen.wait.
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):

        def fallback(seconds: float | None) -> bool:
            if seconds is None:
                return proc.returncode is not None
            try:
                proc.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                return False
            return True

        return fallback
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)

    def wait(seconds: float | None) -> bool:
        nonlocal pidfd
        if seconds is None:
            if pidfd >= 0:
                os.close(pidfd)
                pidfd = -1
            return proc.returncode is not None
        if pidfd >= 0 and not poller.poll(seconds * 1000):
            return False
        proc.wait()
        return True

    return wait


def kill_group(pgid: int, grace_seconds: float, proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the command's whole session (its leader `pgid` and all it started), SIGKILL it after `grace_seconds`."""
    end_session(lambda: session_members(pgid), grace_seconds=grace_seconds, reap=proc.poll)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


def _cannot_start(program: str, path: str | None, cwd: Path | None) -> str | None:
    """Why `program` cannot be executed (the reason exec would give), or None."""
    if "/" in program:
        candidate = Path(program) if cwd is None else Path(cwd, program)
        if not candidate.exists():
            return os.strerror(errno.ENOENT)
        if candidate.is_dir() or not os.access(candidate, os.X_OK):
            return os.strerror(errno.EACCES)
        return None
    return None if shutil.which(program, path=path) else os.strerror(errno.ENOENT)


def _identify(proc: subprocess.Popen[bytes], label: str, spec: CommandSpec, env: Mapping[str, str]) -> CommandRecord:
    run_id = env.get("DROPGATE_RUN_ID", "")
    return CommandRecord(
        token=uuid.uuid4().hex,
        label=label,
        command=spec.describe(),
        pid=proc.pid,
        start_ticks=start_ticks(proc.pid) or 0,
        boot_id=boot_id(),
        started=time.time(),
        run_id=int(run_id) if run_id.isdigit() else None,
    )


def _end_leftovers(proc: subprocess.Popen[bytes], grace_seconds: float, log: LogLine, prefix: str) -> None:
    """End what a finished command left running in its session (it could change the platform later)."""
    left = session_members(proc.pid)
    if not left:
        return
    pids = ", ".join(str(member.pid) for member in left[:5]) + (", ..." if len(left) > 5 else "")
    log(f"{prefix}ended {len(left)} process{'es' if len(left) != 1 else ''} it left running (pid {pids})")
    end_session(lambda: session_members(proc.pid), grace_seconds=grace_seconds)


def _forget(ledger: CommandLedger, record: CommandRecord, log: LogLine, prefix: str) -> None:
    """Clear the record; if that fails, the next start-up finds the command ended and says so."""
    try:
        ledger.command_ended(record.token)
    except Exception as error:  # the original outcome of the command matters more
        log(f"{prefix}could not clear the record of the ended command: {error}")


def run_command(
    cmd: CommandSpec | Sequence[str],
    *,
    log: LogLine,
    what: str = "",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    deadline: float | None = None,
    cancel: CancelToken | None = None,
    on_progress: Progress | None = None,
    stdin_path: Path | None = None,
    stdout_path: Path | None = None,
    check: bool = True,
    starts_services: bool = False,
    grace_seconds: float = 5.0,
    now: Callable[[], float] = time.time,
) -> CommandResult:
    """Run `cmd` to completion, its deadline (wall-clock epoch seconds) or its cancellation.

    Raises CommandFailed on a non-zero exit (when `check`), StepTimeout past the
    deadline and StepAborted when cancelled; in both of the latter the command's
    whole session has been killed first. What the command leaves running in its
    session when it exits is ended too, unless `starts_services` (then that is
    the platform it started).
    """
    spec = as_spec(cmd)
    label = what or spec.describe()
    prefix = f"[{label}] " if what else ""
    argv: list[str] = ["/bin/sh", "-c", spec.shell] if spec.shell is not None else list(spec.argv)
    full_env = dict(os.environ)
    full_env.update(env or {})
    if stdin_path is not None:
        with open(stdin_path, "rb"):  # fail here, not in the child, when it cannot be read
            pass
    pass_fds: tuple[int, ...] = ()
    progress_read = progress_write = -1
    if on_progress is not None:
        progress_read, progress_write = os.pipe()
        full_env["DROPGATE_PROGRESS_FD"] = str(progress_write)
        pass_fds = (progress_write,)
    problem = _cannot_start(argv[0], full_env.get("PATH", os.defpath), cwd)
    if problem is not None:
        if progress_write >= 0:
            os.close(progress_read)
            os.close(progress_write)
        raise CommandFailed(f"{label}: cannot start {argv[0]!r}: {problem}")
    gate_read, gate_write = os.pipe()
    stdout_file = open(stdout_path, "wb") if stdout_path else None  # noqa: SIM115
    started = now()
    log(f"{prefix}$ {spec.describe()}")
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", _GATE, "dropgate-gate", str(stdin_path or os.devnull), *argv],
            stdin=gate_read,
            stdout=stdout_file if stdout_file is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=full_env,
            pass_fds=pass_fds,
            start_new_session=True,
        )
    except OSError as error:
        os.close(gate_write)
        if progress_read >= 0:
            os.close(progress_read)
        raise CommandFailed(f"{label}: cannot start {argv[0]!r}: {error.strerror}") from error
    finally:
        os.close(gate_read)
        if progress_write >= 0:
            os.close(progress_write)
        if stdout_file is not None:
            stdout_file.close()
    ledger = _ledger[0] if _ledger else None
    record: CommandRecord | None = None
    try:
        if ledger is not None:
            record = _identify(proc, label, spec, full_env)
            ledger.command_started(record)
        with contextlib.suppress(BrokenPipeError):
            os.write(gate_write, b"go\n")
    except BaseException:
        os.close(gate_write)  # the gate closes unopened: the command never runs
        proc.communicate()
        if progress_read >= 0:
            os.close(progress_read)
        if ledger is not None and record is not None:
            _forget(ledger, record, log, prefix)
        raise
    os.close(gate_write)
    pumps = []
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            pumps.append(threading.Thread(target=_pump_lines, args=(stream, log, prefix), daemon=True))
    if on_progress is not None:
        pumps.append(
            threading.Thread(target=_pump_progress, args=(progress_read, on_progress, log, prefix), daemon=True)
        )
    for pump in pumps:
        pump.start()
    exited = _exit_waiter(proc)
    try:
        while True:
            if exited(0.1):
                break
            if cancel is not None and cancel.cancelled:
                kill_group(proc.pid, grace_seconds, proc)
                log(f"{prefix}killed (process group {proc.pid}): {cancel.reason}")
                raise StepAborted(f"{label} was stopped: {cancel.reason}", resumable=cancel.resumable)
            if deadline is not None and now() >= deadline:
                kill_group(proc.pid, grace_seconds, proc)
                log(f"{prefix}killed (process group {proc.pid}) at the step's time limit")
                raise StepTimeout(f"{label} was still running at the step's time limit and was killed")
    finally:
        exited(None)  # releases what the waiter holds
        if proc.returncode is None:
            kill_group(proc.pid, 0.5, proc)
        if not starts_services:
            _end_leftovers(proc, grace_seconds, log, prefix)
        for pump in pumps:
            pump.join(timeout=1.0)  # a backgrounded grandchild may keep a pipe open
        if ledger is not None and record is not None:
            _forget(ledger, record, log, prefix)
    seconds = now() - started
    log(f"{prefix}exit {proc.returncode} after {seconds:.1f}s")
    if check and proc.returncode != 0:
        reason = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        raise CommandFailed(f"{label} failed with {reason}")
    return CommandResult(proc.returncode, seconds)
