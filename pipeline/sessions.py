"""Process sessions on Linux, identified for sure and ended as a whole.

Every command dropgate starts leads its own session (its pid is the session
id). What identifies it beyond the daemon's life is the triple (pid, start time
in clock ticks since boot, boot id): a recycled pid has another start time, and
after a reboot nothing of it can be left. While any member of a session lives,
the kernel keeps its id allocated, so a process whose session id is a dead
leader's pid is that leader's survivor, never a stranger's.

Signals are sent through a pidfd opened before the process is checked again,
so a pid recycled between the check and the signal is never hit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TERM_GRACE_SECONDS = 5.0
KILL_WAIT_SECONDS = 5.0
_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    session: int
    group: int
    start_ticks: int
    state: str

    @property
    def dead(self) -> bool:
        """A zombie (or a process being torn down) runs nothing any more."""
        return self.state in ("Z", "X", "x")


def boot_id() -> str:
    """This boot of the machine (a recorded process from another boot is gone)."""
    try:
        return (PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return ""


def process_info(pid: int) -> ProcessInfo | None:
    """The identity of `pid` from /proc/<pid>/stat, or None when there is no such process."""
    try:
        fd = os.open(f"{PROC}/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)
    except OSError:  # it ended between the open and the read
        return None
    finally:
        os.close(fd)
    # The command name is in parentheses and may itself hold spaces or ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return ProcessInfo(
            pid=pid,
            state=fields[0].decode("ascii", "replace"),
            group=int(fields[2]),
            session=int(fields[3]),
            start_ticks=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def start_ticks(pid: int) -> int | None:
    info = process_info(pid)
    return info.start_ticks if info is not None else None


def session_members(session: int) -> list[ProcessInfo]:
    """The living processes of `session` (never this process)."""
    me = os.getpid()
    members = []
    for name in os.listdir(PROC):
        if not name.isdigit() or int(name) == me:
            continue
        info = process_info(int(name))
        if info is not None and info.session == session and not info.dead:
            members.append(info)
    return members


def survivors(pid: int, ticks: int, boot: str) -> list[ProcessInfo]:
    """The living members of the session that the process (`pid`, `ticks`, `boot`) led.

    Empty when the machine rebooted since, or when the pid now belongs to
    another process (the number was free again, so nothing of the session lived).
    """
    if boot != boot_id():
        return []
    leader = process_info(pid)
    if leader is not None and leader.start_ticks != ticks:
        return []
    return session_members(pid)


@dataclass(frozen=True)
class CommandRecord:
    """What finds a command again after the daemon's death: kept in the journal while it runs."""

    token: str
    label: str
    command: str
    pid: int
    start_ticks: int
    boot_id: str
    started: float
    run_id: int | None = None

    def survivors(self) -> list[ProcessInfo]:
        """What still lives of the command's session."""
        return survivors(self.pid, self.start_ticks, self.boot_id)


def _signal(member: ProcessInfo, sig: int) -> None:
    """Send `sig` to exactly the process `member` describes, if it still lives."""
    try:
        fd = os.pidfd_open(member.pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfd on this kernel: check, then signal by pid
        again = process_info(member.pid)
        if again is not None and again.start_ticks == member.start_ticks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member.pid, sig)
        return
    try:
        again = process_info(member.pid)
        if again is not None and again.start_ticks == member.start_ticks and again.session == member.session:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Ending:
    """How `end_session` went: how many processes it signalled, whether SIGKILL was needed, what lives on."""

    processes: int
    killed: bool
    left: list[ProcessInfo]


def end_session(
    find: Callable[[], list[ProcessInfo]],
    *,
    grace_seconds: float = TERM_GRACE_SECONDS,
    reap: Callable[[], object] | None = None,
) -> Ending:
    """SIGTERM every process `find` returns, SIGKILL what is left after `grace_seconds`.

    `find` is asked again on every round, so children forked meanwhile are
    caught too; `reap` (the leader's `wait`, when it is our child) is called
    between rounds. What still lives after the KILL is returned (normally nothing).
    """
    seen: set[tuple[int, int]] = set()
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, KILL_WAIT_SECONDS)):
        deadline = time.monotonic() + wait
        sent: set[tuple[int, int]] = set()
        while True:
            if reap is not None:
                reap()
            members = find()
            if not members:
                return Ending(len(seen), sig == signal.SIGKILL, [])
            for member in members:
                key = (member.pid, member.start_ticks)
                if key not in sent:
                    _signal(member, sig)
                    sent.add(key)
                    seen.add(key)
            if time.monotonic() >= deadline:
                break
            time.sleep(_POLL_SECONDS)
    if reap is not None:
        reap()
    return Ending(len(seen), True, find())
