"""The watcher: notice what lands in the inbox, wait until an upload is complete, hand it to the intake.

Anything that appears in the inbox is a candidate: a file written there, moved
in (`mv` from another folder), a folder, a link. Watchdog events wake the
watcher at once; since events can be lost (an inotify queue overflow, which
triggers a rescan at once, or a restart), the folder is also listed whenever
its own change time moved, and in full every `inbox.rescan_seconds`.

A regular file is opened once (files.py) as soon as it is seen, within a
budget of descriptors; its name is checked on every look to still be that
inode (else it is a new candidate). It is taken once its size, mtime and
ctime held still for `inbox.settle_seconds`, it is not shorter than the length
its manifest announces (else it is an upload in progress, shown as
`uploading N of M bytes`), and no process has it open for writing (a read
lease: one fcntl, not a scan of the host's processes). Anything else (a link,
a FIFO, a folder) is moved aside, never opened, once it held still as long.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import resource
import stat as stat_module
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer as WatchdogObserver

from pipeline.config import Config, format_duration
from pipeline.inbox.files import (
    DIR_FLAGS,
    HEAD_BYTES,
    announced_length_of,
    is_ignored,
    open_entry,
    printable,
    read_head,
)
from pipeline.inbox.intake import Intake
from pipeline.inbox.order import name_key
from pipeline.journal import Journal
from pipeline.observers import Observers

log = logging.getLogger("dropgate")

POLL_SECONDS = 0.2
FRESH_NS = 1_000_000_000  # a folder changed this recently is listed again: two changes may share a timestamp
STOP_SECONDS = 3.0
WATCHDOG_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")


def descriptor_budget() -> int:
    """How many inbox files may be held open at once: a quarter of this process's file limit (16 to 1024)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(1024, soft // 4)) if soft != resource.RLIM_INFINITY else 1024


@dataclass
class Candidate:
    name: str
    order: int  # first seen
    seen: float
    dev: int
    ino: int
    kind: int
    size: int
    mtime_ns: int
    ctime_ns: int
    still_since: float
    fd: int | None = None
    announced: int | None = None
    head_size: int = -1  # the size when the head was last read
    error: str | None = None  # why it cannot be opened: it is refused once it holds still

    def same(self, info: os.stat_result) -> bool:
        return (self.dev, self.ino, self.kind) == (info.st_dev, info.st_ino, stat_module.S_IFMT(info.st_mode))


class _Hints(FileSystemEventHandler):
    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path:
                self.inbox.hint(os.fsdecode(path))


class _OverflowAlarm(logging.Handler):
    """Watchdog reports a lost-events overflow only in its log: turn that line into a rescan."""

    def __init__(self, inbox: Inbox) -> None:
        super().__init__(logging.WARNING)
        self.inbox = inbox

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.inbox.request_rescan()


class Inbox(threading.Thread):
    """Watches `paths.inbox` and turns complete uploads into queued runs (through the intake)."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        observers: Observers,
        on_taken: Callable[[int], None],
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name="dropgate-inbox", daemon=True)
        self.config = config
        self.dir = config.paths.inbox
        self.journal = journal
        self.observers = observers
        self.now = now
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._overflowed = threading.Event()
        self.intake = Intake(config, journal, on_published=on_taken, wake=self._wake.set, now=now)
        self._candidates: dict[str, Candidate] = {}
        self._hinted: set[str] = set()
        self._lock = threading.Lock()
        self._next_rescan = 0.0
        self._folder_seen: tuple[int, int] | None = None
        self._arrivals = itertools.count()
        self._batches = itertools.count(1)
        self._budget = descriptor_budget()
        self._budget_logged = False
        self._dir_fd = -1
        self._dev = -1
        self._recovered = False
        self._observer: Any = None
        self._alarm = _OverflowAlarm(self)
        self.uploading: list[dict[str, Any]] = []

    # -- events --------------------------------------------------------------
    def hint(self, path: str) -> None:
        name = os.path.basename(path)
        if os.path.dirname(path) != str(self.dir) or is_ignored(name, self.config.inbox.ignore):
            return
        with self._lock:
            self._hinted.add(name)
        self._wake.set()

    def request_rescan(self) -> None:
        """List the whole inbox at the next look (events were lost)."""
        self._overflowed.set()
        self._wake.set()

    # -- start and stop --------------------------------------------------------
    def recover(self) -> None:
        """Finish what a previous daemon left in the intake; call before anything else can add runs."""
        if self._recovered:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.intake.open()
        self.intake.recover()
        self._recovered = True

    def start(self) -> None:
        self.recover()
        self._dir_fd = os.open(self.dir, DIR_FLAGS)
        self._dev = os.fstat(self._dir_fd).st_dev
        for name in WATCHDOG_LOGGERS:
            logging.getLogger(name).addHandler(self._alarm)
        observer = WatchdogObserver()
        observer.schedule(_Hints(self), str(self.dir), recursive=False)
        observer.start()
        self._observer = observer
        super().start()

    def stop(self) -> None:
        """Stop within a few seconds whatever is being looked at or hashed (nothing here can block)."""
        self._stopping.set()
        self._wake.set()
        for name in WATCHDOG_LOGGERS:
            logging.getLogger(name).removeHandler(self._alarm)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=STOP_SECONDS)
        self.intake.stop()
        if self.is_alive():
            self.join(timeout=STOP_SECONDS)
        if not self.is_alive():
            for candidate in list(self._candidates.values()):
                self._forget(candidate.name)

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.poll()
            except Exception:
                log.exception("inbox: a look at the inbox failed; trying again")
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()

    # -- one look -----------------------------------------------------------------
    def poll(self) -> None:
        now = self.now()
        names = self._listing(now)
        with self._lock:
            names |= self._hinted
            self._hinted = set()
        for name in names | set(self._candidates):
            self._observe(name, now)
        self._open_new()
        uploading: list[dict[str, Any]] = []
        ready: list[Candidate] = []
        for candidate in sorted(self._candidates.values(), key=lambda c: c.order):
            self._judge(candidate, now, uploading, ready)
        batch = next(self._batches)
        for candidate in sorted(ready, key=lambda c: (c.ctime_ns, name_key(c.name))):
            if self._stopping.is_set():
                break
            self._take(candidate, batch)
        self.intake.publish()
        self.uploading = uploading
        self._publish(now)

    def _listing(self, now: float) -> set[str]:
        """The inbox's names, when it may hold some not seen yet; else none."""
        info = os.fstat(self._dir_fd)
        seen = (info.st_mtime_ns, info.st_ctime_ns)
        fresh = time.time_ns() - info.st_ctime_ns < FRESH_NS
        if not (self._overflowed.is_set() or now >= self._next_rescan or seen != self._folder_seen or fresh):
            return set()
        if self._overflowed.is_set():
            log.info("inbox: filesystem events were lost (queue overflow): listing the inbox again")
        self._overflowed.clear()
        self._folder_seen = seen
        if now >= self._next_rescan:
            self._next_rescan = now + self.config.inbox.rescan_seconds
        return {name for name in os.listdir(self._dir_fd) if not is_ignored(name, self.config.inbox.ignore)}

    def _observe(self, name: str, now: float) -> None:
        try:
            info = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
        except OSError:
            self._forget(name)
            return
        known = self._candidates.get(name)
        if known is not None and not known.same(info):
            self._forget(name)  # the name now holds another file: a new candidate
            known = None
        if known is None:
            self._candidates[name] = Candidate(
                name,
                next(self._arrivals),
                now,
                info.st_dev,
                info.st_ino,
                stat_module.S_IFMT(info.st_mode),
                info.st_size,
                info.st_mtime_ns,
                info.st_ctime_ns,
                still_since=now,
            )
            return
        if (info.st_size, info.st_mtime_ns, info.st_ctime_ns) != (known.size, known.mtime_ns, known.ctime_ns):
            if info.st_size < known.size:
                known.announced, known.head_size = None, -1  # written again from the start
            known.size, known.mtime_ns, known.ctime_ns, known.still_since = (
                info.st_size,
                info.st_mtime_ns,
                info.st_ctime_ns,
                now,
            )

    def _open_new(self) -> None:
        """Open regular files not open yet, oldest first, within the descriptor budget."""
        held = sum(1 for c in self._candidates.values() if c.fd is not None)
        for candidate in sorted(self._candidates.values(), key=lambda c: c.order):
            if candidate.fd is not None or candidate.error or candidate.kind != stat_module.S_IFREG:
                continue
            if held >= self._budget:
                if not self._budget_logged:
                    self._budget_logged = True
                    log.warning("inbox: %d files are open already; the others wait their turn", held)
                return
            try:
                fd = open_entry(candidate.name, self._dir_fd)
            except OSError as error:
                if error.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.EMFILE, errno.ENFILE):
                    self._forget(candidate.name)  # changed between two looks, or no descriptor now: look again
                else:
                    candidate.error = f"{printable(candidate.name)} cannot be opened: {error.strerror}"
                continue
            info = os.fstat(fd)
            if not candidate.same(info):
                os.close(fd)
                self._forget(candidate.name)
                continue
            candidate.fd = fd
            held += 1
            if info.st_dev != self._dev:
                candidate.error = f"{printable(candidate.name)} is on another filesystem than the inbox"
        self._budget_logged = held >= self._budget and self._budget_logged

    def _judge(self, candidate: Candidate, now: float, uploading: list[dict[str, Any]], ready: list[Candidate]) -> None:
        settled = now - candidate.still_since >= self.config.inbox.settle_seconds
        if candidate.fd is None:
            if settled and (candidate.error or candidate.kind != stat_module.S_IFREG):
                self._set_aside(candidate, candidate.error)
            return
        too_big = candidate.size > self.config.limits.max_archive_bytes  # refused without reading a byte
        if (
            candidate.announced is None
            and not too_big
            and candidate.head_size != candidate.size
            and candidate.head_size < HEAD_BYTES
        ):
            candidate.announced = announced_length_of(read_head(candidate.fd))
            candidate.head_size = candidate.size
        total = candidate.announced
        if total is not None and candidate.size < total:
            quiet = now - candidate.ctime_ns / 1e9
            if quiet < self.config.inbox.incomplete_timeout:
                uploading.append({"name": candidate.name, "bytes": candidate.size, "total": total})
                return
        if settled:
            ready.append(candidate)

    def _take(self, candidate: Candidate, batch: int) -> None:
        assert candidate.fd is not None
        info = os.fstat(candidate.fd)
        refusal = None
        total = candidate.announced
        if candidate.error is not None:
            refusal = candidate.error
        elif total is not None and info.st_size < total:
            refusal = (
                f"incomplete upload: {printable(candidate.name)} has {info.st_size} of its {total} bytes "
                f"and nothing arrived for {format_duration(self.config.inbox.incomplete_timeout)}"
            )
        taken = self.intake.take(
            candidate.name, self._dir_fd, candidate.fd, info, batch, announced=total, refusal=refusal
        )
        if taken:
            candidate.fd = None  # the intake's now
            self._candidates.pop(candidate.name, None)

    def _set_aside(self, candidate: Candidate, reason: str | None) -> None:
        info = os.stat(candidate.name, dir_fd=self._dir_fd, follow_symlinks=False)
        self._forget(candidate.name)
        if candidate.same(info):
            self.intake.set_aside(candidate.name, self._dir_fd, info, next(self._batches), reason)

    def _forget(self, name: str) -> None:
        candidate = self._candidates.pop(name, None)
        if candidate is not None and candidate.fd is not None:
            os.close(candidate.fd)
            candidate.fd = None

    def _publish(self, now: float) -> None:
        waiting = [candidate.seen for candidate in self._candidates.values()]
        waiting += self.intake.pending()
        waiting += [run.arrived for run in self.journal.queued()]
        oldest = max(0.0, now - min(waiting)) if waiting else 0.0
        self.observers.inbox_changed(len(waiting), oldest, list(self.uploading))
