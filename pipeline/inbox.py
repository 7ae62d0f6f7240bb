"""The inbox: notice dropped files, wait until their upload is complete, take them.

Watchdog events are hints (a close-after-write or a move-in makes a file a
candidate; a modification restarts its settle time); a full rescan at start-up
and every `inbox.rescan_seconds` catches what events missed. A candidate is
taken once its size and mtime held still for `inbox.settle_seconds`, no
process holds it open for writing, and it is not shorter than the length its
manifest announces. Taking is an atomic rename into `<state>/spool/<id>/`;
nothing else is read in the inbox.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import itertools
import logging
import os
import stat as stat_module
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer as WatchdogObserver

from pipeline.config import Config, format_duration
from pipeline.journal import Journal
from pipeline.observers import Observers

log = logging.getLogger("dropgate")

AnnouncedLength = Callable[[Path], "int | None"]
WRITE_MODES = frozenset({"w", "a", "r+", "a+", "w+"})
POLL_SECONDS = 0.2
HASH_CHUNK = 1 << 20


def announced_length(path: Path) -> int | None:
    """The archive's own full length from its manifest block, if it has one."""
    from pipeline.archive import read_announced_length

    return read_announced_length(path)


def open_for_writing(paths: Iterable[str]) -> set[str]:
    """Which of `paths` some process holds open for writing (processes we may not inspect are skipped)."""
    wanted = set(paths)
    if not wanted:
        return set()
    busy: set[str] = set()
    for proc in psutil.process_iter():
        try:
            for handle in proc.open_files():
                if handle.path in wanted and handle.mode in WRITE_MODES:
                    busy.add(handle.path)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, FileNotFoundError):
            continue
    return busy


def is_ignored(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Candidate:
    name: str
    seen: float  # arrival: the first time we saw it (keeps arrival order)
    size: int
    mtime_ns: int
    still_since: float
    order: int = 0  # arrival order
    regular: bool = True
    announced: int | None = None


class _Hints(FileSystemEventHandler):
    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    def on_closed(self, event: FileSystemEvent) -> None:
        self.inbox.hint(str(event.src_path), candidate=True)

    def on_moved(self, event: FileSystemEvent) -> None:
        self.inbox.hint(str(event.dest_path), candidate=True)

    def on_modified(self, event: FileSystemEvent) -> None:
        self.inbox.hint(str(event.src_path), candidate=False)

    def on_created(self, event: FileSystemEvent) -> None:
        self.inbox.hint(str(event.src_path), candidate=False)


class Inbox(threading.Thread):
    """Watches `paths.inbox` and turns complete uploads into queued runs."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        observers: Observers,
        on_taken: Callable[[int], None],
        *,
        announced: AnnouncedLength = announced_length,
        writers: Callable[[Iterable[str]], set[str]] = open_for_writing,
        now: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name="dropgate-inbox")
        self.config = config
        self.dir = config.paths.inbox
        self.spool = config.paths.state / "spool"
        self.journal = journal
        self.observers = observers
        self.on_taken = on_taken
        self.announced = announced
        self.writers = writers
        self.now = now
        self._candidates: dict[str, Candidate] = {}
        self._hinted: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._next_rescan = 0.0
        self._arrivals = itertools.count()
        self._observer: Any = None
        self.uploading: list[dict[str, Any]] = []

    # -- events --------------------------------------------------------------
    def hint(self, path: str, *, candidate: bool) -> None:
        name = os.path.basename(path)
        if os.path.dirname(path) != str(self.dir) or is_ignored(name, self.config.inbox.ignore):
            return
        with self._lock:
            self._hinted[name] = self._hinted.get(name, False) or candidate
        self._wake.set()

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spool.mkdir(parents=True, exist_ok=True)
        self.reconcile()
        observer = WatchdogObserver()
        observer.schedule(_Hints(self), str(self.dir), recursive=False)
        observer.start()
        self._observer = observer
        super().start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:
                log.exception("inbox: poll failed; trying again")
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()

    # -- start-up --------------------------------------------------------------
    def reconcile(self) -> None:
        """Finish takes that a crash interrupted between the journal record and the rename."""
        for run in self.journal.queued():
            target = Path(run.path)
            if target.exists():
                continue
            source = self.dir / run.archive
            if source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
                log.info("inbox: finished taking %s as run %d", run.archive, run.id)
            else:
                self.journal.update_run(
                    run.id,
                    outcome="rejected",
                    finished=self.now(),
                    error=f"the archive {run.archive} vanished before it was processed",
                )
                self.journal.add_event(run.id, "queued", f"the archive {run.archive} vanished before it was processed")

    # -- the settle rule ---------------------------------------------------------
    def _rescan(self, now: float) -> None:
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return
        found = []
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                found.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
        with self._lock:
            for _, name in sorted(found):
                if not is_ignored(name, self.config.inbox.ignore):
                    self._hinted.setdefault(name, True)

    def poll(self) -> None:
        now = self.now()
        if now >= self._next_rescan:
            self._rescan(now)
            self._next_rescan = now + self.config.inbox.rescan_seconds
        with self._lock:
            hinted, self._hinted = self._hinted, {}
        for name, is_candidate in hinted.items():
            self._observe(name, now, make_candidate=is_candidate)
        for name in list(self._candidates):
            if name not in hinted:
                self._observe(name, now, make_candidate=False)
        uploading: list[dict[str, Any]] = []
        ready: list[Candidate] = []
        for candidate in sorted(self._candidates.values(), key=lambda c: c.order):
            if candidate.regular and candidate.announced is None:
                candidate.announced = self.announced(self.dir / candidate.name)
            total = candidate.announced
            if total is not None and candidate.size < total:
                quiet = now - candidate.mtime_ns / 1e9
                if quiet < self.config.inbox.incomplete_timeout:
                    uploading.append({"name": candidate.name, "bytes": candidate.size, "total": total})
                    continue
                self._take(
                    candidate,
                    refuse=f"incomplete upload: {candidate.name} has {candidate.size} of its {total} bytes "
                    f"and nothing arrived for {format_duration(self.config.inbox.incomplete_timeout)}",
                )
                continue
            if now - candidate.still_since >= self.config.inbox.settle_seconds:
                ready.append(candidate)
        busy = self.writers([str(self.dir / c.name) for c in ready if c.regular]) if ready else set()
        for candidate in ready:
            if str(self.dir / candidate.name) not in busy:
                self._take(candidate)
        self.uploading = uploading
        self._publish(now)

    def _observe(self, name: str, now: float, *, make_candidate: bool) -> None:
        path = self.dir / name
        try:
            stat = path.lstat()
        except FileNotFoundError:
            self._candidates.pop(name, None)
            return
        if not stat_module.S_ISREG(stat.st_mode):
            if make_candidate and name not in self._candidates:
                self._add_candidate(name, now, stat)
                self._candidates[name].regular = False
            return
        known = self._candidates.get(name)
        if known is None:
            if make_candidate:
                self._add_candidate(name, now, stat)
            return
        if (stat.st_size, stat.st_mtime_ns) != (known.size, known.mtime_ns):
            known.size, known.mtime_ns, known.still_since = stat.st_size, stat.st_mtime_ns, now

    def _add_candidate(self, name: str, now: float, stat: os.stat_result) -> None:
        self._candidates[name] = Candidate(name, now, stat.st_size, stat.st_mtime_ns, now, next(self._arrivals))

    def _take(self, candidate: Candidate, *, refuse: str | None = None) -> None:
        """Record the run, move the file into its spool folder, then screen it (kind, repeat)."""
        source = self.dir / candidate.name
        run_id = self.journal.add_run(candidate.name, spool=self.spool, arrived=self.now())
        target = self.spool / str(run_id) / candidate.name
        target.parent.mkdir(parents=True, exist_ok=True)
        del self._candidates[candidate.name]
        try:
            os.rename(source, target)
        except FileNotFoundError:
            self._reject(run_id, None, f"{candidate.name} vanished from the inbox before it was taken")
            return
        self.journal.add_event(run_id, "queued", f"taken from the inbox ({candidate.size} bytes)")
        reason = refuse or self._screen(run_id, target)
        if reason is not None:
            self._reject(run_id, target, reason)
        self.on_taken(run_id)

    def _screen(self, run_id: int, path: Path) -> str | None:
        """Why the taken file must be refused at once, if it must: not a file, or known-bad bytes."""
        if path.is_symlink() or not path.is_file():
            kind = "a symbolic link" if path.is_symlink() else "not a regular file"
            return f"{path.name} is {kind}; only update archive files are taken"
        digest = sha256_of(path)
        self.journal.update_run(run_id, sha256=digest, size=path.stat().st_size)
        earlier = self.journal.last_with_sha(digest, exclude=run_id)
        if earlier is None or earlier.outcome == "succeeded":
            return None
        return (
            f"the same archive (sha256 {digest[:12]}…) was already {earlier.outcome} as run {earlier.id}: "
            f"run it again only with `dropgate retry {earlier.id}`"
        )

    def _reject(self, run_id: int, path: Path | None, reason: str) -> None:
        """Refuse a run before it starts: the file is moved aside with its reason, never deleted."""
        fields: dict[str, Any] = {}
        if path is not None:
            target = self.config.paths.state / "rejected" / f"{run_id}-{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            target.with_name(target.name + ".reason").write_text(reason + "\n", encoding="utf-8")
            with contextlib.suppress(OSError):
                path.parent.rmdir()
            fields["path"] = str(target)
        now = self.now()
        self.journal.update_run(run_id, outcome="rejected", started=now, finished=now, error=reason, **fields)
        self.journal.add_event(run_id, "rejected", f"outcome: rejected — {reason}")
        log.info("run %d rejected: %s", run_id, reason)

    def _publish(self, now: float) -> None:
        waiting = [(c.seen) for c in self._candidates.values()]
        waiting += [run.arrived for run in self.journal.queued()]
        oldest = now - min(waiting) if waiting else 0.0
        self.observers.inbox_changed(len(waiting), oldest, list(self.uploading))
