"""`dropgate run`: the daemon in the foreground.

Start-up: validate the config, refuse a damaged journal or a lost one (see
`pipeline.evidence`), take the state folder's lock, end the commands a
previous daemon left running (`pipeline.orphans`), settle what it left
(resume or mark `interrupted`), then start the control socket, the
status/metrics listener, the inbox and the runner, and tell systemd READY=1.
The main loop beats the heartbeat (metric, `WATCHDOG=1`, `STATUS=`) until
the runner stops. First SIGTERM: stop at a safe point; second: abort the
current step.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from pipeline.autoupdate import AutoUpdater, schedule_clock
from pipeline.config import Config, config_path
from pipeline.control import ControlServer
from pipeline.errors import AlreadyRunning, ConfigError, ControlRefused, JournalDamaged, JournalMissing
from pipeline.evidence import EXIT_NO_JOURNAL, check_memory, refuse_to_replace, start_afresh
from pipeline.heartbeat import beat
from pipeline.http import StatusServer
from pipeline.inbox import Inbox
from pipeline.journal import Journal, check_intact, check_runs
from pipeline.metrics import Metrics, write_textfile
from pipeline.observers import Observers
from pipeline.orphans import sweep_orphans
from pipeline.process import record_commands_in
from pipeline.quickconfig import validate
from pipeline.release import installed_version
from pipeline.report import JOURNAL_NAME, LOCK_NAME, run_view, status_dict
from pipeline.runner import MACHINE_STATES, Runner
from pipeline.schedule import next_window_open

if TYPE_CHECKING:
    from pipeline.console import ConsoleServer

log = logging.getLogger("dropgate")

MAIN_LOOP_SECONDS = 1.0
# Files the daemon creates (journal, run logs, spooled and rejected archives) are group-readable for
# the admin group (the state folder is setgid) and never world-readable, however it was started.
UMASK = 0o027


def notify(message: str) -> None:
    """Send a sd_notify(3) message when systemd asked for it (NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec, when it is set for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


@contextlib.contextmanager
def state_lock(state: Path) -> Iterator[None]:
    """One daemon per state folder: an exclusive flock holding the daemon's pid."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + 2.0  # a reader's brief shared lock (`status`) may hold it a moment
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                raise AlreadyRunning(
                    f"another dropgate daemon (pid {holder}) holds {path}; only one may run per state folder"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        yield
    finally:
        os.close(fd)


def check_paths(config: Config) -> None:
    """Cross-checks that need the filesystem: inbox and state must share one filesystem."""
    for path in (config.paths.inbox, config.paths.state):
        path.mkdir(parents=True, exist_ok=True)
    if os.stat(config.paths.inbox).st_dev != os.stat(config.paths.state).st_dev:
        raise ConfigError(
            [
                f"paths.inbox: {config.paths.inbox} must be on the same filesystem as paths.state "
                f"({config.paths.state}) so that taking a file is an atomic rename"
            ]
        )


class Daemon:
    def __init__(self, config: Config, *, fresh_journal: str | None = None) -> None:
        self.config = config
        self.fresh_journal = fresh_journal
        self._signals = 0
        self._stopped = threading.Event()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("signal %d: stopping at a safe point (send it again to abort the current step)", signum)
            notify("STOPPING=1\nSTATUS=stopping at a safe point")
            self.runner.request_stop()
        else:
            log.warning("signal %d again: aborting the current step", signum)
            self.runner.abort()

    def _control(self, request: dict[str, Any], who: str) -> str:
        command = request["command"]
        run_id = request.get("id")
        if command == "approve":
            return self.runner.approve(int(run_id), who)  # type: ignore[arg-type]
        if command == "retry":
            return self.runner.retry(int(run_id), who)  # type: ignore[arg-type]
        if command == "resolve":
            return self.runner.resolve(int(run_id), str(request.get("note") or ""), who)  # type: ignore[arg-type]
        if command == "rollback":
            return self.runner.rollback(None if run_id is None else int(run_id), who).result()
        if command == "reject":
            return self.runner.reject(int(run_id), str(request.get("note") or ""), who)  # type: ignore[arg-type]
        if command == "auto-update":
            enabled = request.get("enabled")
            if not isinstance(enabled, bool):
                raise ValueError('expected {"command": "auto-update", "enabled": true|false}')
            return self.updater.set_enabled(enabled, who)
        raise ControlRefused(f"unknown command {command!r}")

    def _console(self, status: Callable[[], dict[str, Any]]) -> ConsoleServer | None:
        """The browser console on `console.listen`, bound now (None when it is off)."""
        if self.config.console.listen is None:
            return None
        from pipeline.console import ConsoleServer

        console = ConsoleServer(self.config, self._control, status)
        console.bind()
        host, port = console.address
        log.info("console listening on %s://%s:%d/", "https" if self.config.console.tls else "http", host, port)
        return console

    def run(self) -> int:
        config = self.config
        check_paths(config)
        journal_path = config.paths.state / JOURNAL_NAME
        if check_intact(journal_path):
            check_runs(journal_path, MACHINE_STATES)
        if self.fresh_journal is None:
            check_memory(config)
        else:
            refuse_to_replace(journal_path)
        with state_lock(config.paths.state):
            beat(config.paths.state)  # `status` must not read a previous daemon's old heartbeat as ours
            if self.fresh_journal is not None:
                journal = start_afresh(config, self.fresh_journal)
                log.warning("%s", journal.gate_events()[-1]["message"])
            else:
                journal = Journal(journal_path)
            # First of all: every command from now on is recorded before it runs, and
            # what an earlier daemon left running is ended before anything else happens.
            record_commands_in(journal)
            sweep_orphans(journal, config.paths.state / "runs")
            registry = CollectorRegistry()
            metrics = Metrics(registry)
            observers = Observers([metrics])
            self.runner = Runner(config, journal, observers)
            self.runner.recover()
            metrics.load(journal, installed_version(config.platform.root))

            def taken(run_id: int) -> None:
                refused = journal.run(run_id)
                if refused is not None and refused.outcome is not None:  # refused at the inbox: an outcome too
                    observers.run_finished(refused)
                self.runner.wake()

            inbox = Inbox(config, journal, observers, on_taken=taken)
            inbox.recover()  # files a crash left between the inbox and their runs, before anything adds runs
            self.updater = AutoUpdater(config, journal, metrics, clock=schedule_clock())

            def status() -> dict[str, Any]:
                reader = Journal(config.paths.state / JOURNAL_NAME, readonly=True)
                try:
                    return status_dict(config, reader, uploads=inbox.uploading)
                finally:
                    reader.close()

            def history() -> list[dict[str, Any]]:
                reader = Journal(config.paths.state / JOURNAL_NAME, readonly=True)
                try:
                    return [run_view(run) for run in reader.runs(limit=30)]
                finally:
                    reader.close()

            metrics.heartbeat.set(time.time())  # a first scrape must not read 0 (a stale heartbeat)
            http = StatusServer(config, registry, status, history)
            console = self._console(status)
            control = ControlServer(config, self._control)
            control.bind()
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            http.start()
            control.start()
            if console is not None:
                console.start()
            inbox.start()
            self.runner.start()
            self.updater.start()
            host, port = http.address
            log.info("dropgate running: inbox %s, status page http://%s:%d/", config.paths.inbox, host, port)
            notify(f"READY=1\nSTATUS=gate {journal.gate()}")
            try:
                self._main_loop(journal, metrics, registry)
            finally:
                self.updater.stop()
                inbox.stop()
                if console is not None:
                    console.stop()
                control.stop()
                self.runner.join()
                self.updater.join(timeout=10)
                http.stop()
                if config.metrics.textfile is not None:
                    write_textfile(registry, config.metrics.textfile)
                record_commands_in(None)
                journal.close()
        if self.runner.crashed is not None:
            log.critical("dropgate stopped on an error: %s", self.runner.crashed)
            return 1
        log.info("dropgate stopped")
        return 0

    def _main_loop(self, journal: Journal, metrics: Metrics, registry: CollectorRegistry) -> None:
        interval = watchdog_interval()
        period = min(MAIN_LOOP_SECONDS, interval) if interval else MAIN_LOOP_SECONDS
        last_status = ""
        beat_failed = False
        while self.runner.is_alive():
            now = time.time()
            metrics.heartbeat.set(now)
            try:
                beat(self.config.paths.state)
                beat_failed = False
            except OSError as error:
                if not beat_failed:  # once, not every second
                    log.warning("heartbeat: cannot touch it in %s: %s", self.config.paths.state, error)
                beat_failed = True
            metrics.set_platform_version(installed_version(self.config.platform.root))
            metrics.window_next_open.set(next_window_open(self.config.policy, now))
            if interval:
                notify("WATCHDOG=1")
            gate = journal.gate()
            active = journal.unfinished()
            text = f"gate {gate}" + (f", run {active[0].id} in {active[0].step}" if active else "")
            if text != last_status:
                notify(f"STATUS={text}")
                last_status = text
            if self.config.metrics.textfile is not None:
                try:
                    write_textfile(registry, self.config.metrics.textfile)
                except OSError as error:
                    log.warning("metrics: cannot write %s: %s", self.config.metrics.textfile, error)
            self.runner.join(timeout=period)


def cmd_run(args: argparse.Namespace) -> int:
    os.umask(UMASK)  # the unit sets it too; started by hand, the shell's umask must not decide
    if getattr(args, "check", False):
        from pipeline.config import load_config

        path = config_path(args.config)
        load_config(path)  # a ConfigError names every problem (exit 2); nothing is started or written
        print(f"configuration OK: {path}")
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("transitions").setLevel(logging.WARNING)
    config = validate(config_path(args.config))  # and record it for the read-only commands
    fresh_journal = getattr(args, "fresh_journal", None)
    if fresh_journal is not None and not fresh_journal.strip():
        print("dropgate: --fresh-journal needs a note saying why the history starts again", file=sys.stderr)
        return 2
    try:
        return Daemon(config, fresh_journal=fresh_journal).run()
    except AlreadyRunning as error:
        print(f"dropgate: {error}", file=sys.stderr)
        return 2
    except JournalDamaged as error:
        print(
            f"dropgate: {error}. It was left exactly as it is and the daemon does not start: restore the journal "
            'from backup, or move it aside and start afresh on purpose with `dropgate run --fresh-journal "WHY"`',
            file=sys.stderr,
        )
        return EXIT_NO_JOURNAL
    except JournalMissing as error:
        print(f"dropgate: {error}", file=sys.stderr)
        return EXIT_NO_JOURNAL
