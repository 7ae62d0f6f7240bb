"""The one place dropgate runs subprocesses.

Each command runs in its own session (so its whole process group can be killed),
with the run's context in its environment, its output streamed line by line to
the run log, an optional progress pipe (`DROPGATE_PROGRESS_FD`), and a deadline
and a cancel token that end it: SIGTERM to the group, then SIGKILL after a grace.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pipeline.config import CommandSpec
from pipeline.errors import CommandFailed, StepAborted, StepTimeout

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
    """SIGTERM the whole process group, SIGKILL it after `grace_seconds`."""
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; make sure nothing else of its group lingers.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        return


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
    grace_seconds: float = 5.0,
    now: Callable[[], float] = time.time,
) -> CommandResult:
    """Run `cmd` to completion, its deadline (wall-clock epoch seconds) or its cancellation.

    Raises CommandFailed on a non-zero exit (when `check`), StepTimeout past the
    deadline and StepAborted when cancelled; in both of the latter the command's
    whole process group has been killed first.
    """
    spec = as_spec(cmd)
    label = what or spec.describe()
    prefix = f"[{label}] " if what else ""
    argv: list[str] = ["/bin/sh", "-c", spec.shell] if spec.shell is not None else list(spec.argv)
    full_env = dict(os.environ)
    full_env.update(env or {})
    pass_fds: tuple[int, ...] = ()
    progress_read = progress_write = -1
    if on_progress is not None:
        progress_read, progress_write = os.pipe()
        full_env["DROPGATE_PROGRESS_FD"] = str(progress_write)
        pass_fds = (progress_write,)
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL  # noqa: SIM115
    stdout_file = open(stdout_path, "wb") if stdout_path else None  # noqa: SIM115
    started = now()
    log(f"{prefix}$ {spec.describe()}")
    try:
        proc = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout_file if stdout_file is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=full_env,
            pass_fds=pass_fds,
            start_new_session=True,
        )
    except OSError as error:
        raise CommandFailed(f"{label}: cannot start {argv[0]!r}: {error.strerror}") from error
    finally:
        if progress_write >= 0:
            os.close(progress_write)
        if stdin_path:
            stdin.close()  # type: ignore[union-attr]
        if stdout_file is not None:
            stdout_file.close()
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
        for pump in pumps:
            pump.join(timeout=1.0)  # a backgrounded grandchild may keep a pipe open
    seconds = now() - started
    log(f"{prefix}exit {proc.returncode} after {seconds:.1f}s")
    if check and proc.returncode != 0:
        reason = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        raise CommandFailed(f"{label} failed with {reason}")
    return CommandResult(proc.returncode, seconds)
