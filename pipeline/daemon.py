"""`dropgate run`: the daemon in the foreground.

Start-up: validate the config, take the state folder's lock, settle what a
previous daemon left (resume or mark `interrupted`), then start the control
socket, the status/metrics listener, the inbox and the runner, and tell
systemd READY=1. The main loop beats the heartbeat (metric, `WATCHDOG=1`,
`STATUS=`) until the runner stops. First SIGTERM: stop at a safe point;
second: abort the current step.
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
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry

from pipeline.autoupdate import AutoUpdater, schedule_clock
from pipeline.config import Config, config_path, load_config
from pipeline.control import ControlServer
from pipeline.errors import AlreadyRunning, ConfigError, ControlRefused
from pipeline.http import StatusServer
from pipeline.inbox import Inbox
from pipeline.journal import Journal
from pipeline.metrics import Metrics, write_textfile
from pipeline.observers import Observers
from pipeline.release import installed_version
from pipeline.report import JOURNAL_NAME, LOCK_NAME, run_view, status_dict
from pipeline.runner import Runner
from states.window import next_window_open

log = logging.getLogger("dropgate")

MAIN_LOOP_SECONDS = 1.0


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
    def __init__(self, config: Config) -> None:
        self.config = config
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

    def run(self) -> int:
        config = self.config
        check_paths(config)
        with state_lock(config.paths.state):
            journal = Journal(config.paths.state / JOURNAL_NAME)
            registry = CollectorRegistry()
            metrics = Metrics(registry)
            observers = Observers([metrics])
            self.runner = Runner(config, journal, observers)
            self.runner.recover()
            metrics.load(journal, installed_version(config.platform.root))
            inbox = Inbox(config, journal, observers, on_taken=lambda _run_id: self.runner.wake())
            self.updater = AutoUpdater(config, journal, metrics, clock=schedule_clock())

            def status() -> dict[str, Any]:
                reader = Journal(config.paths.state / JOURNAL_NAME, readonly=True)
                try:
                    return status_dict(config, reader)
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
            control = ControlServer(config, self._control)
            control.bind()
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            http.start()
            control.start()
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
                control.stop()
                self.runner.join()
                self.updater.join(timeout=10)
                http.stop()
                if config.metrics.textfile is not None:
                    write_textfile(registry, config.metrics.textfile)
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
        while self.runner.is_alive():
            now = time.time()
            metrics.heartbeat.set(now)
            metrics.set_platform_version(installed_version(self.config.platform.root))
            metrics.window_next_open.set(next_window_open(self.config, now))
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
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("transitions").setLevel(logging.WARNING)
    config = load_config(config_path(args.config))
    try:
        return Daemon(config).run()
    except AlreadyRunning as error:
        print(f"dropgate: {error}", file=sys.stderr)
        return 2
